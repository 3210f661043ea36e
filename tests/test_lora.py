"""LoRA through peft on the tiny world: SFT, DPO, GRPO and a reward model train adapters only; adapters save and
load in peft's format, resume exactly, merge into a plain model; the reference of DPO and RL is the starting model
with its adapters disabled (no second copy is loaded)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli
from posttrain.models import load_causal_lm, load_tokenizer

LORA = dict(lora_r=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj,gate_proj")


class Killed(Exception):
    """Raised from the step hook: the process dies there, nothing of ours cleans up."""


def sft_config(tiny_model_dir, world, out, **overrides):
    from posttrain.stages.sft import SFTConfig

    return SFTConfig(**{**dict(model=str(tiny_model_dir), data=str(world.data / "sft_heldout.jsonl"), out=str(out),
                               max_steps=24, batch_size=8, lr=1e-2, warmup_steps=0, lr_schedule="constant",
                               save_every=4, log_every=1, progress=False, device="cpu"), **LORA, **overrides})


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_sft(tiny_model_dir, world, tmp_path_factory):
    from posttrain.stages.sft import train_sft

    out = tmp_path_factory.mktemp("lora-sft")
    return train_sft(sft_config(tiny_model_dir, world, out))


def test_lora_sft_trains_only_adapters_and_saves_them_in_peft_format(lora_sft, tiny_model_dir):
    from peft import PeftModel

    config = json.loads((lora_sft / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["gate_proj", "q_proj", "v_proj"]
    saved = load_file(str(lora_sft / "adapter_model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)  # the adapters and nothing else
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it trained

    records = [json.loads(line) for line in (lora_sft.parent / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["train/loss"], sum(r["train/loss"] for r in records[-4:]) / 4
    assert last < first - 0.5, (first, last)  # the adapters alone fit the data (random base, 24 steps)

    # peft loads it as its own; posttrain loads the directory as a model (base + adapter merged): same outputs
    ids = torch.tensor([[5, 17, 33, 9, 41, 2, 8]])
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(lora_sft)).eval()
    merged = load_causal_lm(lora_sft).eval()
    base = load_causal_lm(tiny_model_dir).eval()
    torch.testing.assert_close(logits_of(merged, ids), logits_of(peft_model, ids), rtol=1e-4, atol=1e-4)
    assert float((logits_of(merged, ids) - logits_of(base, ids)).abs().max()) > 1e-2
    merged_weights, base_weights = merged.state_dict(), base.state_dict()
    changed = {k for k in base_weights if not torch.equal(merged_weights[k], base_weights[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight")) for k in changed)


def test_posttrain_merge_writes_a_plain_model(lora_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli.main(["merge", f"--adapter={lora_sft}", f"--out={out}"]) == 0
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 33, 9, 41]])
    torch.testing.assert_close(logits_of(plain, ids), logits_of(load_causal_lm(lora_sft).eval(), ids))
    assert load_tokenizer(out).get_vocab() == load_tokenizer(lora_sft).get_vocab()
    assert cli.main(["merge", f"--adapter={out}", f"--out={tmp_path / 'again'}"]) == 2  # not an adapter: clear error


def test_lora_run_killed_then_resumed_is_bit_exact(lora_sft, tiny_model_dir, world, tmp_path):
    from posttrain.stages.sft import train_sft

    def die_at_10(step, info):
        if step == 10:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_sft(sft_config(tiny_model_dir, world, out), on_step_end=die_at_10)
    final = train_sft(sft_config(tiny_model_dir, world, out, resume=True))  # from step 8
    expected, got = load_file(str(lora_sft / "adapter_model.safetensors")), load_file(
        str(final / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def count_loads(monkeypatch, module) -> list[str]:
    """Record every load_causal_lm call the stage makes."""
    calls: list[str] = []
    original = module.load_causal_lm

    def counting(path, **kwargs):
        calls.append(str(path))
        return original(path, **kwargs)

    monkeypatch.setattr(module, "load_causal_lm", counting)
    return calls


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_lora_dpo_reference_is_the_adapter_disabled_policy(precompute_ref, tiny_model_dir, world, tmp_path,
                                                           monkeypatch):
    from posttrain.stages import dpo

    pairs = tmp_path / "pairs.jsonl"  # 16 pairs, 4 epochs: the adapters must fit them
    pairs.write_text("".join((world.data / "preference_heldout.jsonl").read_text().splitlines(True)[:16]))
    loads = count_loads(monkeypatch, dpo)
    config = dpo.DPOConfig(model=str(tiny_model_dir), data=str(pairs), eval_data=str(pairs), out=str(tmp_path / "dpo"),
                           max_steps=16, batch_size=4, lr=1e-2, warmup_steps=0, lr_schedule="constant", log_every=1,
                           progress=False, device="cpu", precompute_ref=precompute_ref, **LORA)
    final = dpo.train_dpo(config)
    assert loads == [str(tiny_model_dir)]  # the policy only: no reference copy
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    # B = 0 at the start, so the policy is its reference: implicit rewards 0 and the loss log 2 at step 1 ...
    assert records[0]["rewards/chosen"] == 0.0 and records[0]["rewards/rejected"] == 0.0
    assert records[0]["train/loss"] == pytest.approx(0.6931472, abs=1e-6)
    # ... then the adapters move the policy away from the (fixed) reference: DPO separates the pairs it trained on
    evaluation = records[-1]
    assert evaluation["eval/rewards/accuracy"] >= 0.9 and evaluation["eval/loss"] < 0.5, evaluation
    assert (final / "adapter_config.json").exists()


def test_lora_grpo_reference_is_the_adapter_disabled_policy(tiny_model_dir, world, tmp_path, monkeypatch):
    from posttrain.stages import rl

    loads = count_loads(monkeypatch, rl)
    config = rl.RLConfig(model=str(tiny_model_dir), data=str(world.data / "rl_train.jsonl"), reward="gold",
                         out=str(tmp_path / "grpo"), max_steps=3, batch_size=2, group_size=4, max_new_tokens=12,
                         beta=0.1, lr=3e-2, warmup_steps=0, log_every=1, progress=False, device="cpu", seed=1,
                         **LORA)
    final = rl.train_rl(config)
    assert loads == [str(tiny_model_dir)]
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["policy/kl"] == 0.0  # the policy is its reference before the first update
    assert records[-1]["policy/kl"] > 0.0  # and not after: the reference stayed the base
    assert (final / "adapter_config.json").exists()


def test_lora_reward_model_saves_its_head_and_scores_the_same_after_loading(tiny_model_dir, world, tmp_path):
    from posttrain.models.heads import load_head_model
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.rm import RMConfig, train_rm

    final = train_rm(RMConfig(model=str(tiny_model_dir), data=str(world.data / "preference_heldout.jsonl"),
                              out=str(tmp_path / "rm"), max_steps=3, batch_size=4, lr=1e-2, progress=False,
                              device="cpu", **LORA))
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert any(".score." in f".{k}" for k in saved)  # the head is trained in full and saved with the adapters
    reward = reward_from_spec(f"rm:{final}", device="cpu")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    first = reward(prompts, ["5", "It is 7."])
    merged = tmp_path / "merged-rm"
    assert cli.main(["merge", f"--adapter={final}", f"--out={merged}"]) == 0
    assert reward_from_spec(f"rm:{merged}", device="cpu")(prompts, ["5", "It is 7."]) == pytest.approx(first,
                                                                                                       abs=1e-5)
    assert type(load_head_model(merged, "scalar")).__name__.endswith("ForSequenceClassification")


def test_load_in_4bit_needs_lora_and_bitsandbytes(tiny_model_dir, world, tmp_path, capsys):
    base = ["sft", f"--model={tiny_model_dir}", f"--data={world.data / 'sft_heldout.jsonl'}", "--max_steps=1",
            "--progress=false", "--device=cpu"]
    assert cli.main([*base, f"--out={tmp_path / 'a'}", "--load_in_4bit"]) == 2
    assert "set --lora_r" in capsys.readouterr().err
    assert cli.main([*base, f"--out={tmp_path / 'b'}", "--load_in_4bit", "--lora_r=4"]) == 2
    err = capsys.readouterr().err  # this machine has neither bitsandbytes nor a GPU: whichever is missing is named
    assert ("needs bitsandbytes" in err) if importlib.util.find_spec("bitsandbytes") is None else ("CUDA GPU" in err)
