"""Direct alignment: ``posttrain dpo --loss dpo | cdpo | robust | ipo | dpo_nll | simpo | orpo | kto``.

Each step, for B preference pairs:
  1. chosen and rejected go through the policy in ONE forward: a padding-free row where each pair's prompt appears
     once, followed by both completions (``collate_shared_prefix``; masks keep the completions apart);
  2. the LM head runs only at the positions that predict a completion token; their log-probs are summed per
     sequence -> log pi(y_c|x), log pi(y_r|x) (B,) and the completion lengths;
  3. the reference log-probs log pi_ref(y|x) were computed ONCE before training, by the frozen reference model, and
     cached on disk (keyed by the reference model's files, the data file and the rendering settings), so training
     holds only the policy in memory (the book's ~50 % peak-memory tip). ``--precompute_ref=false`` keeps the
     reference model and runs it live each step (same numbers; tested);
  4. ``posttrain.maths.dpo_loss`` -> backward -> clip -> AdamW.
Reference-free losses (simpo, orpo) never load a reference model.

KTO trains on unpaired examples (``prompt``/``completion``/``label``; paired data is split into a desirable and an
undesirable example per pair). Its reference point z0 estimates KL(pi || pi_ref) from *mismatched* pairs: example i's
prompt with the completion of another example (the nearest earlier one in file order with a different prompt, fixed
when the data is loaded, so its reference log-probs are cached like the rest). Each example and its mismatched
completion share the prompt, so they go through the model together, exactly like a chosen/rejected pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from posttrain.data.io import DataError, Row, as_messages, check_messages, read_rows, validate_rows
from posttrain.data.packing import Example, add_scored_tokens, collate_shared_prefix
from posttrain.data.render import RenderError, render_conversation
from posttrain.maths import direct as losses
from posttrain.models import load_causal_lm, load_tokenizer, prepare_for_training, resolve_device, use_segment_attention
from posttrain.models.adapters import lora_from_config, quantization_config, reference_context
from posttrain.models.logprobs import sequence_sums, token_logps
from posttrain.plumbing.config import ChatTrainConfig, option, stage_config
from posttrain.plumbing.harness import Run
from posttrain.plumbing.training import (WeightedMeans, autocast, batch_indices, micro_batches, optimizer_and_scheduler,
                                         optimizer_step, step_counts)


@stage_config
class DPOConfig(ChatTrainConfig):
    loss: str = option("dpo", "dpo | cdpo | robust | ipo | dpo_nll | simpo | orpo | kto",
                       choices=tuple(t.value for t in losses.DPOLoss))
    ref_model: str = option("", "frozen reference model; empty = the starting policy")
    beta: float = option(0.1, "KL strength beta (simpo: reward scale)", above=0)
    label_smoothing: float = option(0.0, "cdpo / robust: assumed fraction of flipped labels", below=0.5)
    gamma: float = option(0.5, "simpo: target reward margin", minimum=None)
    alpha: float = option(-1.0, "dpo_nll: NLL weight (default 1); orpo: odds-ratio weight (default 0.1); -1 = default",
                          unset=-1)
    desirable_weight: float = option(1.0, "kto: weight lambda_D of desirable examples")
    undesirable_weight: float = option(1.0, "kto: weight lambda_U of undesirable examples (KTO paper: keep "
                                            "lambda_D n_D / (lambda_U n_U) in [1, 4/3])")
    precompute_ref: bool = option(True, "compute reference log-probs once before training and cache them on disk")
    out: str = "runs/dpo"
    batch_size: int = 8
    lr: float = 5e-7
    lr_schedule: str = "linear"


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    def examples(self) -> tuple[Example, Example]:
        return self.chosen, self.rejected


@dataclass
class Unpaired:
    """A KTO example and its mismatched twin: the same prompt with another example's completion (for z0)."""

    example: Example
    kl_example: Example
    desirable: bool

    def examples(self) -> tuple[Example, Example]:
        return self.example, self.kl_example


# ---------------------------------------------------------------------------------------------------------------
# data


def pair_messages(row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) from an explicit-prompt row, or from two conversations that differ only in their
    final assistant turn (TRL's implicit-prompt format)."""
    if "prompt" in row.data:
        prompt = as_messages(row, "prompt", "user")
        chosen, rejected = as_messages(row, "chosen", "assistant"), as_messages(row, "rejected", "assistant")
    else:
        chosen_all = check_messages(row, row.data.get("chosen"), "chosen")
        rejected_all = check_messages(row, row.data.get("rejected"), "rejected")
        if chosen_all[:-1] != rejected_all[:-1] or len(chosen_all) < 2:
            raise row.error("rejected", "without a `prompt` column, chosen and rejected must be conversations that "
                                        "differ only in their final assistant turn")
        prompt, chosen, rejected = chosen_all[:-1], chosen_all[-1:], rejected_all[-1:]
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[-1]["role"] != "assistant":
            raise row.error(name, f"the {name} completion must end with an assistant turn")
    if chosen == rejected:
        raise row.error("chosen", "chosen and rejected are identical")
    return prompt, chosen, rejected


def parse_pair(row: Row, tokenizer) -> Pair:
    prompt, chosen, rejected = pair_messages(row)
    examples = []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        try:
            ids, mask = render_conversation(tokenizer, prompt + completion, "final_turn_only")
        except RenderError as err:
            raise row.error(name, str(err)) from None
        examples.append(Example(ids, mask))
    return Pair(*examples)


def load_pairs(path: str, tokenizer, config: DPOConfig) -> list[Pair]:
    rows = read_rows(path, columns=config.columns or None)
    kept, report = validate_rows(rows, lambda row: parse_pair(row, tokenizer), skip_invalid=config.skip_invalid,
                                 source=str(path))
    pairs = []
    for _, pair in kept:
        if max(len(pair.chosen), len(pair.rejected)) > config.max_length:
            report.drop(f"longer than max_length={config.max_length}")
        else:
            pairs.append(pair)
    report.kept = len(pairs)
    print(report.summary())
    if not pairs:
        raise DataError(str(path), "", None, f"no usable pairs ({report.summary()})")
    return pairs


def unpaired_messages(row: Row) -> list[tuple[list[dict], list[dict], bool]]:
    """[(prompt, completion, desirable)]: one example from a ``prompt``/``completion``/``label`` row, two (chosen
    desirable, rejected undesirable) from a preference pair."""
    if "label" not in row.data and "completion" not in row.data:
        prompt, chosen, rejected = pair_messages(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    prompt, completion = as_messages(row, "prompt", "user"), as_messages(row, "completion", "assistant")
    label = row.data.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise row.error("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    if completion[-1]["role"] != "assistant":
        raise row.error("completion", "the completion must end with an assistant turn")
    return [(prompt, completion, label)]


def load_unpaired(path: str, tokenizer, config: DPOConfig) -> list[Unpaired]:
    """KTO examples, each with its mismatched completion: that of the nearest earlier example (cyclically, in file
    order) whose prompt differs. Fixed at load time, so the reference log-probs of both can be cached."""
    rows = read_rows(path, columns=config.columns or None)

    def parse(row: Row):
        items = []
        for prompt, completion, desirable in unpaired_messages(row):
            try:
                ids, mask = render_conversation(tokenizer, prompt + completion, "final_turn_only")
            except RenderError as err:
                raise row.error("completion" if "completion" in row.data else
                                ("chosen" if desirable else "rejected"), str(err)) from None
            items.append((prompt, completion, desirable, Example(ids, mask)))
        return items

    kept, report = validate_rows(rows, parse, skip_invalid=config.skip_invalid, source=str(path))
    items = []
    for row, parsed in kept:
        for prompt, completion, desirable, example in parsed:
            if len(example) > config.max_length:
                report.drop(f"longer than max_length={config.max_length}")
            else:
                items.append((row, prompt, completion, desirable, example))
    keys = [json.dumps(prompt, sort_keys=True) for _, prompt, _, _, _ in items]
    if len(set(keys)) < 2:
        raise DataError(str(path), "", None, "kto needs examples from at least two different prompts (the KL "
                                             "baseline pairs each prompt with another prompt's completion)")
    examples = []
    for i, (row, prompt, _, desirable, example) in enumerate(items):
        j = next((i - k) % len(items) for k in range(1, len(items)) if keys[(i - k) % len(items)] != keys[i])
        try:
            ids, mask = render_conversation(tokenizer, prompt + items[j][2], "final_turn_only")
        except RenderError as err:
            raise row.error("prompt", f"with the completion of {items[j][0].where} (KL baseline): {err}") from None
        if len(ids) > config.max_length:  # a longer completion than the row's own: cut it, the prompt is the same
            ids, mask = ids[: config.max_length], mask[: config.max_length]
        examples.append(Unpaired(example, Example(ids, mask), desirable))
    report.kept = len(kept)
    desirable = sum(e.desirable for e in examples)
    print(f"{report.summary()}; {desirable} desirable and {len(examples) - desirable} undesirable examples")
    return examples


def check_kto_balance(examples: list[Unpaired], config: DPOConfig) -> None:
    """The KTO paper's advice: lambda_D n_D / (lambda_U n_U) in [1, 4/3]; say so when outside."""
    n_desirable = sum(e.desirable for e in examples)
    n_undesirable = len(examples) - n_desirable
    if not n_desirable or not n_undesirable:
        print(f"note: kto data has only {'desirable' if n_desirable else 'undesirable'} examples")
        return
    ratio = config.desirable_weight * n_desirable / (config.undesirable_weight * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        print(f"note: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.2f}; the KTO "
              f"paper recommends [1, 4/3] (set --desirable_weight / --undesirable_weight)")


# ---------------------------------------------------------------------------------------------------------------
# log-probs


def sequence_logps(model, pairs: list[Pair] | list[Unpaired], device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi(y_c|x), log pi(y_r|x) summed over each completion's trained tokens, and their counts: 4 x (B,)
    (for KTO: the example and its mismatched completion).

    One forward of every pair through ``token_logps``: with segment attention each prompt once (shared-prefix
    row), otherwise each sequence as its own segment. The LM head runs only at the positions that predict a trained
    token.
    """
    from posttrain.models.attention import NAME as SEGMENT_ATTENTION

    shared = getattr(model.config, "_attn_implementation", None) == SEGMENT_ATTENTION
    groups = [list(p.examples()) for p in pairs] if shared else [[e] for p in pairs for e in p.examples()]
    batch = add_scored_tokens(collate_shared_prefix(groups), groups)
    sums, counts = sequence_sums(token_logps(model, batch), batch["owners"], 2 * len(pairs))
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def reference_cache_key(ref_model: str, data: str, config: DPOConfig) -> str:
    """Hash of what the reference log-probs depend on: the reference model's files, the data file, the rendering."""
    model_dir = Path(ref_model)
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".jinja"))
    digest = hashlib.sha256()
    for part in [str(model_dir.resolve())] + [_file_fingerprint(p) for p in files] + [
            str(Path(data).resolve()), _file_fingerprint(Path(data)), config.chat_template, json.dumps(config.columns),
            str(config.max_length), str(config.skip_invalid), "unpaired" if config.loss == "kto" else "pairs"]:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def reference_logps(ref_model, pairs: list[Pair] | list[Unpaired], device, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(y_c|x), log pi_ref(y_r|x) for every pair (P,), in batches (KTO: example, mismatched completion)."""
    ref_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r, _, _ = sequence_logps(ref_model, pairs[start : start + batch_size], device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference_logps(cache_dir: Path, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """Load ``cache_dir/ref_logps-{key}.pt`` or compute and write it atomically."""
    path = cache_dir / f"ref_logps-{key}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["chosen"], saved["rejected"]
    chosen, rejected = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"chosen": chosen, "rejected": rejected}, tmp)
    os.replace(tmp, path)
    return chosen, rejected


# ---------------------------------------------------------------------------------------------------------------
# training


def _fill_world_defaults(config: DPOConfig) -> DPOConfig:
    if not config.model:
        raise ValueError("posttrain dpo needs --model=DIR (usually an SFT model)")
    if not config.data:
        from posttrain.world.cache import ensure_world_data

        paths = ensure_world_data()
        config.data = str(paths.data / "preference_train.jsonl")
        config.eval_data = config.eval_data or str(paths.data / "preference_heldout.jsonl")
    return config


def pair_loss(model, pairs: list[Pair] | list[Unpaired], ref: tuple[torch.Tensor, torch.Tensor] | None,
              config: DPOConfig, device, reference_point: torch.Tensor | None = None):
    """(loss, metrics) of a micro-batch; ``ref`` = the pairs' reference log-probs (None for reference-free types);
    ``reference_point``: KTO's z0 when computed over the whole step (else from this micro-batch)."""
    chosen, rejected, chosen_len, rejected_len = sequence_logps(model, pairs, device)
    ref_chosen, ref_rejected = (None, None) if ref is None else (ref[0].to(device), ref[1].to(device))
    if config.loss == losses.DPOLoss.kto:  # chosen = the examples, rejected = their mismatched completions
        desirable = torch.tensor([p.desirable for p in pairs], device=device)
        return losses.kto_loss(chosen, ref_chosen, desirable, rejected, ref_rejected, beta=config.beta,
                               desirable_weight=config.desirable_weight,
                               undesirable_weight=config.undesirable_weight, reference_point=reference_point)
    return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss,
                           label_smoothing=config.label_smoothing, chosen_lengths=chosen_len,
                           rejected_lengths=rejected_len, gamma=config.gamma,
                           alpha=None if config.alpha < 0 else config.alpha)


def train_dpo(config: DPOConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run direct-alignment training; returns the final policy directory (``out/model``)."""
    config = _fill_world_defaults(config)
    loss_type = losses.DPOLoss(config.loss)
    device = resolve_device(config.device)
    run = Run(config, "dpo", on_step_end=on_step_end)
    if run.complete:
        return run.final_dir

    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    load = load_unpaired if loss_type == losses.DPOLoss.kto else load_pairs
    pairs = load(config.data, tokenizer, config)
    eval_pairs = load(config.eval_data, tokenizer, config) if config.eval_data else []
    if loss_type == losses.DPOLoss.kto:
        check_kto_balance(pairs, config)

    ref_model_path = config.ref_model or config.model
    procs = run.procs  # one process, or this rank of an accelerate launch (DDP / FSDP): plumbing/distributed.py
    live_ref = None
    ref_train = ref_eval = None
    # LoRA: the reference is the policy itself with its adapters disabled (no second copy), set up below
    adapter_reference = bool(config.lora_r) and not config.ref_model
    reference_off = contextlib.nullcontext  # the context under which live_ref computes as the reference

    def precompute_reference(ref_model, off) -> tuple:
        """The reference log-probs of the training (and eval) pairs, run once and cached in the run directory:
        rank 0 computes and writes them, then the other ranks read them."""
        def compute(data):
            def run_reference():
                with off():
                    return reference_logps(ref_model, data, device, config.batch_size)
            return run_reference

        cached = [None, None]
        for rank_turn in (True, False):
            if procs.is_main == rank_turn:
                for k, (path, data) in enumerate(((config.data, pairs), (config.eval_data, eval_pairs))):
                    if data:
                        cached[k] = cached_reference_logps(run.dir / "reference", reference_cache_key(
                            ref_model_path, path, config), compute(data))
            procs.barrier()
        return tuple(cached)

    if loss_type.needs_reference and not adapter_reference:
        if config.precompute_ref:  # the frozen reference is run once, then dropped: training holds only the policy
            ref_model = load_causal_lm(ref_model_path, device=device)
            use_segment_attention(ref_model)
            ref_train, ref_eval = precompute_reference(ref_model, contextlib.nullcontext)
            del ref_model
        else:
            live_ref = load_causal_lm(ref_model_path, device=device).eval()
            use_segment_attention(live_ref)

    def reference(indices: list[int], cached, data) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not loss_type.needs_reference:
            return None
        if live_ref is not None:
            with reference_off():
                return reference_logps(live_ref, [data[i] for i in indices], device, len(indices))
        return cached[0][indices], cached[1][indices]

    step_size = config.batch_size * config.grad_accum
    steps_per_epoch, total_steps = step_counts(len(pairs), config)
    model = load_causal_lm(config.model, device=device, quantization=quantization_config(config))
    prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing, compile=config.compile)
    model = lora_from_config(model, config, config.model)  # LoRA adapters (peft) when --lora_r > 0
    if loss_type.needs_reference and adapter_reference:
        reference_off = reference_context(model)  # peft's disable_adapter: the starting weights, shared
        if config.precompute_ref:
            ref_train, ref_eval = precompute_reference(model, reference_off)
        else:
            live_ref = model
    optimizer, scheduler = optimizer_and_scheduler(model, config, total_steps)
    forward, optimizer = procs.prepare(model, optimizer)  # forward(fn, ...) = fn(model, ...) through DDP/FSDP
    run.start(total_steps, modules={"model": model}, optimizers={"model": optimizer},
              schedulers={"model": scheduler}, tokenizer=tokenizer)
    batches = batch_indices(len(pairs), step_size, config.seed, shuffle=config.shuffle, start_batch=run.start_step)

    def evaluate():
        with procs.gathered(forward):
            return evaluate_pairs(model, eval_pairs, ref_eval, config, device, reference)

    with run:
        for step in run.steps():
            indices = list(next(batches))  # the step's global batch; this rank trains on its share
            chunks = micro_batches(procs.shard(indices), config.grad_accum)
            z0 = None
            if loss_type == losses.DPOLoss.kto and (len(chunks) > 1 or procs.world > 1):
                # z0 is a batch statistic: over the whole step, every rank's share included
                with torch.no_grad(), autocast(device, config.precision):
                    _, kl_policy, _, _ = forward(sequence_logps, [pairs[i] for i in indices], device)
                z0 = losses.kto_reference_point(kl_policy, reference(indices, ref_train, pairs)[1].to(device))
            means, step_loss = WeightedMeans(), 0.0
            for k, chunk in enumerate(chunks):
                share = len(chunk) / len(indices)  # each micro-batch's share of the step's pairs (all ranks)
                with procs.accumulating(forward, last=k == len(chunks) - 1):
                    with autocast(device, config.precision):
                        loss, metrics = forward(pair_loss, [pairs[i] for i in chunk],
                                                reference(chunk, ref_train, pairs), config, device, reference_point=z0)
                    procs.backward(loss * share)
                means.add(metrics, share)
                step_loss += float(loss.detach()) * share
            step_loss = procs.sum(step_loss)
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, config.max_grad_norm, loss=step_loss)

            if eval_pairs and run.eval_due(step):
                run.log_metrics(step, {f"eval/{k}": v for k, v in evaluate().items()})
            logged = means.means(procs)
            logged.pop("loss", None)  # a non-finite loss is left out of the means: step_loss keeps it
            run.end_step(step, {"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                **logged},
                         tokens=sum(len(e) for i in indices for e in pairs[i].examples()), pairs=len(indices))

    report = evaluate() if eval_pairs else {}
    if report:
        run.log_metrics(run.step, {f"eval/{k}": v for k, v in report.items()})
    return run.finish({"loss": loss_type.value, "eval": report})


@torch.no_grad()
def evaluate_pairs(model, pairs: list[Pair] | list[Unpaired], cached, config: DPOConfig, device, reference
                   ) -> dict[str, float]:
    """Pair-weighted means of the loss metrics over held-out pairs (KTO: examples)."""
    model.eval()
    means = WeightedMeans()
    for start in range(0, len(pairs), config.batch_size):
        chunk = list(range(start, min(start + config.batch_size, len(pairs))))
        _, metrics = pair_loss(model, [pairs[i] for i in chunk], reference(chunk, cached, pairs), config, device)
        means.add(metrics, len(chunk))
    model.train()
    return means.means()
