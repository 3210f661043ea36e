"""Pretraining: next-token prediction on plain text (no chat format), from a fresh tiny config or a local model.

Documents are tokenized, each followed by the document separator (``<|endoftext|>`` for the tiny world's
tokenizer, else eos), concatenated and cut into blocks of ``block_size`` tokens (GPT-2 style; the last partial block
is dropped). loss = mean over all positions of -log p(x_{t+1} | x_<=t).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from posttrain.data import load_texts
from posttrain.maths.sft import sft_loss
from posttrain.models import load_causal_lm, load_tokenizer, prepare_for_training, resolve_device
from posttrain.plumbing.config import TrainConfig, option, stage_config
from posttrain.plumbing.harness import Run
from posttrain.plumbing.training import (autocast, batch_indices, micro_batches, optimizer_and_scheduler,
                                         optimizer_step, step_counts)


@stage_config
class PretrainConfig(TrainConfig):
    init: str = option("world-llama", "architecture for a fresh model (when model is empty): world-llama | "
                                      "world-qwen2 (tiny configs)", choices=("world-llama", "world-qwen2"))
    tokenizer: str = option("", "tokenizer directory for a fresh model; empty = the tiny world's tokenizer")
    block_size: int = option(128, "tokens per training sequence (documents are concatenated and cut into blocks)",
                             minimum=2)
    model: str = option("", "continue pretraining this local model directory; empty = a fresh model from --init")
    out: str = "runs/pretrain"
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    log_every: int = 10
    save_every: int = 200


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
    from posttrain.world.cache import ensure_world_data

    paths = ensure_world_data()
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
def evaluate_blocks(model, blocks: torch.Tensor, batch_size: int, device, precision: str, forward=None,
                    procs=None) -> float:
    """Token-mean NLL over ``blocks`` (under DDP, ``procs``: each rank every world-th block through ``forward``,
    the sums reduced; under FSDP every rank runs them all, as every sharded forward is a collective)."""
    forward = forward or (lambda fn, *args: fn(model, *args))
    shard = procs is not None and procs.world > 1 and procs.kind != "fsdp"
    if shard:
        blocks = blocks[procs.rank :: procs.world]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        with autocast(device, precision):
            _, metrics = forward(_next_token_loss, blocks[start : start + batch_size].to(device))
        total += float(metrics["nll_sum"])
        count += int(metrics["tokens"])
    model.train()
    if shard:
        total, count = procs.sum(total, count)
    return total / max(count, 1)


def train_pretrain(config: PretrainConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run pretraining; returns the final model directory (``out/model``)."""
    config = _fill_defaults(config)
    device = resolve_device(config.device)
    run = Run(config, "pretrain", on_step_end=on_step_end)
    if run.complete:
        return run.final_dir

    tokenizer = load_tokenizer(config.model or config.tokenizer)
    texts, report = load_texts(config.data, skip_invalid=config.skip_invalid, columns=config.columns or None)
    print(report.summary())
    blocks = token_blocks(texts, tokenizer, config.block_size)
    eval_blocks = None
    if config.eval_data:
        eval_texts, _ = load_texts(config.eval_data, skip_invalid=config.skip_invalid, columns=config.columns or None)
        eval_blocks = token_blocks(eval_texts, tokenizer, config.block_size)

    step_size = config.batch_size * config.grad_accum
    steps_per_epoch, total_steps = step_counts(len(blocks), config)
    model = _make_model(config, tokenizer, device)
    prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing, segment_attention=False,
                         compile=config.compile)
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps)
    procs = run.procs  # one process, or this rank of an accelerate launch (DDP / FSDP): plumbing/distributed.py
    forward, optimizer = procs.prepare(model, optimizer)  # forward(fn, x) = fn(model, x) through DDP/FSDP
    run.start(total_steps, modules={"model": model}, optimizers={"model": optimizer},
              schedulers={"model": scheduler}, tokenizer=tokenizer)
    batches = batch_indices(len(blocks), step_size, config.seed, shuffle=config.shuffle, start_batch=run.start_step)
    evaluate = lambda: evaluate_blocks(model, eval_blocks, config.batch_size, device, config.precision,  # noqa: E731
                                       forward, procs)

    with run:
        for step in run.steps():
            indices = next(batches)
            num_tokens = len(indices) * (config.block_size - 1)  # every position predicts, in the whole step (global)
            loss_sum = 0.0
            chunks = micro_batches(procs.shard(indices), config.grad_accum)  # this rank's share of the step
            for i, chunk in enumerate(chunks):
                with procs.accumulating(forward, last=i == len(chunks) - 1):
                    with autocast(device, config.precision):
                        loss, metrics = forward(_next_token_loss, blocks[chunk].to(device), num_tokens)
                    procs.backward(loss)
                loss_sum += float(metrics["loss"])
            loss_sum = procs.sum(loss_sum)
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, config.max_grad_norm, loss=loss_sum)

            if eval_blocks is not None and run.eval_due(step):
                run.log_metrics(step, {"eval/loss": evaluate()})
            run.end_step(step, {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                                "train/epoch": step / steps_per_epoch},
                         tokens=len(indices) * config.block_size, loss=loss_sum)

    if eval_blocks is not None:
        run.log_metrics(run.step, {"eval/loss": evaluate()})
    return run.finish()
