"""The run harness and every training stage's wiring: kill-and-resume is bit-identical, gradient accumulation equals
one big batch, and the harness's pieces (micro-batch split, weighted means, multi-module checkpoints) are exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.plumbing.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.plumbing.training import WeightedMeans
from posttrain.plumbing.training import micro_batches

STAGES = ["pretrain", "sft", "rm:bt", "rm:margin", "rm:kcomparisons", "rm:plackett_luce", "rm:orm", "rm:prm",
          "dpo:dpo", "dpo:simpo", "dpo:kto"]


def train(stage: str, model_dir: Path, world, out: Path, on_step_end=None, **overrides) -> Path:
    """One tiny run of ``stage`` ("sft", "rm:LOSS", "dpo:LOSS", "pretrain") on held-out tiny-world data."""
    common = dict(model=str(model_dir), out=str(out), max_steps=4, batch_size=2, grad_accum=1, lr=1e-3,
                  warmup_steps=1, save_every=2, log_every=1, progress=False, device="cpu", max_grad_norm=0.0)
    common.update(overrides)
    name, _, loss = stage.partition(":")
    data = world.data
    match name:
        case "pretrain":
            from posttrain.stages.pretrain import PretrainConfig, train_pretrain

            return train_pretrain(PretrainConfig(data=str(data / "pretrain_heldout.jsonl"), block_size=32,
                                                 **common), on_step_end=on_step_end)
        case "sft":
            from posttrain.stages.sft import SFTConfig, train_sft

            return train_sft(SFTConfig(data=str(data / "sft_heldout.jsonl"), **common), on_step_end=on_step_end)
        case "rm":
            from posttrain.stages.rm import WORLD_DATASETS, RMConfig, RMLoss, train_rm

            dataset = WORLD_DATASETS[RMLoss(loss)]
            return train_rm(RMConfig(loss=loss, data=str(data / f"{dataset}_heldout.jsonl"), **common),
                            on_step_end=on_step_end)
        case "dpo":
            from posttrain.stages.dpo import DPOConfig, train_dpo

            # the first 64 pairs: the reference log-probs are precomputed for the whole file, and 4 steps use 8
            pairs = out.parent / "pairs.jsonl"
            pairs.write_text("".join((data / "preference_heldout.jsonl").read_text().splitlines(True)[:64]))
            return train_dpo(DPOConfig(loss=loss, data=str(pairs), **common), on_step_end=on_step_end)
    raise ValueError(stage)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def step_metrics(run_dir: Path, step: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["step"] == step and "train/loss" in r)


class Killed(Exception):
    """Stands in for the process dying inside the loop: no clean-up of ours runs."""


def kill_at(step_to_die: int):
    def hook(step: int, info: dict) -> None:
        if step == step_to_die:
            raise Killed()
    return hook


@pytest.mark.parametrize("stage", STAGES)
def test_killed_and_resumed_run_is_bit_identical(stage, tiny_model_dir, world, tmp_path):
    """Killed after step 3 (the last checkpoint is step 2), resumed: steps 3 and 4 replay exactly (same batches,
    optimizer, scheduler and RNG states) and the final weights equal an uninterrupted run's bit for bit."""
    reference = train(stage, tiny_model_dir, world, tmp_path / "reference")
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(stage, tiny_model_dir, world, out, on_step_end=kill_at(3))
    assert latest_checkpoint(out).name == "step-000002"
    assert not (out / "model").exists()
    resumed = train(stage, tiny_model_dir, world, out, resume=True)
    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys()
    changed = [name for name in expected if not torch.equal(expected[name], weights(tiny_model_dir).get(name, expected[name]))]
    assert changed, "training changed no weight: the comparison would be vacuous"
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses = lambda run_dir: [r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                              if "train/loss" in r]
    assert losses(out) == losses(reference.parent) and len(losses(out)) == 4


def plain_sgd(monkeypatch) -> None:
    """Swap the stage's AdamW for plain SGD: w' = w - lr * g shows the gradient itself (Adam's first step is about
    lr * sign(g), which would hide a wrongly scaled gradient and amplify float noise where g is ~0)."""
    from posttrain.plumbing import training

    monkeypatch.setattr(training, "build_optimizer", lambda model, lr, weight_decay: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr))


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation_equals_one_big_batch(stage, tiny_model_dir, world, tmp_path, monkeypatch):
    """One optimizer step with grad_accum=2, batch_size=2 sees the same 4 units as grad_accum=1, batch_size=4 and
    must give the same loss, the same gradient norm and the same gradient (each micro-batch's loss is normalised
    over the WHOLE step: trained tokens for sft/pretrain/orm, steps for prm, pairs or rankings else; kto's z0 over
    the whole step)."""
    plain_sgd(monkeypatch)
    big = train(stage, tiny_model_dir, world, tmp_path / "big", max_steps=1, batch_size=4, grad_accum=1)
    split = train(stage, tiny_model_dir, world, tmp_path / "split", max_steps=1, batch_size=2, grad_accum=2)
    a, b = step_metrics(big.parent, 1), step_metrics(split.parent, 1)
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7)
    assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
    assert a["train/grad_norm"] > 0
    start, wa, wb = weights(tiny_model_dir), weights(big), weights(split)
    moved = 0
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-8), name  # lr * |g| is ~1e-5
        moved += name in start and not torch.equal(start[name], wa[name])
    assert moved > 0


def test_accumulation_test_catches_per_micro_batch_means(tiny_model_dir, world, tmp_path, monkeypatch):
    """The check above fails when SFT normalises each micro-batch by its own token count (the classic bug)."""
    from posttrain.maths import sft as sft_maths
    from posttrain.stages import sft

    original = sft_maths.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda logits, targets, num_tokens=None: original(logits, targets))
    plain_sgd(monkeypatch)
    big = train("sft", tiny_model_dir, world, tmp_path / "big", max_steps=1, batch_size=4, grad_accum=1)
    split = train("sft", tiny_model_dir, world, tmp_path / "split", max_steps=1, batch_size=2, grad_accum=2)
    a, b = step_metrics(big.parent, 1), step_metrics(split.parent, 1)
    assert b["train/loss"] != pytest.approx(a["train/loss"], rel=1e-3)
    assert b["train/grad_norm"] != pytest.approx(a["train/grad_norm"], rel=1e-3)


def test_micro_batches_cover_the_step_in_order():
    assert micro_batches([7, 8, 9, 10], 2) == [[7, 8], [9, 10]]
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert micro_batches([1, 2, 3], 1) == [[1, 2, 3]]
    assert micro_batches([1, 2, 3], 3) == [[1], [2], [3]]
    assert micro_batches([1, 2], 4) == [[1], [2]]


def test_weighted_means_skip_nan_per_metric():
    means = WeightedMeans()
    means.add({"loss": 1.0, "rewards/chosen": float("nan")}, 0.25)
    means.add({"loss": 3.0, "rewards/chosen": 2.0}, 0.75)
    means.add({"loss": torch.tensor(5.0)}, 1.0)
    result = means.means()
    # loss: (0.25 * 1 + 0.75 * 3 + 1 * 5) / 2 = 7.5 / 2; rewards/chosen: only the second micro-batch
    assert result == {"loss": pytest.approx(3.75), "rewards/chosen": pytest.approx(2.0)}
    assert WeightedMeans().means() == {}


def test_checkpoint_holds_named_modules_optimizers_and_generators(tmp_path):
    """A checkpoint of a policy plus a value head, two optimizers and a sampling generator restores all of them."""
    torch.manual_seed(0)
    policy, value = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=0.1) for name, m in (("policy", policy), ("value", value))}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for name, o in optimizers.items()}
    for module, optimizer, scheduler in zip((policy, value), optimizers.values(), schedulers.values()):
        module(torch.ones(1, module.in_features)).sum().backward()
        optimizer.step()
        scheduler.step()
    sampling = torch.Generator().manual_seed(5)
    sampling_next = torch.rand(3, generator=torch.Generator().manual_seed(5))  # what the saved stream draws next
    save_checkpoint(tmp_path, 7, modules={"policy": policy, "value": value}, optimizers=optimizers,
                    schedulers=schedulers, generators={"sampling": sampling}, extra={"note": 1})
    global_next = torch.rand(2)

    fresh_policy, fresh_value = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    fresh_opt = {n: torch.optim.AdamW(m.parameters(), lr=0.1) for n, m in (("policy", fresh_policy), ("value", fresh_value))}
    fresh_sched = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for n, o in fresh_opt.items()}
    fresh_gen = torch.Generator().manual_seed(123)
    state = load_checkpoint(latest_checkpoint(tmp_path), modules={"policy": fresh_policy, "value": fresh_value},
                            optimizers=fresh_opt, schedulers=fresh_sched, generators={"sampling": fresh_gen})
    assert state["step"] == 7 and state["note"] == 1
    for a, b in ((policy, fresh_policy), (value, fresh_value)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert torch.equal(fresh_opt["value"].state_dict()["state"][0]["exp_avg"],
                       optimizers["value"].state_dict()["state"][0]["exp_avg"])
    assert fresh_sched["policy"].last_epoch == 1
    assert torch.equal(torch.rand(3, generator=fresh_gen), sampling_next)  # the sampling stream continues exactly
    assert torch.equal(torch.rand(2), global_next)  # so does the global one
    with pytest.raises(RuntimeError, match="optimizer"):
        load_checkpoint(latest_checkpoint(tmp_path), modules={"policy": fresh_policy, "value": fresh_value},
                        optimizers={"policy": fresh_opt["policy"]}, schedulers=fresh_sched)
    assert math.isfinite(float(fresh_policy.weight.sum()))


# ---------------------------------------------------------------------------------------------------------------
# plumbing/training.py: the pieces every loop uses, against hand-computed values


def test_step_counts():
    from types import SimpleNamespace

    from posttrain.plumbing.training import step_counts

    config = SimpleNamespace(batch_size=4, grad_accum=2, epochs=2.5, max_steps=0)
    assert step_counts(100, config) == (12, 30)  # 100 // 8 = 12 steps per epoch; ceil(2.5 * 12) = 30
    assert step_counts(5, config) == (1, 3)  # fewer units than a step: still one step per epoch; ceil(2.5)
    config.max_steps = 7
    assert step_counts(100, config) == (12, 7)


def test_optimizer_groups_and_step():
    """AdamW decays matrices but not biases / norm weights; optimizer_step returns the pre-clip norm and the lr the
    step used, clips to max_norm, advances the schedule and zeroes the gradients."""
    from types import SimpleNamespace

    from posttrain.plumbing.training import grad_norm_and_clip, optimizer_and_scheduler, optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    config = SimpleNamespace(lr=0.1, weight_decay=0.5, warmup_steps=2, lr_schedule="constant")
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps=10)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert sorted(p.numel() for p in no_decay["params"]) == [4, 4, 4]  # linear bias, norm weight and bias
    model(torch.ones(2, 3)).pow(2).sum().backward()
    expected_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
    grad_norm, lr = optimizer_step(model, optimizer, scheduler, max_grad_norm=1e-3)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-6) and grad_norm > 1e-3
    assert lr == pytest.approx(0.05)  # warm-up step 1 of 2
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)
    assert all(p.grad is None for p in model.parameters())
    # clipping really scales the gradient to max_norm (and 0 = no clipping still reports the norm)
    model(torch.ones(2, 3)).pow(2).sum().backward()
    before = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
    assert grad_norm_and_clip(model, 0.5) == pytest.approx(before, rel=1e-6)
    assert float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))) == pytest.approx(0.5, rel=1e-5)
    assert grad_norm_and_clip(model, 0.0) == pytest.approx(0.5, rel=1e-5)


def test_autocast_choices():
    from posttrain.plumbing.training import autocast

    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "bf16"), torch.autocast)
    assert not isinstance(autocast(cpu, "auto"), torch.autocast)  # fp32 on CPU, where bf16 is slow
    assert not isinstance(autocast(cpu, "fp32"), torch.autocast)
    with pytest.raises(ValueError, match="precision"):
        autocast(cpu, "fp8")


def test_epoch_order_is_pinned():
    """The data order is a pure function of (seed, epoch), and a checkpoint written by an older posttrain resumes
    onto the same order only if that function never changes: these permutations are pinned (taken from the release
    that introduced them)."""
    from posttrain.plumbing.training import epoch_order

    assert epoch_order(8, seed=3, epoch=0) == [0, 3, 2, 4, 1, 5, 6, 7]
    assert epoch_order(8, seed=3, epoch=1) == [3, 7, 0, 4, 6, 5, 2, 1]
    assert epoch_order(8, seed=0, epoch=1) == [5, 4, 2, 6, 7, 3, 1, 0]
    assert epoch_order(8, seed=3, epoch=1, shuffle=False) == list(range(8))


def test_small_datasets_and_short_runs():
    """Fewer items than a batch: every step sees all of them (one batch per epoch, never an empty one); a fraction of
    an epoch rounds up to whole steps, at least one."""
    from itertools import islice
    from types import SimpleNamespace

    from posttrain.plumbing.training import batch_indices, step_counts

    assert [sorted(b) for b in islice(batch_indices(3, 5, seed=1), 3)] == [[0, 1, 2]] * 3
    config = SimpleNamespace(batch_size=2, grad_accum=1, epochs=0.1, max_steps=0)
    assert step_counts(10, config) == (5, 1)  # ceil(0.1 * 5) = 1
    config.epochs = 0.01
    assert step_counts(10, config) == (5, 1)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_on_a_gpu_device_is_bf16_by_default():
    """On a CUDA device `auto` means bf16 autocast (constructed here without a GPU: torch disables it at run time,
    but the context's dtype and device are what a GPU run gets); fp32 means none."""
    from posttrain.plumbing.training import autocast

    cuda = torch.device("cuda")
    for precision in ("auto", "bf16"):
        context = autocast(cuda, precision)
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16 and context.device == "cuda"
    assert not isinstance(autocast(cuda, "fp32"), torch.autocast)
    assert autocast(torch.device("cpu"), "bf16").fast_dtype == torch.bfloat16


def test_seeding_and_adamw_settings():
    """seed_everything fixes the python and torch streams; AdamW gets the betas and eps it is given and the fused
    kernel on CPU (~4x faster for a small model)."""
    import random

    from posttrain.plumbing.training import build_optimizer, seed_everything

    seed_everything(11)
    first = (random.random(), torch.rand(2))
    seed_everything(11)
    assert random.random() == first[0] and torch.equal(torch.rand(2), first[1])
    seed_everything(12)
    assert random.random() != first[0]
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("fault", ["nan loss", "inf loss", "nan gradient", "inf gradient"])
def test_optimizer_step_skips_a_nonfinite_update(fault):
    """A non-finite loss or gradient: no parameter, optimizer state or schedule moves, the gradients are dropped,
    and the returned norm is non-finite (what the harness counts); the next finite step is a normal one."""
    import math as m

    from posttrain.plumbing import training

    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = training.build_scheduler(optimizer, warmup_steps=2, total_steps=5, schedule="linear")
    before = model.weight.detach().clone()
    scale = {"nan gradient": float("nan"), "inf gradient": float("inf")}.get(fault, 1.0)
    (model(torch.tensor([[3.0, 4.0]])).sum() * scale).backward()
    loss = {"nan loss": float("nan"), "inf loss": float("-inf")}.get(fault, 1.0)
    grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, max_grad_norm=1.0, loss=loss)
    assert not m.isfinite(grad_norm) and lr == pytest.approx(0.05)
    assert torch.equal(model.weight, before) and model.weight.grad is None and not optimizer.state
    assert scheduler.get_last_lr()[0] == pytest.approx(0.05)  # the schedule did not advance
    model(torch.tensor([[3.0, 4.0]])).sum().backward()
    grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, max_grad_norm=1.0, loss=1.0)
    assert grad_norm == pytest.approx(5.0) and lr == pytest.approx(0.05)
    assert not torch.equal(model.weight, before) and scheduler.get_last_lr()[0] == pytest.approx(0.1)


def test_optimizer_step_clips_and_follows_the_schedule():
    """With plain SGD the update shows the clipped gradient: w' = w - lr * g * (max_norm / |g|); the learning rates
    follow warm-up then cosine decay over total_steps (hand values: 0.5, 1, cos(pi/3)=... of peak 0.1)."""
    import math as m
    from types import SimpleNamespace

    from posttrain.plumbing import training

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = training.build_scheduler(optimizer, warmup_steps=2, total_steps=5, schedule="cosine")
    lrs = []
    for _ in range(5):
        model(torch.tensor([[3.0, 4.0]])).sum().backward()  # gradient (3, 4), norm 5
        before = model.weight.detach().clone()
        grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, max_grad_norm=1.0)
        assert grad_norm == pytest.approx(5.0)
        assert torch.allclose(model.weight, before - lr * torch.tensor([[0.6, 0.8]]))  # clipped to norm 1
        lrs.append(lr)
    # warm-up 1/2, 2/2; then cosine over the 3 remaining steps: progress 0, 1/3, 2/3
    expected = [0.05, 0.1] + [0.1 * 0.5 * (1 + m.cos(m.pi * p)) for p in (0, 1 / 3, 2 / 3)]
    assert lrs == pytest.approx(expected)
    config = SimpleNamespace(lr=0.1, weight_decay=0.0, warmup_steps=0, lr_schedule="linear")
    _, linear = training.optimizer_and_scheduler(model, config, total_steps=4)
    linear.step()
    linear.step()
    assert linear.get_last_lr()[0] == pytest.approx(0.05)  # half-way down the linear decay
