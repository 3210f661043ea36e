"""Supervised (instruction) fine-tuning: cross-entropy on the assistant tokens only.

    loss = -(1/N) sum over trained tokens t of log p_theta(y_t | y_<t)      (RLHF book, instruction-tuning chapter)

N counts the trained tokens of the whole optimizer step, so gradient accumulation gives the same gradient as one big
batch (the mean of per-micro-batch means would over-weight short micro-batches).

The loop, top to bottom: load tokenizer/model -> render data (one rendering path) -> for each step: gather a batch,
pack it padding-free, forward the backbone, LM head on trained positions only, backward, clip, AdamW, schedule ->
log / eval / checkpoint. Batches are a pure function of (seed, step), so a resumed run replays exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from posttrain.data import Example, collate_flat, first_fit_decreasing, load_sft_examples
from posttrain.maths.sft import sft_loss
from posttrain.models.adapters import lora_from_config, quantization_config
from posttrain.models import (load_causal_lm, load_tokenizer, prepare_for_training, resize_for_tokenizer,
                              resolve_device, trained_token_logits)
from posttrain.plumbing.config import ChatTrainConfig, option, stage_config
from posttrain.plumbing.harness import Run
from posttrain.plumbing.training import (autocast, batch_indices, micro_batches, optimizer_and_scheduler,
                                         optimizer_step, step_counts)


@stage_config
class SFTConfig(ChatTrainConfig):
    strategy: str = option("all_assistant_turns", "multi-turn loss: all_assistant_turns | final_turn_only",
                           choices=("all_assistant_turns", "final_turn_only"))
    truncation: str = option("drop", "over-long examples: drop (counted) | right (keep the first max_length tokens)",
                             choices=("drop", "right"))
    packing: bool = option(False, "pack several examples per row of max_length tokens (attention stays within each "
                                  "example)")
    out: str = "runs/sft"
    epochs: float = 3.0
    log_every: int = 1
    save_every: int = 50


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


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, device, precision,
                  forward=None, procs=None) -> float:
    """Token-mean NLL of the assistant tokens over all of ``examples`` (under DDP, ``procs``, each rank scores
    every world-th example through ``forward`` and the sums are reduced; under FSDP every rank scores them all, as
    every sharded forward is a collective)."""
    forward = forward or (lambda fn, *args: fn(model, *args))
    shard = procs is not None and procs.world > 1 and procs.kind != "fsdp"
    if shard:
        examples = examples[procs.rank :: procs.world]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_flat(examples[start : start + batch_size], pad_id).items()}
        with autocast(device, precision):
            logits, targets = forward(trained_token_logits, batch)
        _, metrics = sft_loss(logits, targets)
        total += float(metrics["nll_sum"])
        count += int(metrics["tokens"])
    model.train()
    if shard:
        total, count = procs.sum(total, count)
    return total / max(count, 1)


def train_sft(config: SFTConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run SFT; returns the directory of the final model (``out/model``).

    ``on_step_end(step, info)`` is called after every optimizer step with ``info = {"tokens": fed tokens,
    "trained_tokens": ..., "loss": ...}`` (benchmarks and tests hook in here).
    """
    config = _default_world_paths(config)
    device = resolve_device(config.device)
    run = Run(config, "sft", on_step_end=on_step_end)
    if run.complete:
        return run.final_dir

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
    steps_per_epoch, total_steps = step_counts(len(items), config)

    model = load_causal_lm(config.model, device=device, quantization=quantization_config(config))
    vocabulary = model.get_input_embeddings().weight.shape[0]
    resize_for_tokenizer(model, tokenizer)
    prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing, compile=config.compile)
    model = lora_from_config(model, config, config.model,  # LoRA adapters (peft) when --lora_r > 0
                             resized=model.get_input_embeddings().weight.shape[0] != vocabulary)
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps)
    procs = run.procs  # one process, or this rank of an accelerate launch (DDP / FSDP): plumbing/distributed.py
    forward, optimizer = procs.prepare(model, optimizer)  # forward(fn, batch) = fn(model, batch) through DDP/FSDP
    run.start(total_steps, modules={"model": model}, optimizers={"model": optimizer},
              schedulers={"model": scheduler}, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id
    batches = batch_indices(len(items), step_size, config.seed, shuffle=config.shuffle, start_batch=run.start_step)
    evaluate = lambda: evaluate_loss(model, eval_examples, batch_size=config.batch_size, pad_id=pad_id,  # noqa: E731
                                     device=device, precision=config.precision, forward=forward, procs=procs)

    with run:
        for step in run.steps():
            # This rank's share of the step's global batch, one padding-free row per micro-batch; the loss is
            # normalised by the trained tokens of the WHOLE step, summed over micro-batches and ranks.
            micro = [{k: v.to(device) for k, v in collate_flat([ex for i in chunk for ex in items[i]], pad_id).items()}
                     for chunk in micro_batches(procs.shard(next(batches)), config.grad_accum)]
            num_tokens = int(procs.sum(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)))
            loss_sum = 0.0
            for i, batch in enumerate(micro):
                with procs.accumulating(forward, last=i == len(micro) - 1):  # gradients reduce on the last one
                    with autocast(device, config.precision):
                        logits, targets = forward(trained_token_logits, batch)
                    loss, metrics = sft_loss(logits, targets, num_tokens=num_tokens)
                    procs.backward(loss)
                loss_sum += float(metrics["loss"])
            loss_sum = procs.sum(loss_sum)
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, config.max_grad_norm, loss=loss_sum)

            if eval_examples and run.eval_due(step):
                run.log_metrics(step, {"eval/loss": evaluate()})
            fed = int(procs.sum(sum(int((mb["input_ids"] != pad_id).sum()) for mb in micro)))
            run.end_step(step, {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                                "train/trained_tokens": num_tokens, "train/epoch": step / steps_per_epoch},
                         tokens=fed, trained_tokens=num_tokens, loss=loss_sum)

    if eval_examples:
        run.log_metrics(run.step, {"eval/loss": evaluate()})
    return run.finish()
