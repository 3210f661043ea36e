"""Reward-model training: ``posttrain rm --loss bt | margin | kcomparisons | plackett_luce | orm | prm``.

  bt             -log sigma(r(x, y_c) - r(x, y_r))                    pairs (prompt/chosen/rejected)
  margin         -log sigma(r_c - r_r - m), m from `margin` or Likert scores (Llama 2)
  kcomparisons   mean over the C(K,2) pairs of a ranking of the BT loss (InstructGPT); rankings (prompt/completions)
  plackett_luce  K-wise ranking likelihood (Starling); equals bt for K = 2
  orm            outcome RM: per-token BCE of the 0/1 correctness label over the completion's tokens
  prm            process RM: 3-class CE (incorrect/neutral/correct) at the last token of every step

Scalar RMs (the first four) are ``AutoModelForSequenceClassification`` (num_labels=1; score = linear head on the
last non-padding token); ORM/PRM are ``AutoModelForTokenClassification`` (1 or 3 labels). All are initialised from
a causal LM and saved with ``save_pretrained`` so the Auto classes reload them and give the same scores.

Each step's sequences go through the model once, as one padding-free row with per-example attention: a K-wise
ranking forwards K completions, not 2 per pair, and (scalar RMs) the shared prompt once per ranking, not once per
completion. Usually one epoch (reward models overfit fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from posttrain.data.io import DataError, Row, as_messages, preference_pair, read_rows, require, validate_rows
from posttrain.data.messages import completion_text
from posttrain.data.packing import Example, collate_flat, collate_shared_prefix, flat_index
from posttrain.data.render import RenderError, render_conversation
from posttrain.maths import reward as losses
from posttrain.maths.reward import RMLoss
from posttrain.models.adapters import lora_from_config, quantization_config
from posttrain.models import flat_hidden_states, load_tokenizer, prepare_for_training, resolve_device
from posttrain.models.heads import load_head_model
from posttrain.plumbing.config import ChatTrainConfig, option, stage_config
from posttrain.plumbing.harness import Run
from posttrain.plumbing.training import (WeightedMeans, autocast, batch_indices, micro_batches, optimizer_and_scheduler,
                                         optimizer_step, step_counts)
from posttrain.rewards import STEP_SEPARATOR, step_boundary_tokens

WORLD_DATASETS = {RMLoss.bt: "preference", RMLoss.margin: "preference", RMLoss.kcomparisons: "rankings",
                  RMLoss.plackett_luce: "rankings", RMLoss.orm: "outcome", RMLoss.prm: "process"}
"""The tiny world's dataset (``{name}_train.jsonl`` / ``{name}_heldout.jsonl``) for each loss."""

PRM_CLASSES = {-1: 0, 0: 1, 1: 2}  # step label -> class (incorrect, neutral, correct)


@stage_config
class RMConfig(ChatTrainConfig):
    loss: str = option("bt", "bt | margin | kcomparisons | plackett_luce | orm | prm", choices=tuple(RMLoss))
    margin_scale: float = option(1.0, "margin loss: m = margin_scale * (score_chosen - score_rejected) when no "
                                      "`margin` column")
    out: str = "runs/rm"


@dataclass
class Group:
    """One training unit: the sequences scored together and their targets."""

    examples: list[Example]
    margin: float = 0.0  # margin loss
    label: int = 0  # orm: 1 = the completion is correct
    boundaries: list[int] = field(default_factory=list)  # prm: token index of each step's end
    classes: list[int] = field(default_factory=list)  # prm: class of each step


def _encode(tokenizer, messages: list[dict], row: Row, column: str) -> Example:
    try:
        ids, mask = render_conversation(tokenizer, messages, "final_turn_only")
    except RenderError as err:
        raise row.error(column, str(err)) from None
    return Example(ids, mask)


def parse_group(row: Row, tokenizer, loss: RMLoss, margin_scale: float) -> Group:
    """Validate one row and render its sequences (raises DataError naming file, line and field)."""
    match loss:
        case RMLoss.bt | RMLoss.margin:
            prompt, chosen, rejected = preference_pair(row)
            group = Group([_encode(tokenizer, prompt + chosen, row, "chosen"),
                           _encode(tokenizer, prompt + rejected, row, "rejected")])
            if loss == RMLoss.margin:
                if "margin" in row.data:
                    group.margin = float(row.data["margin"])
                elif "score_chosen" in row.data and "score_rejected" in row.data:
                    group.margin = margin_scale * (float(row.data["score_chosen"]) - float(row.data["score_rejected"]))
                else:
                    raise row.error("margin", "margin loss needs a `margin` column or `score_chosen`/`score_rejected`")
            return group
        case RMLoss.kcomparisons | RMLoss.plackett_luce:
            prompt = as_messages(row, "prompt", "user")
            if "completions" not in row.data and "chosen" in row.data:  # a pair is a ranking of two
                _, chosen, rejected = preference_pair(row)
                return Group([_encode(tokenizer, prompt + chosen, row, "chosen"),
                              _encode(tokenizer, prompt + rejected, row, "rejected")])
            completions = require(row, "completions")
            if not isinstance(completions, list) or len(completions) < 2:
                raise row.error("completions", "expected a list of at least 2 completions, best first")
            examples = []
            for k, completion in enumerate(completions):
                text = completion_text(completion) if isinstance(completion, (str, dict, list)) else None
                if not isinstance(text, str) or not text.strip():
                    raise row.error(f"completions[{k}]", "expected a non-empty string or assistant message")
                examples.append(_encode(tokenizer, prompt + [{"role": "assistant", "content": text}], row,
                                        f"completions[{k}]"))
            if len({tuple(e.input_ids) for e in examples}) < len(examples):
                raise row.error("completions", "a ranking lists the same completion twice")
            return Group(examples)
        case RMLoss.orm:
            prompt = as_messages(row, "prompt", "user")
            completion = as_messages(row, "completion", "assistant")
            label = require(row, "label")
            if label not in (0, 1, True, False):
                raise row.error("label", f"expected 0/1 (or true/false), got {label!r}")
            return Group([_encode(tokenizer, prompt + completion, row, "completion")], label=int(label))
        case RMLoss.prm:
            prompt = as_messages(row, "prompt", "user")
            steps, labels = require(row, "steps"), require(row, "labels")
            if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
                raise row.error("steps", "expected a non-empty list of non-empty strings")
            if not isinstance(labels, list) or len(labels) != len(steps):
                raise row.error("labels", f"expected {len(steps)} labels (one per step), got {labels!r}")
            if any(label not in PRM_CLASSES for label in labels):
                raise row.error("labels", f"labels must be -1, 0 or 1, got {labels!r}")
            messages = prompt + [{"role": "assistant", "content": STEP_SEPARATOR.join(steps)}]
            try:
                ids, boundaries = step_boundary_tokens(tokenizer, messages, steps)
            except RenderError as err:
                raise row.error("steps", str(err)) from None
            return Group([Example(ids, [0] * len(ids))], boundaries=boundaries,
                         classes=[PRM_CLASSES[label] for label in labels])


def load_groups(path, tokenizer, config: RMConfig) -> tuple[list[Group], str]:
    loss = RMLoss(config.loss)
    rows = read_rows(path, columns=config.columns or None)
    kept, report = validate_rows(rows, lambda row: parse_group(row, tokenizer, loss, config.margin_scale),
                                 skip_invalid=config.skip_invalid, source=str(path))
    groups = []
    for _, group in kept:
        if max(len(e) for e in group.examples) > config.max_length:
            report.drop(f"longer than max_length={config.max_length}")
        else:
            groups.append(group)
    report.kept = len(groups)
    if loss in (RMLoss.kcomparisons, RMLoss.plackett_luce) and len({len(g.examples) for g in groups}) > 1:
        raise DataError(str(path), "", "completions", "every ranking must have the same number K of completions")
    if not groups:
        raise DataError(str(path), "", None, f"no usable rows ({report.summary()})")
    return groups, report.summary()


def last_token_positions(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> torch.Tensor:
    """Per sequence of a flat batch, the index of its last token that is not padding: exactly the token that
    ``AutoModelForSequenceClassification`` pools (the rightmost non-pad token), so scores agree with HF's."""
    ids = batch["input_ids"][0]
    ends = batch["cu_seq_lens"].tolist()
    positions = []
    for start, end in zip(ends[:-1], ends[1:]):
        t = end - 1
        while pad_token_id is not None and t > start and int(ids[t]) == pad_token_id:
            t -= 1
        positions.append(t)
    return torch.tensor(positions, device=ids.device)


def scalar_scores(model, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Scores (S,) of a scalar RM for ``examples``, all in one padding-free forward."""
    batch = collate_flat(examples, pad_id)
    hidden = flat_hidden_states(model, batch)  # (N, H)
    return model.score(hidden[last_token_positions(batch, pad_id).to(hidden.device)]).squeeze(-1)


def _last_non_pad(example: Example, pad_id: int | None) -> int:
    t = len(example) - 1
    while pad_id is not None and t > 0 and example.input_ids[t] == pad_id:
        t -= 1
    return t


def group_scores(model, groups: list[Group], pad_id: int, device) -> torch.Tensor:
    """Scores (B, K) of a scalar RM for B groups of K completions of one prompt each, in one padding-free forward.

    With segment attention the prompt is forwarded once per group (``collate_shared_prefix``): a pair costs
    prompt + chosen + rejected tokens instead of 2 x prompt + chosen + rejected. Other attention backends
    (flash-attention) take the flat layout. Either way the scores equal HF's, which pool the last non-pad token.
    """
    from posttrain.models.attention import NAME as SEGMENT_ATTENTION

    if getattr(model.config, "_attn_implementation", None) != SEGMENT_ATTENTION:
        return scalar_scores(model, [e for g in groups for e in g.examples], pad_id).view(len(groups), -1)
    batch = collate_shared_prefix([g.examples for g in groups])
    hidden = flat_hidden_states(model, batch)  # (N, H), N = the group's tokens with each prompt once
    examples = [e for g in groups for e in g.examples]
    pooled = [flat_index(layout, _last_non_pad(e, pad_id)) for layout, e in zip(batch["layout"], examples)]
    return model.score(hidden[pooled]).squeeze(-1).view(len(groups), -1)


def group_units(groups: list[Group], loss_type: RMLoss) -> int:
    """What a micro-batch's loss is a mean over: groups (scalar RMs), completion tokens (orm: every trained token
    after an example's first) or labelled steps (prm). Known before the forward, so each micro-batch can be
    back-propagated at once with its share of the step."""
    if loss_type.is_scalar:
        return len(groups)
    if loss_type == RMLoss.orm:
        return sum(sum(e.loss_mask[1:]) for g in groups for e in g.examples)
    return sum(len(g.boundaries) for g in groups)


def group_loss(model, groups: list[Group], loss_type: RMLoss, pad_id: int, device) -> tuple[torch.Tensor, dict, int]:
    """Loss of a micro-batch of groups (all sequences in one flat forward); returns (loss, metrics, unit count)."""
    if loss_type.is_scalar:
        scores = group_scores(model, groups, pad_id, device)  # (B, K), best-first
        match loss_type:
            case RMLoss.bt:
                loss, metrics = losses.bradley_terry_loss(scores[:, 0], scores[:, 1])
            case RMLoss.margin:
                margin = torch.tensor([g.margin for g in groups], device=scores.device)
                loss, metrics = losses.bradley_terry_loss(scores[:, 0], scores[:, 1], margin=margin)
            case RMLoss.kcomparisons:
                loss, metrics = losses.kcomparisons_loss(scores)
            case RMLoss.plackett_luce:
                loss, metrics = losses.plackett_luce_loss(scores)
        return loss, metrics, len(groups)
    examples = [e for g in groups for e in g.examples]
    batch = {k: v.to(device) for k, v in collate_flat(examples, pad_id).items()}
    hidden = flat_hidden_states(model, batch)  # (N, H)
    if loss_type == RMLoss.orm:
        completion = batch["labels"][0] != -100  # (N,) the completions' tokens (+ end-of-turn)
        logits = model.score(hidden[completion]).squeeze(-1)  # (n,)
        owner = torch.repeat_interleave(torch.arange(len(groups), device=device),
                                        batch["cu_seq_lens"][1:] - batch["cu_seq_lens"][:-1])[completion]
        labels = torch.tensor([g.label for g in groups], device=device)[owner]
        loss, metrics = losses.orm_loss(logits[None], labels[None])
        return loss, metrics, int(completion.sum())
    starts = batch["cu_seq_lens"][:-1].tolist()
    positions = [start + b for start, g in zip(starts, groups) for b in g.boundaries]
    classes = torch.tensor([c for g in groups for c in g.classes], device=device)
    logits = model.score(hidden[positions])  # (steps, 3)
    loss, metrics = losses.prm_loss(logits[None], classes[None])
    return loss, metrics, len(positions)


@torch.no_grad()
def evaluate_groups(model, groups: list[Group], loss_type: RMLoss, pad_id: int, device, batch_size: int) -> dict[str, float]:
    """Unit-weighted means of the loss metrics over held-out groups."""
    model.eval()
    totals: dict[str, float] = {}
    units = 0
    for start in range(0, len(groups), batch_size):
        _, metrics, n = group_loss(model, groups[start : start + batch_size], loss_type, pad_id, device)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
        units += n
    report = {key: value / units for key, value in totals.items()}
    if loss_type.is_scalar:  # the length bias the book warns about: does the RM simply prefer longer answers?
        from posttrain.maths.stats import pearson

        examples = [e for g in groups for e in g.examples]
        scores = torch.cat([scalar_scores(model, examples[s : s + batch_size], pad_id)
                            for s in range(0, len(examples), batch_size)])
        report["length_correlation"] = pearson(scores.tolist(), [float(sum(e.loss_mask)) for e in examples])
    model.train()
    return report


def _load_model(path: str, loss_type: RMLoss, tokenizer, device, quantization=None):
    kind = "scalar" if loss_type.is_scalar else ("outcome" if loss_type == RMLoss.orm else "process")
    return load_head_model(path, kind, tokenizer=tokenizer, device=device, quantization=quantization)


def _fill_world_defaults(config: RMConfig) -> RMConfig:
    if config.model and config.data:
        return config
    from posttrain.stages import world as build

    paths = build.ensure_world(base_model=not config.model, progress=config.progress)
    name = WORLD_DATASETS[RMLoss(config.loss)]
    config.model = config.model or str(paths.base_model)
    if not config.data:
        config.data = str(paths.data / f"{name}_train.jsonl")
        config.eval_data = config.eval_data or str(paths.data / f"{name}_heldout.jsonl")
    return config


def train_rm(config: RMConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Train a reward model; returns the saved model directory (``out/model``)."""
    config = _fill_world_defaults(config)
    loss_type = RMLoss(config.loss)
    device = resolve_device(config.device)
    run = Run(config, "rm", on_step_end=on_step_end)
    if run.complete:
        return run.final_dir

    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    groups, summary = load_groups(config.data, tokenizer, config)
    print(summary)
    eval_groups = load_groups(config.eval_data, tokenizer, config)[0] if config.eval_data else []
    step_size = config.batch_size * config.grad_accum
    steps_per_epoch, total_steps = step_counts(len(groups), config)

    model = _load_model(config.model, loss_type, tokenizer, device, quantization_config(config))
    prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing, compile=config.compile)
    model = lora_from_config(model, config, config.model)  # LoRA adapters + the head in full, when --lora_r > 0
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps)
    procs = run.procs  # one process, or this rank of an accelerate launch (DDP / FSDP): plumbing/distributed.py
    # forward(fn, ...) = fn(model, ...) through DDP/FSDP; the LM head of a head model gets no gradient
    forward, optimizer = procs.prepare(model, optimizer, unused_parameters=True)
    run.start(total_steps, modules={"model": model}, optimizers={"model": optimizer},
              schedulers={"model": scheduler}, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id
    batches = batch_indices(len(groups), step_size, config.seed, shuffle=config.shuffle, start_batch=run.start_step)

    def evaluate():
        with procs.gathered(forward):
            return evaluate_groups(model, eval_groups, loss_type, pad_id, device, config.batch_size)

    with run:
        for step in run.steps():
            chunks = [[groups[i] for i in chunk]
                      for chunk in micro_batches(procs.shard(next(batches)), config.grad_accum)]
            # Each micro-batch's loss is a mean over its units (pairs, rankings, tokens or steps); weighting it by its
            # share of the step's units (over all ranks) makes the accumulated gradient that of the step's mean.
            units = [group_units(chunk, loss_type) for chunk in chunks]
            step_units = procs.sum(float(sum(units)))
            means, step_loss = WeightedMeans(), 0.0
            for i, (chunk, n) in enumerate(zip(chunks, units)):
                with procs.accumulating(forward, last=i == len(chunks) - 1):
                    with autocast(device, config.precision):
                        loss, metrics, _ = forward(group_loss, chunk, loss_type, pad_id, device)
                    procs.backward(loss * (n / step_units))
                means.add(metrics, n / step_units)
                step_loss += float(loss.detach()) * n / step_units
            step_loss = procs.sum(step_loss)
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, config.max_grad_norm, loss=step_loss)

            if eval_groups and run.eval_due(step):
                run.log_metrics(step, {f"eval/{k}": v for k, v in evaluate().items()})
            logged = means.means(procs)
            tokens, sequences = procs.sum(float(sum(len(e) for chunk in chunks for g in chunk for e in g.examples)),
                                          float(sum(len(g.examples) for chunk in chunks for g in chunk)))
            logged.pop("loss", None)  # a non-finite loss is left out of the means: step_loss keeps it
            run.end_step(step, {"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                **{f"rm/{k}": v for k, v in logged.items()}},
                         tokens=int(tokens), sequences=int(sequences))

    report = evaluate() if eval_groups else {}
    if report:
        run.log_metrics(run.step, {f"eval/{k}": v for k, v in report.items()})
    return run.finish({"loss": loss_type.value, "eval": report})
