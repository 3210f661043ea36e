"""The generation engine: n samples per prompt, seeds, log-probs, stop handling, and the training rendering."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.data.render import render_conversation, render_prompt
from posttrain.models.generation import HFEngine, SamplingParams, _Sampler, inverse_cdf_draw, load_engine


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
    original = engine.model.forward

    def recording_forward(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] == mask.shape[1]:  # the prefill (decoding steps feed one new token against the whole mask)
            seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        return original(*args, **kwargs)

    engine.model.forward = recording_forward
    try:
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2, temperature=0.0))
    finally:
        del engine.model.forward
    assert seen
    for prompt in prompts:
        full, mask = render_conversation(engine.tokenizer, prompt + [{"role": "assistant", "content": "4"}])
        prompt_part = full[: mask.index(1)]
        assert prompt_part in seen


def test_length_finish_reason(world_with_base):
    """The pretrained base model in the chat format rarely stops within 2 tokens: finish_reason says "length" and
    token_ids hold exactly the budget."""
    engine = load_engine(world_with_base.base_model, backend="hf", device="cpu")
    short = engine.generate([[{"role": "user", "content": "What is 2 + 3?"}]], SamplingParams(max_new_tokens=2, temperature=0))
    assert short[0][0].finish_reason == "length" and len(short[0][0].token_ids) == 2
    assert short[0][0].content_ids == short[0][0].token_ids


@pytest.fixture(scope="module")
def stopping_engine(tiny_model_dir):
    """The tiny model with a bias on its end-of-turn logit, so that at temperature 1 a reply stops after a few tokens
    (P(end-of-turn) about 0.12 per step): both finish reasons occur among a couple of dozen samples."""
    from posttrain.data.render import end_of_turn_token_ids
    from posttrain.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir).eval()
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[end_of_turn_token_ids(tokenizer)[0]] = 4.2
    model.set_output_embeddings(biased)
    return HFEngine(model, tokenizer, batch_size=16)


def test_stopped_completions_keep_the_stop_token_and_its_logprob(stopping_engine, prompts):
    """A reply that stops ends with the end-of-turn token in token_ids (and nowhere before it), its text leaves it
    out, and its log-prob is there: the sampled log-probs, stop token included, equal teacher-forced token_logps."""
    from posttrain.data.packing import Example, collate_flat
    from posttrain.data.render import end_of_turn_token_ids
    from posttrain.models.logprobs import token_logps

    engine = stopping_engine
    stops = set(end_of_turn_token_ids(engine.tokenizer))
    out = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=3, logprobs=True))
    completions = [c for samples in out for c in samples]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions)  # both finish reasons occur
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stops and not stops & set(c.token_ids[:-1])
            assert c.content_ids == c.token_ids[:-1]
            assert c.text == engine.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        else:
            assert len(c.token_ids) == 12 and not stops & set(c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
    for prompt, samples in zip(prompts, out):
        prompt_ids = render_prompt(engine.tokenizer, prompt)
        examples = [Example(prompt_ids + c.token_ids, [0] * len(prompt_ids) + [1] * len(c.token_ids)) for c in samples]
        with torch.no_grad():
            forced = token_logps(engine.model, collate_flat(examples, engine.tokenizer.pad_token_id)).tolist()
        assert [x for c in samples for x in c.logprobs] == pytest.approx(forced, abs=1e-4)


def test_generation_leaves_the_global_rng_alone(engine, prompts):
    """Sampling draws from a local torch.Generator: the training loop's global stream is the same with or without a
    generate call in between, seeded or not, and the python RNG is untouched too."""
    import random

    torch.manual_seed(1234)
    random.seed(99)
    expected = torch.rand(4)
    expected_py = random.random()
    torch.manual_seed(1234)
    random.seed(99)
    engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=0))
    engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=None))
    assert torch.equal(torch.rand(4), expected)
    assert random.random() == expected_py


def test_unseeded_sampling_differs_between_calls(engine, prompts):
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=None)
    first = [[c.token_ids for c in s] for s in engine.generate(prompts, params)]
    second = [[c.token_ids for c in s] for s in engine.generate(prompts, params)]
    assert first != second


def test_inverse_cdf_draw_by_hand():
    """probs [0.2, 0, 0.5, 0.3] (cumulative 0.2, 0.2, 0.7, 1.0): u < 0.2 -> 0, [0.2, 0.7) -> 2, [0.7, 1) -> 3; the
    zero-probability token 1 owns no interval. Unnormalised rows scale u by their total; a target that would round
    up to the total (here: u = 1) still lands on the last token with probability, not on a cut tail or past the end."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(7, 4)
    uniform = torch.tensor([0.0, 0.1999, 0.2, 0.6999, 0.7, 0.9999, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_draw(probs, uniform).tolist() == [0, 0, 2, 2, 3, 3, 3]
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]]).expand(2, 3)  # cumulative 2, 2, 8: u * 8 < 2 -> 0, else 2
    assert inverse_cdf_draw(unnormalised, torch.tensor([0.2499, 0.25], dtype=torch.float64)).tolist() == [0, 2]
    tail_cut = torch.tensor([[0.25, 0.75, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert inverse_cdf_draw(tail_cut, torch.tensor([1 - 2**-53, 1 - 2**-53], dtype=torch.float64)).tolist() == [1, 0]
    assert inverse_cdf_draw(tail_cut, torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist() == [1, 0]


def test_sampler_draws_the_warped_softmax_distribution():
    """200,000 draws of one row's next token at T = 0.7 with top-k 3: each of the 3 kept tokens within 4.5 standard
    errors of softmax(logits / T) renormalised over them, every other token never."""
    logits = torch.tensor([2.0, -1.0, 1.5, 0.3, 1.9, -3.0])
    rows = 200_000
    drawn = _Sampler(SamplingParams(temperature=0.7, top_k=3, seed=0), torch.device("cpu"))(logits.expand(rows, 6))
    counts = torch.bincount(drawn, minlength=6).double()
    kept = torch.tensor([0, 2, 4])
    expected = torch.zeros(6, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[kept].double() / 0.7, -1)
    share = counts / rows
    assert share[[1, 3, 5]].sum() == 0
    with pytest.raises(ValueError, match="nothing to sample"):  # a row masked everywhere: no token is possible
        _Sampler(SamplingParams(seed=0), torch.device("cpu"))(torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]))
    assert ((share[kept] - expected[kept]).abs() <= 4.5 * (expected[kept] * (1 - expected[kept]) / rows).sqrt()).all()


def test_bad_sampling_parameters_are_rejected():
    for bad in [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError):
        load_engine("unused", backend="tpu")


@pytest.mark.parametrize("bias", [0.6, 0.8])
def test_greedy_decoding_equals_transformers_generate(stopping_engine, prompts, bias):
    """Our decoding loop (one prefill per prompt, stopped rows leaving the batch) gives exactly the tokens of
    transformers' own greedy ``generate`` on each prompt alone (no padding), stop token included. The end-of-turn
    bias is set so that replies of one batch stop at different steps (and some never)."""
    from transformers import GenerationConfig

    from posttrain.data.render import end_of_turn_token_ids

    engine = stopping_engine
    stop_ids = end_of_turn_token_ids(engine.tokenizer)
    head_bias = engine.model.get_output_embeddings().bias
    saved = head_bias[stop_ids[0]].item()
    with torch.no_grad():
        head_bias[stop_ids[0]] = bias
    try:
        ours = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=24, temperature=0.0))
        lengths = set()
        for prompt, completions in zip(prompts, ours):
            ids = torch.tensor([render_prompt(engine.tokenizer, prompt)])
            config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=stop_ids,
                                      pad_token_id=engine.tokenizer.pad_token_id)
            expected = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             generation_config=config)[0, ids.shape[1]:].tolist()
            assert [c.token_ids for c in completions] == [expected, expected]
            lengths.add(len(expected))
    finally:
        with torch.no_grad():
            head_bias[stop_ids[0]] = saved
    assert len(lengths) > 1  # rows of one batch stopped at different steps: rows left the batch mid-way



def test_caches_whose_rows_cannot_be_edited_take_the_plain_path(stopping_engine, prompts, monkeypatch):
    """A plain key/value cache (the tiny Llama's) is copied and compacted in place; a cache with a linear-attention
    layer (conv / recurrent state that transformers' batch methods do not reindex) is not: then every copy is
    prefilled and rows are not dropped, with the same greedy output."""
    from transformers import DynamicCache, cache_utils

    from posttrain.models import generation

    engine = stopping_engine
    cache = DynamicCache(config=engine.model.config)
    assert generation._rows_editable(cache)
    cache.layers[0] = cache_utils.LinearAttentionLayer()
    assert not generation._rows_editable(cache)
    assert not generation._rows_editable(None)

    head_bias = engine.model.get_output_embeddings().bias
    stop = generation.end_of_turn_token_ids(engine.tokenizer)[0]
    saved = head_bias[stop].item()
    with torch.no_grad():
        head_bias[stop] = 0.8  # replies of one batch stop at different steps
    try:
        # top_k=1 sampling: 3 decoded rows per prompt (the cache-copy path), deterministic whatever the draws
        params = SamplingParams(n=3, max_new_tokens=16, temperature=1.0, top_k=1, seed=0)
        greedy = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=16, temperature=0.0))
        fast = engine.generate(prompts, params)
        monkeypatch.setattr(generation, "_rows_editable", lambda cache: False)
        plain = engine.generate(prompts, params)
    finally:
        with torch.no_grad():
            head_bias[stop] = saved
    ids = lambda out: [[c.token_ids for c in samples] for samples in out]  # noqa: E731
    assert ids(fast) == ids(plain) == ids(greedy)
    assert len({len(samples[0].token_ids) for samples in fast}) > 1


@pytest.mark.parametrize("room", [None, 1])
def test_preallocated_cache_decodes_exactly_as_the_growing_one(stopping_engine, prompts, monkeypatch, room):
    """The engine gives each plain cache layer a buffer with room for the reply (no torch.cat per token); sampled
    tokens and their log-probs are those of transformers' own growing DynamicLayer, with rows leaving the batch
    mid-way, and with a room of one token (the buffer doubles as it fills)."""
    from posttrain.models import generation

    real = generation._preallocate
    kinds = []

    def spy(cache, extra):
        real(cache, extra if room is None else room)
        kinds.append({type(layer).__name__ for layer in cache.layers})

    params = SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=5, logprobs=True)
    monkeypatch.setattr(generation, "_preallocate", spy)
    fast = stopping_engine.generate(prompts, params)
    assert kinds and all(k == {"PreallocatedLayer"} for k in kinds)
    monkeypatch.setattr(generation, "_preallocate", lambda cache, extra: None)
    plain = stopping_engine.generate(prompts, params)
    assert [[c.token_ids for c in s] for s in fast] == [[c.token_ids for c in s] for s in plain]
    assert [x for s in fast for c in s for x in c.logprobs] == pytest.approx(
        [x for s in plain for c in s for x in c.logprobs], abs=1e-5)
    assert {c.finish_reason for s in fast for c in s} == {"stop", "length"}
