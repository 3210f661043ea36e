"""Reward-model learning tests on the tiny world (fixed seeds; slow, run in CI).

The margin and Plackett-Luce RMs start from the shared demo run's SFT model (as the demo's Bradley-Terry RM does,
checked in test_learning.py) and train for one epoch of the annotators' noisy, length-biased data; they are scored
against the gold reward on held-out questions. Whether a stated answer is right stays out of reach of a 2 M-parameter
RM (docs/reward-models.md), so the answer-check pairs are reported, not required.
"""

from __future__ import annotations

import json

import pytest

from posttrain.rewards import OutcomeRewardModel, ScalarRewardModel
from posttrain.stages.rm import RMConfig, train_rm
from posttrain.world.evaluate import evaluate_reward_on_world

pytestmark = pytest.mark.slow


def _train(start, tmp_path_factory, loss: str, steps: int, **options):
    out = tmp_path_factory.mktemp(f"rm-{loss}")
    return train_rm(RMConfig(loss=loss, model=str(start), out=str(out), max_steps=steps, batch_size=16,
                             progress=False, device="cpu", save_every=0, **options))


@pytest.fixture(scope="module")
def sft_model(demo_run):
    out, _ = demo_run
    return out / "sft" / "model"


@pytest.mark.xdist_group("demo")  # starts from the shared demo run's SFT model
def test_margin_rm_learns_requests_and_surface(sft_model, world_with_base, tmp_path_factory):
    """Margin RM (Likert margins), half an epoch (500 steps of 16 of the annotators' 16000 pairs, constant lr) from
    the SFT model, against the gold reward: >= 0.90 on request pairs and on surface pairs (measured 0.962 and 0.989,
    with counterfactual flips 0.965)."""
    model = _train(sft_model, tmp_path_factory, "margin", 500, lr=3e-4, lr_schedule="constant")
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data)
    assert report["pair_accuracy_request"] >= 0.90, report
    assert report["pair_accuracy_surface"] >= 0.90, report


@pytest.mark.xdist_group("demo")
def test_plackett_luce_rm_ranks_correct_answers_first(sft_model, world_with_base, tmp_path_factory):
    """Plackett-Luce on the annotators' 4000 K=4 rankings (under a request, each followed by its counterfactual twin),
    one epoch (250 steps of 16) from the SFT model: its favourite of a held-out ranking is correct more often than a
    random pick, and on pairs it reads the request well above chance (measured request 0.80, surface 0.85,
    counterfactual flips 0.59; 0.52 / 0.59 / 0.08 with the earlier 2000 rankings without twins). The issue's 0.90 on
    request and surface pairs is NOT met (docs/reward-models.md): a ranking's likelihood is mostly about which
    replies are right and well formed."""
    model = _train(sft_model, tmp_path_factory, "plackett_luce", 250, lr=3e-4)
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data)
    assert report["top1_accuracy"] >= report["random_top1"] + 0.10, report
    assert report["pair_accuracy_request"] >= 0.65 and report["pair_accuracy_surface"] >= 0.70, report


def test_orm_selects_correct_answers(world_with_base, tmp_path_factory):
    """Picking the ORM's favourite of the 4 completions of a held-out ranking gives a correct answer >= 20 points
    more often than picking at random (the fraction of correct completions)."""
    model = _train(world_with_base.base_model, tmp_path_factory, "orm", 250)
    report = evaluate_reward_on_world(OutcomeRewardModel(model, device="cpu"), world_with_base.data, limit=250)
    assert report["top1_accuracy"] >= report["random_top1"] + 0.20, report


def test_prm_beats_majority_class(world_with_base, tmp_path_factory):
    """Step accuracy on held-out step-labelled solutions is above always predicting the most common label."""
    model = _train(world_with_base.base_model, tmp_path_factory, "prm", 125)
    step_accuracy = json.loads((model / "complete.json").read_text())["eval"]["step_accuracy"]
    labels = [label for line in (world_with_base.data / "process_heldout.jsonl").read_text().splitlines()
              for label in json.loads(line)["labels"]]
    majority = max(labels.count(v) for v in (-1, 0, 1)) / len(labels)
    assert step_accuracy > majority, (step_accuracy, majority)
