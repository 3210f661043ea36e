"""Reward models: training smoke runs of every loss, HF reload parity, the reward interface, bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.io import DataError
from posttrain.rewards import (
    GoldReward,
    OutcomeRewardModel,
    ProcessRewardModel,
    ScalarRewardModel,
    VerifierReward,
    WeightedSum,
    aggregate_steps,
    load_reward_model,
)
from posttrain.rm import RMConfig, train_rm


def _small_copy(src, dst, n: int):
    lines = src.read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="module")
def trained(tiny_model_dir, world, tmp_path_factory):
    """A few steps of each loss from a random tiny Llama on a slice of the world's data."""
    root = tmp_path_factory.mktemp("rm")
    datasets = {"bt": "preference", "margin": "preference", "kcomparisons": "rankings",
                "plackett_luce": "rankings", "orm": "outcome", "prm": "process"}
    models = {}
    for loss, name in datasets.items():
        data = _small_copy(world.data / f"{name}_train.jsonl", root / f"{loss}.jsonl", 24)
        held = _small_copy(world.data / f"{name}_heldout.jsonl", root / f"{loss}_eval.jsonl", 16)
        models[loss] = train_rm(RMConfig(loss=loss, model=str(tiny_model_dir), data=str(data), eval_data=str(held),
                                         out=str(root / loss), max_steps=3, batch_size=8, progress=False,
                                         device="cpu", log_every=1))
    return models


@pytest.mark.parametrize("loss", ["bt", "margin", "kcomparisons", "plackett_luce", "orm", "prm"])
def test_every_loss_trains_and_logs(trained, loss):
    run_dir = trained[loss].parent
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    if loss in ("bt", "margin", "kcomparisons", "plackett_luce"):
        assert {"rm/accuracy", "rm/margin", "rm/chosen_mean", "rm/rejected_mean"} <= set(train[-1])
        assert -1.0 <= records[-1]["eval/length_correlation"] <= 1.0  # the length-bias report
    assert any(k.startswith("eval/") for k in records[-1])
    assert json.loads((trained[loss] / "complete.json").read_text())["loss"] == loss


def test_bt_model_reloads_with_auto_class_and_scores_identically(trained, world):
    """AutoModelForSequenceClassification (num_labels=1) on the saved directory, run the classic way (padded batch,
    attention mask, HF's own pooling of the last non-pad token), gives the same scores as posttrain's padding-free
    reward interface."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = trained["bt"]
    rows = [json.loads(line) for line in (world.data / "preference_heldout.jsonl").read_text().splitlines()[:6]]
    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] for r in rows]
    ours = ScalarRewardModel(path, device="cpu")(prompts, completions)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).logits.squeeze(-1).tolist()
    assert ours == pytest.approx(reference, abs=1e-4)
    assert len(set(round(x, 4) for x in ours)) > 1  # really different scores


def test_orm_and_prm_reload_and_score(trained, world):
    from transformers import AutoModelForTokenClassification

    orm = load_reward_model(trained["orm"], device="cpu")
    prm = load_reward_model(trained["prm"], device="cpu")
    assert isinstance(orm, OutcomeRewardModel) and isinstance(prm, ProcessRewardModel)
    assert AutoModelForTokenClassification.from_pretrained(trained["prm"]).config.num_labels == 3
    rows = [json.loads(line) for line in (world.data / "process_heldout.jsonl").read_text().splitlines()[:4]]
    prompts = [r["prompt"] for r in rows]
    per_step = prm.step_rewards(prompts, [None] * len(rows), steps=[r["steps"] for r in rows])
    assert [len(s) for s in per_step] == [len(r["steps"]) for r in rows]
    assert all(0.0 <= p <= 1.0 for s in per_step for p in s)
    aggregated = prm(prompts, ["\n".join(r["steps"]) for r in rows])
    assert aggregated == pytest.approx([min(s) for s in per_step], abs=1e-5)
    scores = orm(prompts, ["\n".join(r["steps"]) for r in rows])
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_length_sorted_scoring_matches_one_by_one(trained, world):
    rows = [json.loads(line) for line in (world.data / "rankings_heldout.jsonl").read_text().splitlines()[:5]]
    prompts = [r["prompt"] for r in rows for _ in r["completions"]]
    completions = [c for r in rows for c in r["completions"]]
    batched = ScalarRewardModel(trained["kcomparisons"], device="cpu", batch_tokens=400)(prompts, completions)
    single = [ScalarRewardModel(trained["kcomparisons"], device="cpu")([p], [c])[0] for p, c in zip(prompts[:4], completions[:4])]
    assert batched[:4] == pytest.approx(single, abs=1e-4)


def test_aggregations_hand_values():
    steps = [0.9, 0.5, 0.8]
    assert aggregate_steps(steps, "min") == 0.5
    assert aggregate_steps(steps, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps(steps, "last") == 0.8
    assert aggregate_steps(steps, "product") == pytest.approx(0.36)
    assert aggregate_steps([], "min") is None
    with pytest.raises(ValueError):
        aggregate_steps(steps, "median")


def test_gold_verifier_and_weighted_sum():
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], "Not a world question at all"]
    completions = ["2 + 3 = 5. The answer is 5.", "5"]
    gold = GoldReward()(prompts, completions)
    assert gold[0] == pytest.approx(1.0 + 0.3 + 0.2 * (1 - 9 / 60)) and gold[1] is None  # 9 words
    exact = VerifierReward(lambda text, answer: text.strip().endswith(f"{answer}."))
    assert exact(prompts, completions, answer=["5", "5"]) == [1.0, 0.0]
    crashing = VerifierReward(lambda text: 1 / 0)
    assert crashing(prompts, completions) == [None, None]
    total = WeightedSum([(2.0, exact), (1.0, GoldReward())])(prompts, completions, answer=["5", "5"])
    assert total[0] == pytest.approx(2.0 + gold[0]) and total[1] is None  # None propagates


def test_bad_rm_rows_name_file_line_field(world_tokenizer, tmp_path):
    from posttrain.data.io import read_rows
    from posttrain.rm import RMLoss, parse_group

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n"
        + json.dumps({"prompt": "q", "steps": ["a", "b"], "labels": [1]}) + "\n"
        + json.dumps({"prompt": "q", "completion": "a", "label": 7}) + "\n"
    )
    rows = read_rows(bad)
    cases = [(RMLoss.bt, "line 1", "chosen"), (RMLoss.prm, "line 2", "labels"), (RMLoss.orm, "line 3", "label")]
    for (loss, line, field), row in zip(cases, rows):
        with pytest.raises(DataError) as err:
            parse_group(row, world_tokenizer, loss, 1.0)
        assert str(bad) in str(err.value) and line in str(err.value) and f"'{field}'" in str(err.value)
