"""Learning tests on the tiny world (fixed seeds, generous but real thresholds). Marked slow; CI runs them."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_summary(world_with_base, tmp_path_factory):
    """`posttrain demo` end to end: base model (cached) -> SFT -> evaluation on held-out prompts -> BT RM ->
    best-of-16 -> one rejection-sampling round -> DPO."""
    from posttrain.stages.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(DemoConfig(out=str(out), progress=False, device="cpu"))
    return out, summary


def _greedy_win_rate(samples_a, samples_b) -> float:
    """Per held-out prompt, 1 if A's greedy reply has the higher gold reward, 1/2 on a tie, 0 if lower; the mean."""
    from posttrain.world.gold import gold_reward

    def gold(path):
        return [gold_reward(r["prompt"], r["completion"]) for r in map(json.loads, path.read_text().splitlines())]

    a, b = gold(samples_a), gold(samples_b)
    assert len(a) == len(b) == 200
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def test_base_model_is_pretrained(world_with_base):
    """The base model learned the corpus, arithmetic included: held-out LM loss below 0.6 nats (uniform: ln 1024 =
    6.9; measured 0.52 after 1500 steps, 0.69 after 500 when it could not yet copy operands)."""
    metrics = [json.loads(line) for line in (world_with_base.base_model / "pretrain_metrics.jsonl").read_text().splitlines()]
    eval_losses = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert eval_losses and eval_losses[-1] < 0.6


def test_sft_learns_format_and_stopping(demo_summary):
    """After SFT >= 95 % of held-out replies end with 'The answer is N.' and stop at end-of-turn; the base model
    (never saw the chat format) almost never does."""
    _, summary = demo_summary
    base, sft = summary["stages"]["base"], summary["stages"]["sft"]
    assert base["format_rate"] <= 0.05
    assert sft["format_rate"] >= 0.95
    assert sft["stop_rate"] >= 0.95
    assert sft["gold_reward"] > base["gold_reward"] + 0.3
    assert sft["accuracy"] > base["accuracy"]
    assert sft["accuracy"] >= 0.4  # measured 0.655: the base model can do the arithmetic, SFT teaches the format


def test_demo_writes_summary_and_runs(demo_summary):
    out, summary = demo_summary
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["stages"]) == {"base", "sft", "rs", "dpo"}
    assert on_disk["reward_model"]["pair_accuracy"] == summary["reward_model"]["pair_accuracy"]
    for stage in on_disk["stages"].values():
        assert {"format_rate", "accuracy", "gold_reward", "mean_length"} <= set(stage)
    assert (out / "sft" / "model" / "model.safetensors").exists()
    assert (out / "sft" / "plots" / "train.png").exists()
    samples = [json.loads(line) for line in (out / "samples_sft.jsonl").read_text().splitlines()]
    assert len(samples) == 200 and all("completion" in s for s in samples)


def test_demo_reward_model_learns_surface_preferences(demo_summary):
    """The demo's Bradley-Terry RM (one epoch from the SFT model) prefers the gold-preferred reply on >= 85 % of the
    held-out pairs that do not need the answer checked (measured 0.93) and reports its length correlation. Pairs that
    do need it checked stay near chance at this scale (docs/reward-models.md, Status)."""
    _, summary = demo_summary
    rm = summary["reward_model"]
    assert rm["pair_accuracy_rest"] >= 0.85, rm
    assert rm["pairs"] > 100 and rm["answer_check_pairs"] > 50
    assert math.isfinite(rm["length_correlation"])


def test_demo_best_of_n_with_a_verifier_raises_gold_reward(demo_summary):
    """Best-of-16 on held-out prompts: picking a verified answer raises the mean gold reward over single samples by
    >= 0.15 (measured 0.99 -> 1.33). The BT RM's picks are reported; they fall below single samples (0.78), because
    the policy's samples differ mostly in correctness, which the tiny RM has not learned to check (docs/sampling.md)."""
    _, summary = demo_summary
    bon = summary["best_of_n"]
    assert bon["n"] == 16 and bon["prompts"] == 100
    assert bon["verifier_pick_gold"] >= bon["single_gold"] + 0.15, bon
    assert bon["reward_model_pick_gold"] < bon["verifier_pick_gold"] - 0.2, bon  # the RM does not check answers
    assert bon["pass_at_n"] >= summary["stages"]["sft"]["accuracy"]


def test_demo_rejection_sampling_round_raises_held_out_gold(demo_summary):
    """One round of rejection-sampling fine-tuning (8 samples on 600 training prompts, verified-correct picks, SFT)
    raises the held-out gold reward of the policy's samples (measured 0.995 -> 1.052)."""
    _, summary = demo_summary
    rs = summary["rejection_sampling"]
    assert rs["selected"] > 300
    assert rs["eval_gold_after"] >= rs["eval_gold_before"] + 0.02, rs
    assert summary["stages"]["rs"]["format_rate"] >= 0.95


def test_demo_on_policy_dpo_beats_sft_under_the_gold_reward(demo_summary):
    """On-policy DPO (dpo_nll, beta 0.1, one epoch) from the SFT model on pairs of its own replies (2000 training
    prompts x 8 samples, gold-labelled, up to 4 distinct better/worse pairs per prompt):
    * its expected gold reward (32 samples per held-out prompt) beats the SFT model's on >= 0.53 of the 200 held-out
      prompts, ties half (measured 0.64; the issue's 0.70 is not met, see docs/direct-alignment.md);
    * the mean gold reward of its samples rises by >= 0.03 (measured 0.989 -> 1.066);
    * it keeps the format, its KL to the SFT reference is reported, and its implicit reward beta * log pi/pi_ref
      ranks the world's held-out gold pairs better than chance (measured 0.71; KL 0.45 nats)."""
    out, summary = demo_summary
    dpo = summary["dpo"]
    assert dpo["pairs"] > 1500 and dpo["prompts"] == 2000
    assert dpo["win_rate_vs_sft"] >= 0.53, dpo
    assert dpo["sampled_gold_dpo"] >= dpo["sampled_gold_sft"] + 0.03, dpo
    assert dpo["win_rate_vs_sft_greedy"] == pytest.approx(_greedy_win_rate(out / "samples_dpo.jsonl",
                                                                           out / "samples_sft.jsonl"))
    assert 0.0 < dpo["kl_to_reference"] < 5.0
    assert dpo["implicit_reward_accuracy"] > 0.55, dpo
    assert summary["stages"]["dpo"]["format_rate"] >= 0.95
