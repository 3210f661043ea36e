"""Reward-model learning tests on the tiny world (fixed seeds; slow, run in CI).

The margin and Plackett-Luce RMs start from the demo's SFT model (conftest.demo_sft_model: trained once per session
and shared with the demo run, whichever pytest-xdist worker asks first) and train on the annotators' noisy,
length-biased data; they are scored against the gold reward on held-out questions. The ORM and the PRM start from the base model. Whether a
stated answer is right stays out of reach of a 2 M-parameter RM (docs/reward-models.md), so the answer-check pairs
are reported, not required.
"""

from __future__ import annotations

import json

import pytest

from posttrain.rewards import OutcomeRewardModel, ScalarRewardModel
from posttrain.world.evaluate import evaluate_reward_on_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_model(demo_sft_model):
    """The demo's SFT model (conftest.demo_sft_model: trained once per session, shared with the demo run)."""
    return demo_sft_model


def test_margin_rm_learns_requests_and_surface(sft_model, world_with_base, train_rm_briefly):
    """Margin RM (Likert margins), half an epoch (500 steps of 16 of the annotators' 16000 pairs, constant lr) from
    the SFT model, against the gold reward: >= 0.90 on request pairs and on surface pairs (measured 0.962 and 0.989,
    with counterfactual flips 0.965)."""
    model = train_rm_briefly(sft_model, "margin", 500, lr=3e-4, lr_schedule="constant")
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data)
    assert report["pair_accuracy_request"] >= 0.90, report
    assert report["pair_accuracy_surface"] >= 0.90, report


def test_plackett_luce_rm_ranks_correct_answers_first(sft_model, world_with_base, train_rm_briefly):
    """Plackett-Luce on the annotators' 4000 K=4 rankings (under a request, each followed by its counterfactual twin),
    one epoch (250 steps of 16) from the SFT model: its favourite of a held-out ranking is correct more often than a
    random pick, and on pairs it reads the request well above chance (measured request 0.80, surface 0.85,
    counterfactual flips 0.59). The issue's 0.90 on request and surface pairs is NOT met robustly
    (docs/reward-models.md): three epochs reach 0.965 / 0.900 from the demo's SFT model but 0.864 on request pairs
    from this test's (one thread: another float path), and 1000 steps 0.918 / 0.894 there; a ranking holds a rambling
    reply next to its concise twin in about one of nine, so the surface pairs come last."""
    model = train_rm_briefly(sft_model, "plackett_luce", 250, lr=3e-4)
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data)
    assert report["top1_accuracy"] >= report["random_top1"] + 0.10, report
    assert report["pair_accuracy_request"] >= 0.65 and report["pair_accuracy_surface"] >= 0.70, report


def test_orm_selects_correct_answers(world_with_base, train_rm_briefly):
    """Picking the ORM's favourite of the 4 completions of a held-out ranking gives a wrong answer at most half as
    often as picking at random (the fraction of wrong completions; every ranking holds two correct replies, so a
    random pick is right 0.79 of the time; measured: the ORM's 0.976)."""
    model = train_rm_briefly(world_with_base.base_model, "orm", 250)
    report = evaluate_reward_on_world(OutcomeRewardModel(model, device="cpu"), world_with_base.data, limit=250)
    assert 1 - report["top1_accuracy"] <= 0.5 * (1 - report["random_top1"]), report


def test_prm_beats_majority_class(world_with_base, train_rm_briefly):
    """Step accuracy on held-out step-labelled solutions is above always predicting the most common label."""
    model = train_rm_briefly(world_with_base.base_model, "prm", 125)
    step_accuracy = json.loads((model / "complete.json").read_text())["eval"]["step_accuracy"]
    labels = [label for line in (world_with_base.data / "process_heldout.jsonl").read_text().splitlines()
              for label in json.loads(line)["labels"]]
    majority = max(labels.count(v) for v in (-1, 0, 1)) / len(labels)
    assert step_accuracy > majority, (step_accuracy, majority)
