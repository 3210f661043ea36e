"""Reward-model learning tests on the tiny world (fixed seeds; slow, run in CI).

The pairwise RMs learn what can be seen on the surface (format, a missing answer, rambling) but not yet whether a
stated answer is right: the issue's 95 % / 90 % overall pair accuracies are not met (docs/reward-models.md, Status).
These tests pin what is learned; the demo's Bradley-Terry RM is checked in test_learning.py.
"""

from __future__ import annotations

import json

import pytest

from posttrain.world.evaluate import evaluate_reward_on_world
from posttrain.rewards import OutcomeRewardModel
from posttrain.stages.rm import RMConfig, train_rm

pytestmark = pytest.mark.slow


def _train(world_with_base, tmp_path_factory, loss: str, steps: int):
    out = tmp_path_factory.mktemp(f"rm-{loss}")
    return train_rm(RMConfig(loss=loss, model=str(world_with_base.base_model), out=str(out), max_steps=steps,
                             batch_size=16, progress=False, device="cpu", save_every=0))


def test_margin_rm_learns_surface_preferences(world_with_base, tmp_path_factory):
    """Margin RM (Likert margins), 150 steps: >= 90 % on held-out pairs that do not need the answer checked
    (measured 0.98), and better than chance overall."""
    from posttrain.rewards import ScalarRewardModel

    model = _train(world_with_base, tmp_path_factory, "margin", 150)
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data, limit=300)
    assert report["pair_accuracy_rest"] >= 0.90, report
    assert report["pair_accuracy"] > 0.55, report


def test_plackett_luce_rm_picks_correct_answers(world_with_base, tmp_path_factory):
    """Plackett-Luce on the K=4 rankings, 100 steps: its favourite of a held-out ranking is a correct answer
    >= 20 points more often than a random pick (measured 0.97 vs 0.60)."""
    from posttrain.rewards import ScalarRewardModel

    model = _train(world_with_base, tmp_path_factory, "plackett_luce", 100)
    report = evaluate_reward_on_world(ScalarRewardModel(model, device="cpu"), world_with_base.data, limit=250)
    assert report["top1_accuracy"] >= report["random_top1"] + 0.20, report


def test_orm_selects_correct_answers(world_with_base, tmp_path_factory):
    """Picking the ORM's favourite of the 4 completions of a held-out ranking gives a correct answer >= 20 points
    more often than picking at random (the fraction of correct completions)."""
    model = _train(world_with_base, tmp_path_factory, "orm", 250)
    report = evaluate_reward_on_world(OutcomeRewardModel(model, device="cpu"), world_with_base.data, limit=250)
    assert report["top1_accuracy"] >= report["random_top1"] + 0.20, report


def test_prm_beats_majority_class(world_with_base, tmp_path_factory):
    """Step accuracy on held-out step-labelled solutions is above always predicting the most common label."""
    model = _train(world_with_base, tmp_path_factory, "prm", 125)
    step_accuracy = json.loads((model / "complete.json").read_text())["eval"]["step_accuracy"]
    labels = [label for line in (world_with_base.data / "process_heldout.jsonl").read_text().splitlines()
              for label in json.loads(line)["labels"]]
    majority = max(labels.count(v) for v in (-1, 0, 1)) / len(labels)
    assert step_accuracy > majority, (step_accuracy, majority)
