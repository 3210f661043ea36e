"""Supervised (instruction) fine-tuning: cross-entropy on the assistant tokens only.

    loss = -(1/N) sum over trained tokens t of log p_theta(y_t | y_<t)      (RLHF book, instruction-tuning chapter)

N counts the trained tokens of the whole optimizer step, so gradient accumulation gives the same gradient as one big
batch (the mean of per-micro-batch means would over-weight short micro-batches).

The loop, top to bottom: load tokenizer/model -> render data (one rendering path) -> for each step: gather a batch,
pack it padding-free, forward the backbone, LM head on trained positions only, backward, clip, AdamW, schedule ->
log / eval / checkpoint. Batches are a pure function of (seed, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from posttrain.plumbing.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.plumbing.config import option
from posttrain.data import Example, collate_flat, first_fit_decreasing, load_sft_examples
from posttrain.maths import sft_loss
from posttrain.models import (
    load_causal_lm,
    load_tokenizer,
    resize_for_tokenizer,
    resolve_device,
    trained_token_logits,
    use_segment_attention,
)
from posttrain.plumbing.runlog import MetricsLog
from posttrain.plumbing.training import (
    autocast,
    batch_indices,
    build_optimizer,
    build_scheduler,
    grad_norm_and_clip,
    is_complete,
    prepare_run_dir,
    save_final_model,
    seed_everything,
    stop_at_step_boundary,
)


@dataclass
class SFTConfig:
    model: str = option("", "local Hugging Face causal-LM directory; empty = the tiny world's base model (built if missing)")
    data: str = option("", "training conversations (.jsonl/.json/.parquet/datasets dir); empty = the tiny world's SFT set")
    eval_data: str = option("", "held-out conversations for eval/loss; empty = none (the tiny world's held-out set when data is empty)")
    out: str = option("runs/sft", "run directory (config, metrics, plots, checkpoints, final model in out/model)")
    chat_template: str = option("", "chatml | zephyr | tulu | a Jinja string; empty = the tokenizer's own template")
    strategy: str = option("all_assistant_turns", "multi-turn loss: all_assistant_turns | final_turn_only",
                           choices=("all_assistant_turns", "final_turn_only"))
    columns: dict = option({}, "rename columns, e.g. {conversation: messages}")
    skip_invalid: bool = option(False, "drop malformed rows (reported with counts and reasons) instead of stopping")
    max_length: int = option(512, "longest example in tokens")
    truncation: str = option("drop", "over-long examples: drop (counted) | right (keep the first max_length tokens)",
                             choices=("drop", "right"))
    packing: bool = option(False, "pack several examples per row of max_length tokens (attention stays within each example)")
    batch_size: int = option(16, "examples (rows when packing) per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(3.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0 = from epochs")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_steps: int = option(10, "linear warm-up steps")
    lr_schedule: str = option("cosine", "constant | linear | cosine (decay after warm-up)",
                              choices=("constant", "linear", "cosine"))
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = off")
    shuffle: bool = option(True, "shuffle the examples every epoch (seeded); false = file order")
    seed: int = option(0, "seed for the batch order")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32",
                            choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = option(1, "log train metrics every N steps")
    eval_every: int = option(0, "eval loss every N steps; 0 = only at the end")
    save_every: int = option(50, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = option(2, "checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in out")
    progress: bool = option(True, "show a progress bar")


def _default_world_paths(config: SFTConfig) -> SFTConfig:
    """Fill empty model/data with the tiny world's (building and caching them if needed)."""
    if config.model and config.data:
        return config
    from posttrain.stages import world as build

    paths = build.ensure_world(base_model=not config.model)
    if not config.model:
        config.model = str(paths.base_model)
    if not config.data:
        config.data = str(paths.data / "sft_train.jsonl")
        config.eval_data = config.eval_data or str(paths.data / "sft_heldout.jsonl")
    return config


def _micro_batches(items: list[list[Example]], indices: list[int], grad_accum: int, pad_id: int):
    """Split one optimizer step's items into ``grad_accum`` micro-batches, each one padding-free row."""
    per_micro = math.ceil(len(indices) / grad_accum)
    for start in range(0, len(indices), per_micro):
        yield collate_flat([ex for i in indices[start : start + per_micro] for ex in items[i]], pad_id)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, device, precision) -> float:
    """Token-mean NLL of the assistant tokens over all of ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_flat(examples[start : start + batch_size], pad_id).items()}
        with autocast(device, precision):
            logits, targets = trained_token_logits(model, batch)
        _, metrics = sft_loss(logits, targets)
        total += float(metrics["nll_sum"])
        count += int(metrics["tokens"])
    model.train()
    return total / max(count, 1)


def train_sft(config: SFTConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run SFT; returns the directory of the final model (``out/model``).

    ``on_step_end(step, info)`` is called after every optimizer step with ``info = {"tokens": fed tokens,
    "trained_tokens": ..., "loss": ...}`` (benchmarks and tests hook in here).
    """
    config = _default_world_paths(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    run_dir, start_step = prepare_run_dir(config.out, config, resume=config.resume)
    if config.resume and (done := is_complete(run_dir)):
        print(f"{run_dir}: run already complete ({done['steps']} steps); final model in {run_dir / 'model'}. Nothing to do.")
        return run_dir / "model"

    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    load_kwargs = dict(
        strategy=config.strategy, max_length=config.max_length, truncation=config.truncation,
        skip_invalid=config.skip_invalid, columns=config.columns or None,
    )
    examples, report = load_sft_examples(config.data, tokenizer, **load_kwargs)
    print(report.summary())
    eval_examples = load_sft_examples(config.eval_data, tokenizer, **load_kwargs)[0] if config.eval_data else []

    if config.packing:  # rows of up to max_length tokens, several examples each
        bins = first_fit_decreasing([len(e) for e in examples], config.max_length)
        items = [[examples[i] for i in row] for row in bins]
    else:
        items = [[e] for e in examples]
    step_size = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, len(items) // step_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    model = load_causal_lm(config.model, device=device)
    resize_for_tokenizer(model, tokenizer)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    use_segment_attention(model)
    model.train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps, schedule=config.lr_schedule)
    if start_step:
        load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=optimizer, scheduler=scheduler)
        print(f"resumed from step {start_step} of {total_steps}")
    log = MetricsLog(run_dir, resume_step=start_step)
    pad_id = tokenizer.pad_token_id
    batches = batch_indices(len(items), step_size, config.seed, shuffle=config.shuffle, start_batch=start_step)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                        extra={"total_steps": total_steps}, keep_last=config.keep_last)

    bar = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not config.progress, dynamic_ncols=True)
    step = start_step
    with stop_at_step_boundary() as stop_requested:
        while step < total_steps:
            started = time.perf_counter()
            indices = next(batches)
            micro = [{k: v.to(device) for k, v in mb.items()}
                     for mb in _micro_batches(items, indices, config.grad_accum, pad_id)]
            num_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
            loss_sum = 0.0
            for batch in micro:
                with autocast(device, config.precision):
                    logits, targets = trained_token_logits(model, batch)
                loss, metrics = sft_loss(logits, targets, num_tokens=num_tokens)
                loss.backward()
                loss_sum += float(metrics["loss"])
            grad_norm = grad_norm_and_clip(model, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            fed = sum(int((mb["input_ids"] != pad_id).sum()) for mb in micro)
            if step % config.log_every == 0 or step == total_steps:
                log.log(step, {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                               "train/tokens_per_s": fed / elapsed, "train/trained_tokens": num_tokens,
                               "train/epoch": step / steps_per_epoch})
            if eval_examples and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                log.log(step, {"eval/loss": evaluate_loss(model, eval_examples, batch_size=config.batch_size,
                                                           pad_id=pad_id, device=device, precision=config.precision)})
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                checkpoint(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            if on_step_end is not None:
                on_step_end(step, {"tokens": fed, "trained_tokens": num_tokens, "loss": loss_sum})
            if stop_requested:
                bar.close()
                checkpoint(step)
                print(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                raise KeyboardInterrupt
    bar.close()

    if eval_examples:
        log.log(step, {"eval/loss": evaluate_loss(model, eval_examples, batch_size=config.batch_size,
                                                   pad_id=pad_id, device=device, precision=config.precision)})
    checkpoint(step)
    log.close()
    return save_final_model(run_dir, model, tokenizer, {"steps": step, "stage": "sft"})
