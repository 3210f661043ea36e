"""Training helpers as plain functions: seeding, batch order, micro-batch split, optimizer, schedule, precision,
gradient clipping. The run's plumbing (directory, resume, checkpoints, logs, signals) is ``posttrain.plumbing.harness``;
each stage keeps its own loop visible in its own file.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The item order of one epoch, a pure function of (seed, epoch): resume needs no sampler state."""
    if not shuffle:
        return list(range(num_items))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def batch_indices(num_items: int, batch_size: int, seed: int, shuffle: bool = True, start_batch: int = 0) -> Iterator[list[int]]:
    """Endless stream of batches of item indices, epoch after epoch (the last partial batch of an epoch is dropped
    unless the dataset is smaller than a batch); ``start_batch`` skips ahead exactly (resume)."""
    per_epoch = max(1, num_items // batch_size)
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        order = epoch_order(num_items, seed, epoch, shuffle)
        for b in range(offset, per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    """One optimizer step's item indices cut into (at most) ``grad_accum`` consecutive micro-batches of
    ``ceil(len / grad_accum)`` items (the last may be smaller)."""
    per_micro = math.ceil(len(indices) / grad_accum)
    return [indices[start : start + per_micro] for start in range(0, len(indices), per_micro)]


def step_counts(num_items: int, config) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of a run over ``num_items`` training units: ``config.max_steps``
    when set, else ``config.epochs`` passes of ``batch_size * grad_accum`` units per step."""
    steps_per_epoch = max(1, num_items // (config.batch_size * config.grad_accum))
    return steps_per_epoch, config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


class WeightedMeans:
    """Weighted means of step metrics over micro-batches: ``add(metrics, weight)`` then ``means()``.

    A NaN value (a KTO micro-batch with no desirable example has no rewards/chosen) is left out of its metric's
    mean rather than spoiling it; the other metrics of that micro-batch still count.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # key -> [weighted sum, total weight]

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for key, value in metrics.items():
            value = float(value)
            if not math.isnan(value):
                total = self.totals.setdefault(key, [0.0, 0.0])
                total[0] += value * weight
                total[1] += weight

    def means(self, procs=None) -> dict[str, float]:
        """The weighted means; with ``procs`` (several processes), over every rank's micro-batches."""
        totals = self.totals
        if procs is not None and procs.world > 1:
            totals = {}
            for part in procs.gather(self.totals):
                for key, (total, weight) in part.items():
                    merged = totals.setdefault(key, [0.0, 0.0])
                    merged[0] += total
                    merged[1] += weight
        return {key: total / weight for key, (total, weight) in totals.items()}


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW; no weight decay on biases and norm weights (1-D parameters), the usual convention."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is ~4x faster than the default for-each one on a small model.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then ``constant``, ``linear`` or ``cosine`` decay to
    ``min_lr_ratio`` at ``total_steps``. ``step`` counts optimizer steps already taken (0 for the first)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: use constant, linear or cosine")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule),
    )


def optimizer_and_scheduler(model, config, total_steps: int):
    """AdamW (``config.lr``, ``config.weight_decay``) and its warm-up + decay schedule over ``total_steps``."""
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    return optimizer, build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                      schedule=config.lr_schedule)


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, *, loss: float | None = None
                   ) -> tuple[float, float]:
    """Clip, step, schedule, zero the gradients; returns (gradient norm before clipping, the step's learning rate).

    A non-finite ``loss`` or gradient norm skips the update: the optimizer and the schedule are left untouched and the
    gradients dropped, and the returned norm is non-finite (nan for a bad loss), which the harness counts as a
    skipped step (``Run.end_step``) and stops the run on after ``max_bad_steps`` in a row."""
    grad_norm = grad_norm_and_clip(model, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    if not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(float(loss))):
        grad_norm = grad_norm if not math.isfinite(grad_norm) else math.nan
    else:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def autocast(device: torch.device, precision: str):
    """bf16 autocast on a GPU when asked (``auto`` = bf16 on CUDA, fp32 on CPU, where bf16 is ~10x slower)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}: use auto, bf16 or fp32")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_norm_and_clip(model, max_norm: float) -> float:
    """The global gradient norm, after clipping it to ``max_norm`` when that is positive. Under DDP the gradients
    are already reduced (every rank gets the same norm); under FSDP they are sharded DTensors, whose norm
    ``clip_grad_norm_`` reduces over the shards."""
    params = [p for p in model.parameters() if p.grad is not None]
    sharded = any(hasattr(p.grad, "full_tensor") for p in params)
    if (max_norm and max_norm > 0) or sharded:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
