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
from posttrain.stages.rm import RMConfig, train_rm


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
    assert per_step == [pytest.approx(s, abs=1e-5) for s in _hf_step_probabilities(trained["prm"], rows)]
    aggregated = prm(prompts, ["\n".join(r["steps"]) for r in rows])
    assert aggregated == pytest.approx([min(s) for s in per_step], abs=1e-5)
    scores = orm(prompts, ["\n".join(r["steps"]) for r in rows])
    assert scores == pytest.approx([p[-1] for p in _hf_completion_probabilities(
        trained["orm"], prompts, ["\n".join(r["steps"]) for r in rows])], abs=1e-5)


@pytest.mark.parametrize("loss", ["bt", "margin", "kcomparisons", "plackett_luce"])
def test_length_correlation_report_is_the_pearson_correlation_of_scores_and_lengths(trained, loss):
    """The eval report's length bias: Pearson's r (statistics.correlation) between the final model's score of every
    held-out completion and its length in trained tokens (the reply and its end-of-turn token)."""
    import statistics

    from posttrain.data.harmony import completion_message
    from posttrain.data.messages import to_messages
    from posttrain.data.render import render_conversation
    from posttrain.models import load_tokenizer

    path = trained[loss]
    records = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (path.parent.parent / f"{loss}_eval.jsonl").read_text().splitlines()]
    pairs = [(r["prompt"], c) for r in rows for c in (r["completions"] if "completions" in r else
                                                        [r["chosen"], r["rejected"]])]
    scores = ScalarRewardModel(path, device="cpu")([p for p, _ in pairs], [c for _, c in pairs])
    tokenizer = load_tokenizer(path)
    lengths = [float(sum(render_conversation(tokenizer, to_messages(p) + [completion_message(c)],
                                             "final_turn_only")[1])) for p, c in pairs]
    assert records[-1]["eval/length_correlation"] == pytest.approx(statistics.correlation(scores, lengths), abs=1e-3)


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
    assert gold[0] == pytest.approx(1.0 + 0.3 + 0.4 + 0.2) and gold[1] is None  # 9 words: the worked form
    exact = VerifierReward(lambda text, answer: text.strip().endswith(f"{answer}."))
    assert exact(prompts, completions, answer=["5", "5"]) == [1.0, 0.0]
    crashing = VerifierReward(lambda text: 1 / 0)
    assert crashing(prompts, completions) == [None, None]
    total = WeightedSum([(2.0, exact), (1.0, GoldReward())])(prompts, completions, answer=["5", "5"])
    assert total[0] == pytest.approx(2.0 + gold[0]) and total[1] is None  # None propagates


def test_bad_rm_rows_name_file_line_field(world_tokenizer, tmp_path):
    from posttrain.data.io import read_rows
    from posttrain.stages.rm import RMLoss, parse_group

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


def test_shared_prompt_forward_equals_separate_sequences(trained, world):
    """The training forward holds each prompt once (collate_shared_prefix + segment masks); its scores AND its
    gradients equal those of forwarding every (prompt + completion) as its own sequence, HF's padded way."""
    from posttrain.data.packing import collate_padded, collate_shared_prefix
    from posttrain.models import load_tokenizer, use_segment_attention
    from posttrain.stages.rm import RMLoss, _load_model, group_scores, load_groups

    tokenizer = load_tokenizer(trained["kcomparisons"])
    groups, _ = load_groups(world.data / "rankings_heldout.jsonl", tokenizer, RMConfig(loss="kcomparisons"))
    groups = groups[:5]
    batch = collate_shared_prefix([g.examples for g in groups])
    tokens = sum(len(e) for g in groups for e in g.examples)
    assert batch["input_ids"].shape[1] < tokens  # the prompts really are shared
    assert batch["input_ids"].shape[1] == tokens - sum((len(g.examples) - 1) * batch["layout"][i * 4][1]
                                                       for i, g in enumerate(groups))

    def scores_and_grads(shared: bool):
        model = _load_model(str(trained["kcomparisons"]), RMLoss.kcomparisons, tokenizer, "cpu")
        if shared:
            use_segment_attention(model)
            scores = group_scores(model, groups, tokenizer.pad_token_id, "cpu")
        else:
            padded = collate_padded([e for g in groups for e in g.examples], tokenizer.pad_token_id)
            scores = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.view(5, -1)
        (scores * torch.arange(1.0, 21.0).view(5, 4)).sum().backward()
        return scores.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    shared_scores, shared_grads = scores_and_grads(True)
    hf_scores, hf_grads = scores_and_grads(False)
    assert shared_scores.shape == (5, 4)
    torch.testing.assert_close(shared_scores, hf_scores, atol=1e-4, rtol=1e-4)
    assert shared_grads.keys() == hf_grads.keys()
    for name in hf_grads:
        torch.testing.assert_close(shared_grads[name], hf_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_shared_prefix_layout_by_hand():
    from posttrain.data.packing import Example, collate_shared_prefix, flat_index, shared_prefix_length

    a, b, c = Example([5, 6, 7, 8], [0, 0, 1, 1]), Example([5, 6, 9], [0, 0, 1]), Example([5, 6], [0, 1])
    assert shared_prefix_length([a, b]) == 2
    assert shared_prefix_length([a, c]) == 1  # each example keeps its own last token
    batch = collate_shared_prefix([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 5, 7]
    assert batch["segment_masks"][1] is None
    assert batch["segment_masks"][0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # b's own token 9 sees the prompt 5 6, not a's 7 8
    ]
    assert [flat_index(batch["layout"][0], t) for t in range(4)] == [0, 1, 2, 3]
    assert [flat_index(batch["layout"][1], t) for t in range(3)] == [0, 1, 4]
    assert [flat_index(batch["layout"][2], t) for t in range(2)] == [5, 6]


# ---------------------------------------------------------------------------------------------------------------
# Reward specs (posttrain.rewards.reward_from_spec): orm:DIR[:agg], prm:DIR[:agg], rm:DIR, judge:DIR, checked
# against plain HF forwards of the saved models.


def _hf_token_logits(path, ids: list[int]) -> torch.Tensor:
    """(T, labels) logits of AutoModelForTokenClassification on one unpadded sequence."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def _hf_completion_probabilities(path, prompts, completions) -> list[list[float]]:
    """ORM: sigmoid of the logit at every token of the reply (as trained: the reply and its end-of-turn token)."""
    from posttrain.data.harmony import completion_message
    from posttrain.data.messages import to_messages
    from posttrain.data.render import render_conversation
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    out = []
    for prompt, completion in zip(prompts, completions):
        ids, mask = render_conversation(tokenizer, to_messages(prompt) + [completion_message(completion)],
                                        "final_turn_only")
        logits = _hf_token_logits(path, ids)[:, 0]
        out.append([float(torch.sigmoid(logits[t])) for t in range(len(ids)) if mask[t]])
    return out


def _hf_step_probabilities(path, rows) -> list[list[float]]:
    """PRM: P(correct) = softmax(logits)[2] at the token holding each step's last character, the token found from the
    tokenizer's character offsets into the rendered text (steps joined by newlines)."""
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    out = []
    for row in rows:
        reply = "\n".join(row["steps"])
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, ends, position = text.rindex(reply), [], 0
        for step in row["steps"]:
            position += len(step)
            ends.append(start + position - 1)
            position += 1
        tokens = [next(t for t, (a, b) in enumerate(encoded["offset_mapping"]) if a <= end < b) for end in ends]
        probabilities = torch.softmax(_hf_token_logits(path, encoded["input_ids"]), -1)[:, 2]
        out.append([float(probabilities[t]) for t in tokens])
    return out


def test_orm_spec_aggregations(trained, world):
    """orm:DIR is the ORM with `last`; orm:DIR:mean and orm:DIR:min aggregate the per-token P(correct) of the reply;
    on these replies the three differ."""
    from posttrain.rewards import reward_from_spec

    rows = [json.loads(line) for line in (world.data / "outcome_heldout.jsonl").read_text().splitlines()[:4]]
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    per_token = _hf_completion_probabilities(trained["orm"], prompts, completions)
    expected = {"last": [p[-1] for p in per_token], "mean": [sum(p) / len(p) for p in per_token],
                "min": [min(p) for p in per_token]}
    for spec, aggregation in ((f"orm:{trained['orm']}", "last"), (f"orm:{trained['orm']}:last", "last"),
                              (f"orm:{trained['orm']}:mean", "mean"), (f"orm:{trained['orm']}:min", "min")):
        reward = reward_from_spec(spec, device="cpu")
        assert type(reward) is OutcomeRewardModel and reward.aggregation == aggregation, spec
        assert reward(prompts, completions) == pytest.approx(expected[aggregation], abs=1e-5), spec
    assert all(len({round(expected[a][i], 4) for a in expected}) == 3 for i in range(len(rows)))
    with pytest.raises(ValueError, match="ORM aggregation"):
        reward_from_spec(f"orm:{trained['orm']}:product", device="cpu")


def test_prm_spec_aggregations(trained, world):
    """prm:DIR (and rm:DIR of a PRM) aggregate the per-step P(correct) with `min`; prm:DIR:mean / :last / :product
    with theirs, each computed here from the HF per-step vector."""
    from posttrain.rewards import reward_from_spec

    rows = [json.loads(line) for line in (world.data / "process_heldout.jsonl").read_text().splitlines()[:4]]
    prompts, completions = [r["prompt"] for r in rows], ["\n".join(r["steps"]) for r in rows]
    per_step = _hf_step_probabilities(trained["prm"], rows)
    assert [len(s) for s in per_step] == [len(r["steps"]) for r in rows] and min(map(len, per_step)) >= 2
    expected = {"min": [min(s) for s in per_step], "mean": [sum(s) / len(s) for s in per_step],
                "last": [s[-1] for s in per_step], "product": [float(torch.tensor(s).prod()) for s in per_step]}
    path = trained["prm"]
    for spec, aggregation in ((f"prm:{path}", "min"), (f"rm:{path}", "min"), (f"prm:{path}:mean", "mean"),
                              (f"prm:{path}:last", "last"), (f"prm:{path}:product", "product")):
        reward = reward_from_spec(spec, device="cpu")
        assert type(reward) is ProcessRewardModel and reward.aggregation == aggregation, spec
        assert reward(prompts, completions) == pytest.approx(expected[aggregation], abs=1e-5), spec
    assert all(expected["min"][i] < expected["mean"][i] for i in range(len(rows)))  # min really is not mean here
    weighted = reward_from_spec(f"0.5*prm:{path}:mean + 2*orm:{trained['orm']}", device="cpu")
    orm_last = [p[-1] for p in _hf_completion_probabilities(trained["orm"], prompts, completions)]
    assert weighted(prompts, completions) == pytest.approx(
        [0.5 * m + 2 * o for m, o in zip(expected["mean"], orm_last)], abs=1e-5)


def test_judge_spec_rates_with_the_local_model(tiny_model_dir, monkeypatch):
    """judge:DIR is a pointwise MT-Bench judge on the local model in DIR (greedy, 64 new tokens): its reward is the
    rating in the judge's reply (here scripted: 9 for the right answer, 2 for a wrong one, none when unreadable)."""
    import posttrain.models.generation as generation
    from posttrain.rewards import reward_from_spec
    from posttrain.rewards.judge import SINGLE_SYSTEM, JudgeReward, LocalBackend

    seen = []

    def scripted_generate(model, tokenizer, conversations, **kwargs):
        seen.append((model, conversations, kwargs))
        replies = {"The answer is 5.": "Good. Rating: [[9]]", "The answer is 6.": "Wrong. Rating: [[2]]"}
        texts = [next((r for a, r in replies.items() if a in c[-1]["content"]), "hmm") for c in conversations]
        return [generation.Completion(text, [1], "stop") for text in texts]

    monkeypatch.setattr(generation, "generate", scripted_generate)
    reward = reward_from_spec(f"judge:{tiny_model_dir}", device="cpu")
    assert isinstance(reward, JudgeReward) and isinstance(reward.backend, LocalBackend)
    assert reward.backend.max_new_tokens == 64
    prompts = ["What is 2 + 3?"] * 3
    assert reward(prompts, ["The answer is 5.", "The answer is 6.", "No idea."]) == [9.0, 2.0, None]
    model, conversations, kwargs = seen[0]
    assert model is reward.backend.model and model.config.name_or_path == str(tiny_model_dir)
    assert (kwargs["max_new_tokens"], kwargs["temperature"]) == (64, 0.0)
    assert conversations[0][0] == {"role": "system", "content": SINGLE_SYSTEM}
    assert "What is 2 + 3?" in conversations[0][1]["content"] and "The answer is 5." in conversations[0][1]["content"]
    total = reward_from_spec(f"0.5*judge:{tiny_model_dir}+1*gold", device="cpu")
    assert total(prompts[:1], ["The answer is 5."]) == pytest.approx([0.5 * 9 + 1.9])
