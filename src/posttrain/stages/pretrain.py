"""Pretraining: next-token prediction on plain text (no chat format), from a fresh tiny config or a local model.

Documents are tokenized, each followed by the document separator (``<|endoftext|>`` for the tiny world's
tokenizer, else eos), concatenated and cut into blocks of ``block_size`` tokens (GPT-2 style; the last partial block
is dropped). loss = mean over all positions of -log p(x_{t+1} | x_<=t).
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
from posttrain.data import load_texts
from posttrain.maths import sft_loss
from posttrain.models import load_causal_lm, load_tokenizer, resolve_device
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
class PretrainConfig:
    model: str = option("", "continue pretraining this local model directory; empty = a fresh model from --init")
    init: str = option("world-llama", "architecture for a fresh model: world-llama | world-qwen2 (tiny configs)",
                       choices=("world-llama", "world-qwen2"))
    tokenizer: str = option("", "tokenizer directory for a fresh model; empty = the tiny world's tokenizer")
    data: str = option("", "plain-text rows (column `text`); empty = the tiny world's pretraining corpus")
    eval_data: str = option("", "held-out text rows for eval/loss; empty = none (the world's held-out corpus when data is empty)")
    out: str = option("runs/pretrain", "run directory; the final model goes to out/model")
    columns: dict = option({}, "rename columns, e.g. {content: text}")
    skip_invalid: bool = option(False, "drop malformed rows (reported) instead of stopping")
    block_size: int = option(128, "tokens per training sequence")
    batch_size: int = option(32, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the corpus (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0 = from epochs")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases and norms)")
    warmup_steps: int = option(30, "linear warm-up steps")
    lr_schedule: str = option("cosine", "constant | linear | cosine", choices=("constant", "linear", "cosine"))
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = off")
    seed: int = option(0, "seed for initialisation and batch order")
    precision: str = option("auto", "auto | bf16 | fp32", choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    device: str = option("auto", "auto | cpu | cuda")
    log_every: int = option(10, "log every N steps")
    eval_every: int = option(0, "eval loss every N steps; 0 = only at the end")
    save_every: int = option(200, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = option(2, "checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in out")
    progress: bool = option(True, "show a progress bar")


def token_blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """(num_blocks, block_size) token ids of the concatenated, separator-terminated documents."""
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if separator is None or separator == tokenizer.unk_token_id:
        separator = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(separator)
    usable = (len(stream) // block_size) * block_size
    if usable == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block_size)


def _fill_defaults(config: PretrainConfig) -> PretrainConfig:
    if config.data and (config.model or config.tokenizer):
        return config
    from posttrain.stages import world as build

    paths = build.ensure_world(base_model=False)
    if not config.data:
        config.data = str(paths.data / "pretrain_train.jsonl")
        config.eval_data = config.eval_data or str(paths.data / "pretrain_heldout.jsonl")
    if not config.model and not config.tokenizer:
        config.tokenizer = str(paths.tokenizer)
    return config


def _make_model(config: PretrainConfig, tokenizer, device):
    if config.model:
        return load_causal_lm(config.model, device=device)
    from posttrain.world.model import init_tiny_model

    return init_tiny_model(config.init, tokenizer, seed=config.seed).to(device)


def _next_token_loss(model, block: torch.Tensor, num_tokens=None):
    logits = model(input_ids=block, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    return sft_loss(logits, block[:, 1:], num_tokens=num_tokens)


@torch.no_grad()
def evaluate_blocks(model, blocks: torch.Tensor, batch_size: int, device, precision: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        with autocast(device, precision):
            _, metrics = _next_token_loss(model, blocks[start : start + batch_size].to(device))
        total += float(metrics["nll_sum"])
        count += int(metrics["tokens"])
    model.train()
    return total / max(count, 1)


def train_pretrain(config: PretrainConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run pretraining; returns the final model directory (``out/model``)."""
    config = _fill_defaults(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    run_dir, start_step = prepare_run_dir(config.out, config, resume=config.resume)
    if config.resume and (done := is_complete(run_dir)):
        print(f"{run_dir}: run already complete ({done['steps']} steps); final model in {run_dir / 'model'}. Nothing to do.")
        return run_dir / "model"

    tokenizer = load_tokenizer(config.model or config.tokenizer)
    texts, report = load_texts(config.data, skip_invalid=config.skip_invalid, columns=config.columns or None)
    print(report.summary())
    blocks = token_blocks(texts, tokenizer, config.block_size)
    eval_blocks = None
    if config.eval_data:
        eval_texts, _ = load_texts(config.eval_data, skip_invalid=config.skip_invalid, columns=config.columns or None)
        eval_blocks = token_blocks(eval_texts, tokenizer, config.block_size)

    step_size = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, len(blocks) // step_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    model = _make_model(config, tokenizer, device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps, schedule=config.lr_schedule)
    if start_step:
        load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=optimizer, scheduler=scheduler)
        print(f"resumed from step {start_step} of {total_steps}")
    log = MetricsLog(run_dir, resume_step=start_step)
    batches = batch_indices(len(blocks), step_size, config.seed, start_batch=start_step)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                        extra={"total_steps": total_steps}, keep_last=config.keep_last)

    bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", disable=not config.progress, dynamic_ncols=True)
    step = start_step
    with stop_at_step_boundary() as stop_requested:
        while step < total_steps:
            started = time.perf_counter()
            indices = next(batches)
            per_micro = math.ceil(len(indices) / config.grad_accum)
            num_tokens = len(indices) * (config.block_size - 1)
            loss_sum = 0.0
            for start in range(0, len(indices), per_micro):
                with autocast(device, config.precision):
                    loss, metrics = _next_token_loss(model, blocks[indices[start : start + per_micro]].to(device), num_tokens)
                loss.backward()
                loss_sum += float(metrics["loss"])
            grad_norm = grad_norm_and_clip(model, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                log.log(step, {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                               "train/tokens_per_s": len(indices) * config.block_size / (time.perf_counter() - started),
                               "train/epoch": step / steps_per_epoch})
            if eval_blocks is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                log.log(step, {"eval/loss": evaluate_blocks(model, eval_blocks, config.batch_size, device, config.precision)})
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                checkpoint(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if on_step_end is not None:
                on_step_end(step, {"tokens": len(indices) * config.block_size, "loss": loss_sum})
            if stop_requested:
                bar.close()
                checkpoint(step)
                print(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                raise KeyboardInterrupt
    bar.close()

    if eval_blocks is not None:
        log.log(step, {"eval/loss": evaluate_blocks(model, eval_blocks, config.batch_size, device, config.precision)})
    checkpoint(step)
    log.close()
    return save_final_model(run_dir, model, tokenizer, {"steps": step, "stage": "pretrain"})
