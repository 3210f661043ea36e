"""Reward-model learning tests on the tiny world (fixed seeds; slow, run in CI).

The Bradley-Terry / margin / Plackett-Luce thresholds of the reward-model issue are not met yet (see
docs/reward-models.md, Status); their tests join this file when they pass.
"""

from __future__ import annotations

import json

import pytest

from posttrain.evaluate import evaluate_reward_on_world
from posttrain.rewards import OutcomeRewardModel
from posttrain.rm import RMConfig, train_rm

pytestmark = pytest.mark.slow


def _train(world_with_base, tmp_path_factory, loss: str, steps: int):
    out = tmp_path_factory.mktemp(f"rm-{loss}")
    return train_rm(RMConfig(loss=loss, model=str(world_with_base.base_model), out=str(out), max_steps=steps,
                             batch_size=16, progress=False, device="cpu", save_every=0))


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
