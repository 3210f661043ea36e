"""The generation engine: n samples per prompt, seeds, log-probs, stop handling, and the training rendering."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.render import render_conversation, render_prompt
from posttrain.models.generation import HFEngine, SamplingParams, load_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine.from_path(tiny_model_dir, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def prompts(world):
    rows = [json.loads(line) for line in (world.data / "rl_heldout.jsonl").read_text().splitlines()[:5]]
    return [r["prompt"] for r in rows] + [[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is 2 + 2?"}]]


def test_n_samples_per_prompt_in_callers_order(engine, prompts):
    params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0, seed=0)
    out = engine.generate(prompts, params)
    assert [len(samples) for samples in out] == [3] * len(prompts)
    # each prompt's samples come from that prompt: regenerate prompt 2 alone with greedy decoding and compare
    greedy = SamplingParams(n=2, max_new_tokens=6, temperature=0.0)
    alone = engine.generate([prompts[2]], greedy)[0]
    together = engine.generate(prompts, greedy)[2]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert alone[0].token_ids == alone[1].token_ids  # greedy: n identical copies


def test_seeded_sampling_is_reproducible(engine, prompts):
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, seed=123)
    first = [[c.token_ids for c in s] for s in engine.generate(prompts, params)]
    second = [[c.token_ids for c in s] for s in engine.generate(prompts, params)]
    other = [[c.token_ids for c in s] for s in engine.generate(prompts, SamplingParams(n=4, max_new_tokens=8, seed=7))]
    assert first == second
    assert first != other
    assert len({tuple(ids) for s in first for ids in s}) > len(prompts)  # really sampling, not n copies


def test_logprobs_equal_teacher_forced_model_logprobs(engine, prompts):
    """The engine's per-token log-probs are log-softmax of the raw logits at each sampled token: recomputing them by
    one teacher-forced forward over prompt + completion gives the same numbers (whatever the sampling filters)."""
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_k=20, seed=1, logprobs=True)
    out = engine.generate(prompts, params)
    for prompt, samples in zip(prompts, out):
        ids = render_prompt(engine.tokenizer, prompt)
        for completion in samples:
            assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
            full = torch.tensor([ids + completion.token_ids])
            with torch.no_grad():
                logits = engine.model(full).logits[0, len(ids) - 1 : -1]  # predicts each completion token
            expected = logits.log_softmax(-1).gather(-1, full[0, len(ids):, None])[:, 0]
            assert completion.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_generation_prompt_is_the_training_rendering(engine, prompts):
    """What the engine feeds the model is exactly the prompt part of the training rendering of the conversation."""
    seen = []
    original = engine.model.generate

    def recording_generate(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        return original(*args, **kwargs)

    engine.model.generate = recording_generate
    try:
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2, temperature=0.0))
    finally:
        del engine.model.generate
    for prompt in prompts:
        full, mask = render_conversation(engine.tokenizer, prompt + [{"role": "assistant", "content": "4"}])
        prompt_part = full[: mask.index(1)]
        assert prompt_part in seen


def test_stop_and_length_finish_reasons(world_with_base):
    """The pretrained base model in the chat format rarely stops; the world's template end-of-turn ends SFT-like
    replies. Either way finish_reason says which, and stopped completions exclude the stop token."""
    engine = load_engine(world_with_base.base_model, backend="hf", device="cpu")
    short = engine.generate([[{"role": "user", "content": "What is 2 + 3?"}]], SamplingParams(max_new_tokens=2, temperature=0))
    assert short[0][0].finish_reason == "length" and len(short[0][0].token_ids) == 2
    from posttrain.data.render import end_of_turn_token_ids

    stops = end_of_turn_token_ids(engine.tokenizer)
    out = engine.generate([[{"role": "user", "content": "What is 2 + 3?"}]] * 2,
                          SamplingParams(n=8, max_new_tokens=40, temperature=1.0, seed=0))
    for completion in out[0] + out[1]:
        assert not set(completion.token_ids) & set(stops)
        assert completion.finish_reason in ("stop", "length")
        assert completion.finish_reason == "stop" or len(completion.token_ids) == 40


def test_bad_sampling_parameters_are_rejected():
    for bad in [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError):
        load_engine("unused", backend="tpu")
