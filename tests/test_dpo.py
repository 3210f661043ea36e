"""posttrain dpo: the one-forward log-probs, cached vs live reference, every loss type, data formats, bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.io import DataError
from posttrain.stages.dpo import DPOConfig, load_pairs, load_unpaired, sequence_logps, train_dpo
from posttrain.models import load_causal_lm, load_tokenizer, use_segment_attention


def _small_copy(src, dst, n):
    dst.write_text("\n".join(src.read_text().splitlines()[:n]) + "\n")
    return dst


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return (_small_copy(world.data / "preference_train.jsonl", root / "train.jsonl", 24),
            _small_copy(world.data / "preference_heldout.jsonl", root / "eval.jsonl", 8))


def _config(tiny_model_dir, data, out, **overrides):
    train, held = data
    return DPOConfig(**{**dict(model=str(tiny_model_dir), data=str(train), eval_data=str(held), out=str(out),
                               max_steps=3, batch_size=4, lr=1e-4, warmup_steps=0, progress=False, device="cpu",
                               log_every=1, shuffle=False), **overrides})


def test_sequence_logps_equal_separate_hf_forwards(tiny_model_dir, data):
    """One shared-prompt forward gives, per completion, the sum of log pi over its trained tokens, exactly as a plain
    HF forward of each full sequence on its own."""
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = load_pairs(str(data[0]), tokenizer, DPOConfig(max_length=512))[:5]
    model = load_causal_lm(tiny_model_dir, device="cpu")
    expected = []
    with torch.no_grad():
        for pair in pairs:
            for example in (pair.chosen, pair.rejected):
                ids = torch.tensor([example.input_ids])
                logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
                expected.append(float((logps * torch.tensor(example.loss_mask[1:])).sum()))
        use_segment_attention(model)
        chosen, rejected, chosen_len, rejected_len = sequence_logps(model, pairs, "cpu")
    got = torch.stack([chosen, rejected], dim=1).flatten().tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    assert chosen_len.tolist() == [sum(p.chosen.loss_mask[1:]) for p in pairs]


def test_cached_reference_equals_live_reference(tiny_model_dir, data, tmp_path):
    cached = train_dpo(_config(tiny_model_dir, data, tmp_path / "cached"))
    live = train_dpo(_config(tiny_model_dir, data, tmp_path / "live", precompute_ref=False))
    read = lambda run: [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(cached), read(live)
    assert [r.get("train/loss") for r in a] == pytest.approx([r.get("train/loss") for r in b], abs=1e-6)
    assert a[-1]["eval/rewards/margin"] == pytest.approx(b[-1]["eval/rewards/margin"], abs=1e-6)
    assert list((cached.parent / "reference").glob("ref_logps-*.pt"))  # cached on disk
    assert not (live.parent / "reference").exists()
    # at step 1 the policy IS the reference: every implicit reward is 0 and the DPO loss is log 2
    assert a[0]["train/loss"] == pytest.approx(0.693147, abs=1e-4)
    assert a[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo", "dpo_nll", "simpo", "orpo"])
def test_every_loss_type_trains_and_logs(tiny_model_dir, data, tmp_path, loss):
    model = train_dpo(_config(tiny_model_dir, data, tmp_path / loss, loss=loss, label_smoothing=0.1))
    records = [json.loads(line) for line in (model.parent / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected"} <= set(train[-1])
    reference_free = loss in ("simpo", "orpo")
    assert (model.parent / "reference").exists() != reference_free  # reference-free losses never load one
    assert json.loads((model / "complete.json").read_text())["loss"] == loss


def test_dpo_moves_the_implicit_margin(tiny_model_dir, data, tmp_path):
    """A few steps at a high learning rate on the same pairs raise the training reward margin above 0."""
    model = train_dpo(_config(tiny_model_dir, data, tmp_path / "margin", max_steps=12, lr=1e-3, beta=0.5))
    records = [json.loads(line) for line in (model.parent / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margin"] for r in records if "rewards/margin" in r]
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and max(margins[-3:]) > 0.05


def test_implicit_prompt_pairs_and_bad_rows(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    user = {"role": "user", "content": "What is 1 + 1?"}
    good = {"chosen": [user, {"role": "assistant", "content": "The answer is 2."}],
            "rejected": [user, {"role": "assistant", "content": "The answer is 3."}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": good["chosen"], "rejected": [
        {"role": "user", "content": "Other?"}, {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(str(path), tokenizer, DPOConfig())
    assert "pairs.jsonl" in str(err.value) and "line 2" in str(err.value) and "'rejected'" in str(err.value)
    pairs = load_pairs(str(path), tokenizer, DPOConfig(skip_invalid=True))
    assert len(pairs) == 1
    prompt_ids = pairs[0].chosen.input_ids[: pairs[0].chosen.loss_mask.index(1)]
    assert pairs[0].rejected.input_ids[: len(prompt_ids)] == prompt_ids


def test_win_rate_hand_values():
    """Per prompt, 1 if A's value is higher, 1/2 on a tie, 0 if lower: (1 + 0.5 + 0) / 3. (policy_kl is checked
    against plain HF forwards in test_policy_eval.py.)"""
    from posttrain.world.evaluate import win_rate

    assert win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.3]) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def _unpaired_rows(world, path, n_pairs):
    """KTO rows from the world's first preference pairs: one desirable and one undesirable row per pair, reordered so
    that rows of the same prompt are not neighbours."""
    pairs = [json.loads(line) for line in (world.data / "preference_train.jsonl").read_text().splitlines()[:n_pairs]]
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
    rows += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_mismatched_completions_and_bad_rows(tiny_model_dir, world, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = load_unpaired(str(_unpaired_rows(world, tmp_path / "kto.jsonl", 6)), tokenizer, DPOConfig(loss="kto"))
    assert [e.desirable for e in examples] == [True] * 6 + [False] * 6
    completions = {tuple(e.example.input_ids[e.example.loss_mask.index(1):]) for e in examples}
    for e in examples:
        prompt_len = e.example.loss_mask.index(1)
        # the KL twin keeps the example's prompt and takes a completion of an example with another prompt
        assert e.kl_example.input_ids[:prompt_len] == e.example.input_ids[:prompt_len]
        assert e.kl_example.loss_mask.index(1) == prompt_len
        kl_completion = tuple(e.kl_example.input_ids[prompt_len:])
        assert kl_completion in completions and kl_completion != tuple(e.example.input_ids[prompt_len:])
    # paired data is split into a desirable and an undesirable example; same-prompt neighbours are skipped
    paired = load_unpaired(str(world.data / "preference_heldout.jsonl"), tokenizer, DPOConfig(loss="kto"))
    n_pairs = len((world.data / "preference_heldout.jsonl").read_text().splitlines())
    assert len(paired) == 2 * n_pairs and [e.desirable for e in paired[:4]] == [True, False, True, False]
    assert paired[1].kl_example.input_ids != paired[0].example.input_ids

    bad = tmp_path / "bad.jsonl"
    row = {"prompt": "What is 1 + 1?", "completion": "The answer is 2.", "label": True}
    bad.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "yes"}) + "\n")
    with pytest.raises(DataError) as err:
        load_unpaired(str(bad), tokenizer, DPOConfig(loss="kto"))
    assert "bad.jsonl" in str(err.value) and "line 2" in str(err.value) and "'label'" in str(err.value)
    with pytest.raises(DataError, match="two different prompts"):  # no other prompt to borrow a completion from
        load_unpaired(str(bad), tokenizer, DPOConfig(loss="kto", skip_invalid=True))


def test_kto_trains_with_cached_or_live_reference(tiny_model_dir, world, data, tmp_path):
    train = _unpaired_rows(world, tmp_path / "kto.jsonl", 12)
    runs = {}
    for name, precompute in (("cached", True), ("live", False)):
        model = train_dpo(_config(tiny_model_dir, (train, data[1]), tmp_path / name, loss="kto",
                                  precompute_ref=precompute, desirable_weight=1.2))
        runs[name] = [json.loads(line) for line in (model.parent / "metrics.jsonl").read_text().splitlines()]
    cached, live = runs["cached"], runs["live"]
    assert [r.get("train/loss") for r in cached] == pytest.approx([r.get("train/loss") for r in live], abs=1e-6)
    first = cached[0]
    # step 1: policy = reference, so every r and z0 are 0 and each example's loss is lambda * (1 - sigma(0))
    # and shuffle=False puts the 4 first rows, all desirable, in it: 1.2 * (1 - 1/2)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5) and first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["train/loss"] == pytest.approx(0.6, abs=1e-5)
    assert "rewards/rejected" not in first  # no undesirable example in the batch: left out, not logged as NaN
    assert {"eval/kl", "eval/rewards/chosen", "eval/rewards/rejected", "eval/logps/chosen"} <= set(cached[-1])
    assert cached[-1]["eval/rewards/margin"] == pytest.approx(
        cached[-1]["eval/rewards/chosen"] - cached[-1]["eval/rewards/rejected"], abs=1e-4)
