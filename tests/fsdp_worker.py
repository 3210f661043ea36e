"""One rank of the FSDP check in tests/test_distributed.py (run by torchrun with 2 CPU processes over gloo).

accelerate applies FSDP2 only on GPUs, so this rank shards the model itself as accelerate's FSDP2 plugin does
(``fully_shard`` on each decoder layer, then on the root: posttrain's ``CallThrough`` wrapper), marks its
:class:`Processes` as FSDP and runs posttrain's own pieces: the forward through the wrapper, the global token-mean
loss, the gradient norm over DTensor shards, the checkpoint save (full state gathered on rank 0) and load
(scattered back into the shards). Arguments: MODEL_DIR DATA_JSONL OUT_DIR STEPS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from posttrain.data import collate_flat, load_sft_examples
from posttrain.maths.sft import sft_loss
from posttrain.models import load_causal_lm, load_tokenizer, trained_token_logits
from posttrain.plumbing.checkpoint import load_checkpoint, save_checkpoint
from posttrain.plumbing.distributed import CallThrough, processes
from posttrain.plumbing.training import batch_indices, build_optimizer, grad_norm_and_clip, micro_batches


def sharded(model_dir: str):
    model = load_causal_lm(model_dir)
    model.config.use_cache = False
    wrapper = CallThrough(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(wrapper)
    return model, wrapper


def train(model_dir: str, data: str, steps: int, procs):
    """``steps`` SFT steps of 8 conversations in 2 micro-batches, each rank on its share (FSDP-sharded when
    ``procs`` is several processes, else the whole model in this process): (model, optimizer, losses, norms)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    examples, _ = load_sft_examples(data, tokenizer)
    if procs.world > 1:
        model, forward = sharded(model_dir)
    else:
        model = load_causal_lm(model_dir)
        forward = lambda fn, *args: fn(model, *args)  # noqa: E731
    optimizer = build_optimizer(model, 1e-3, 0.0)
    procs._model_of[id(optimizer)] = model
    losses, norms = [], []
    batches = batch_indices(len(examples), 8, seed=0)
    for _ in range(steps):
        chunks = micro_batches(procs.shard(next(batches)), 2)
        micro = [collate_flat([examples[i] for i in chunk], tokenizer.pad_token_id) for chunk in chunks]
        num_tokens = int(procs.sum(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)))
        loss_sum = 0.0
        for batch in micro:  # FSDP2 reduces the gradients of every micro-batch; summed, they are the step's
            loss, metrics = sft_loss(*forward(trained_token_logits, batch), num_tokens=num_tokens)
            procs.backward(loss)
            loss_sum += float(metrics["loss"])
        losses.append(procs.sum(loss_sum))
        norms.append(grad_norm_and_clip(model, 0.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, losses, norms


def main(model_dir: str, data: str, out: str, steps: int) -> None:
    procs = processes("cpu")  # joins the 2-process group (gloo)
    procs.kind = "fsdp"
    model, optimizer, losses, norms = train(model_dir, data, steps, procs)
    path = save_checkpoint(Path(out), steps, modules={"model": model}, optimizers={"model": optimizer},
                           schedulers={}, extra={}, procs=procs)
    full = procs.full_state_dict(model)  # collective: every rank calls it, rank 0 gets the weights
    model2, _ = sharded(model_dir)
    optimizer2 = build_optimizer(model2, 1e-3, 0.0)
    procs._model_of[id(optimizer2)] = model2
    load_checkpoint(path, modules={"model": model2}, optimizers={"model": optimizer2}, schedulers={}, procs=procs)
    reloaded = procs.full_state_dict(model2)
    state_again = procs.full_optimizer_state(optimizer2)
    state_before = procs.full_optimizer_state(optimizer)
    if procs.is_main:
        same_weights = all(torch.equal(full[k], reloaded[k]) for k in full)
        first = next(iter(state_before["state"]))
        same_adam = all(torch.equal(state_before["state"][first][k], state_again["state"][first][k])
                        for k in ("exp_avg", "exp_avg_sq"))
        torch.save(full, Path(out) / "final_weights.pt")
        (Path(out) / "result.json").write_text(json.dumps({"losses": losses, "norms": norms, "same_weights":
                                                           same_weights, "same_adam": same_adam,
                                                           "sharded": type(next(model.parameters())).__name__}))
    procs.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
