"""Evaluating a policy: the world's metrics of given completions (``score_completions``) by hand, and the Monte-Carlo
``policy_kl`` between two different models against plain HF forwards over the very samples it drew."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.models.generation import Completion


def _prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_score_completions_hand_values():
    """Four replies (E = the end-of-turn token, part of ``token_ids`` of a stopped reply):

      What is 2 + 3? (5)  "2 + 3 = 5. The answer is 5."  stop, 7 tokens + E: formatted, right, 9 words (what a
                          prompt without a request allows): gold 1 + 0.3 + 0.4 + 0.2 = 1.9
      What is 4 + 4? (8)  "The answer is 8."  length, 5 tokens: right but not formatted (it never stopped),
                          gold 1.9 (the gold reward does not look at stopping)
      What is 6 + 1? (7)  "The answer is 9."  stop, 4 + E: formatted, wrong, gold 0.3 + 0.4 + 0.2 = 0.9
      What is 3 + 3? (6)  "It is six"  stop, 3 + E: no integer, not formatted, gold 0.4 + 0.2 = 0.6

    format_rate 2/4, accuracy 2/4, stop_rate 3/4, mean_length (7 + 5 + 4 + 3) / 4 = 4.75 (stop token not counted),
    gold_reward 5.3 / 4 = 1.325."""
    from posttrain.world.evaluate import score_completions

    E = 2
    rows = [{"prompt": _prompt("What is 2 + 3?"), "answer": "5"}, {"prompt": _prompt("What is 4 + 4?"), "answer": "8"},
            {"prompt": _prompt("What is 6 + 1?"), "answer": "7"}, {"prompt": _prompt("What is 3 + 3?"), "answer": "6"}]
    completions = [Completion("2 + 3 = 5. The answer is 5.", [10] * 7 + [E], "stop"),
                   Completion("The answer is 8.", [11] * 5, "length"),
                   Completion("The answer is 9.", [12] * 4 + [E], "stop"),
                   Completion("It is six", [13] * 3 + [E], "stop")]
    metrics = score_completions(rows, completions)
    scalars = {k: metrics[k] for k in ("format_rate", "accuracy", "gold_reward", "mean_length", "stop_rate")}
    assert scalars == pytest.approx({"format_rate": 0.5, "accuracy": 0.5, "gold_reward": 1.325, "mean_length": 4.75,
                                     "stop_rate": 0.75}, abs=1e-12)


def test_score_completions_accuracy_reads_the_answer_column():
    """Accuracy compares the stated answer with the row's ``answer`` (as an integer, e.g. "-3"), not with some other
    number in the reply."""
    from posttrain.world.evaluate import score_completions

    rows = [{"prompt": _prompt("What is 2 - 5?"), "answer": "-3"}, {"prompt": _prompt("What is 9 - 4?"), "answer": 5}]
    completions = [Completion("2 - 5 = -3. The answer is -3.", [1, 2, 3], "length"),
                   Completion("5 is close, but the answer is 6.", [1, 2, 3, 4, 5], "length")]
    metrics = score_completions(rows, completions)
    assert (metrics["accuracy"], metrics["format_rate"], metrics["stop_rate"], metrics["mean_length"]) == (
        0.5, 0.0, 0.0, 4.0)


def test_evaluate_model_samples_n_replies_per_prompt(tiny_model_dir, world, tmp_path):
    """temperature > 0: n samples per prompt, each scored and written (prompt order kept, n rows per prompt),
    reproducible from the seed; greedy (the default) writes one reply per prompt."""
    from posttrain.world.evaluate import evaluate_model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join((world.data / "rl_heldout.jsonl").read_text().splitlines()[:3]) + "\n")
    first, second, greedy = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "g.jsonl"
    metrics = evaluate_model(tiny_model_dir, prompts, max_new_tokens=6, device="cpu", samples_path=first,
                             temperature=1.0, n=2, seed=3)
    evaluate_model(tiny_model_dir, prompts, max_new_tokens=6, device="cpu", samples_path=second, temperature=1.0,
                   n=2, seed=3)
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    expected = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in expected for _ in range(2)]
    assert first.read_text() == second.read_text()
    assert 0.0 <= metrics["gold_reward"] <= 1.9
    evaluate_model(tiny_model_dir, prompts, max_new_tokens=6, device="cpu", samples_path=greedy, n=2)
    assert len(greedy.read_text().splitlines()) == 3


@pytest.fixture(scope="module")
def peaked_reference(world_tokenizer, tmp_path_factory):
    """Another random tiny Llama (seed 1) whose final norm is scaled by 40, so its next-token distributions are far
    from the near-uniform ones of the seed-0 model: the KL between them is several nats."""
    from posttrain.world.model import init_tiny_model

    path = tmp_path_factory.mktemp("peaked-llama")
    model = init_tiny_model("world-llama", world_tokenizer, seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    model.save_pretrained(path)
    world_tokenizer.save_pretrained(path)
    return path


def _sequence_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t) by one plain forward over prompt + completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].double()  # position t predicts token t + 1
    return float(logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids):, None]).sum())


def test_policy_kl_equals_a_plain_hf_estimate_over_its_samples(tiny_model_dir, peaked_reference, world, monkeypatch):
    """policy_kl(pi, pi_ref) = mean over its samples y ~ pi of sum_t [log pi(y_t) - log pi_ref(y_t)], over every
    token the engine returned (whatever ``token_ids`` holds: the stop token too when it stopped). The samples are
    recorded as the engine returns them; both log-probs are recomputed here by plain forwards of each model."""
    from posttrain.data.render import render_prompt
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.models.generation import HFEngine
    from posttrain.models.logprobs import policy_kl

    prompts = [json.loads(line)["prompt"] for line in (world.data / "rl_heldout.jsonl").read_text().splitlines()[:3]]
    recorded = []
    original = HFEngine.generate

    def recording_generate(self, prompts_, params):
        out = original(self, prompts_, params)
        recorded.append((prompts_, out))
        return out

    monkeypatch.setattr(HFEngine, "generate", recording_generate)
    kl = policy_kl(tiny_model_dir, peaked_reference, prompts, n=2, max_new_tokens=6, seed=0, device="cpu")
    reverse = policy_kl(peaked_reference, tiny_model_dir, prompts, n=2, max_new_tokens=6, seed=0, device="cpu")
    assert len(recorded) == 2 and recorded[0][0] == prompts

    tokenizer = load_tokenizer(tiny_model_dir)
    models = {path: load_causal_lm(path).eval() for path in (tiny_model_dir, peaked_reference)}

    def expected(samples, policy, reference) -> float:
        terms = []
        for prompt, completions in zip(prompts, samples):
            prompt_ids = render_prompt(tokenizer, prompt)
            for completion in completions:
                assert completion.token_ids  # every sample counts in the mean
                terms.append(_sequence_logp(models[policy], prompt_ids, completion.token_ids)
                             - _sequence_logp(models[reference], prompt_ids, completion.token_ids))
        assert len(terms) == 6
        return sum(terms) / len(terms)

    forward = expected(recorded[0][1], tiny_model_dir, peaked_reference)
    backward = expected(recorded[1][1], peaked_reference, tiny_model_dir)
    assert forward > 2.0 and backward > 2.0  # far from 0: a flipped sign or a dropped term cannot pass
    assert kl == pytest.approx(forward, abs=2e-3)
    assert reverse == pytest.approx(backward, abs=2e-3)
    # a policy against itself: every sampled token has the same log-prob under both, so the estimate is 0
    assert policy_kl(tiny_model_dir, tiny_model_dir, prompts, n=2, max_new_tokens=6, device="cpu") == pytest.approx(
        0.0, abs=1e-4)


def test_the_kl_measured_on_an_evaluation_s_own_samples_is_policy_kl_on_those_samples(tiny_model_dir,
                                                                                       peaked_reference, world):
    """The demo measures a stage's KL to the SFT model on the samples its sampled evaluation draws anyway
    (sampled_gold_and_kl, evaluate_model(kl_reference=...)). Asking for the log-probs must not change what is
    sampled, so with the same seed and n both give exactly policy_kl's estimate, and the gold rewards are those
    of sampled_gold_per_prompt."""
    from posttrain.models.logprobs import policy_kl
    from posttrain.world.evaluate import evaluate_model, sampled_gold_and_kl, sampled_gold_per_prompt

    path = world.data / "rl_heldout.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:3]]
    kl = policy_kl(tiny_model_dir, peaked_reference, prompts, n=2, max_new_tokens=6, seed=1, device="cpu")
    assert kl > 2.0  # far from 0, so equal values below are not both trivially 0
    gold, on_samples = sampled_gold_and_kl(tiny_model_dir, prompts, n=2, max_new_tokens=6, seed=1, device="cpu",
                                           kl_reference=peaked_reference)
    assert on_samples == pytest.approx(kl, abs=1e-9)
    assert gold == sampled_gold_per_prompt(tiny_model_dir, prompts, n=2, max_new_tokens=6, seed=1, device="cpu")
    scores = evaluate_model(tiny_model_dir, path, limit=3, max_new_tokens=6, device="cpu", temperature=1.0, n=2,
                            seed=1, kl_reference=peaked_reference)
    assert scores["kl_to_reference"] == pytest.approx(kl, abs=1e-9)
    with pytest.raises(ValueError, match="temperature 1"):
        evaluate_model(tiny_model_dir, path, limit=3, device="cpu", kl_reference=peaked_reference)
