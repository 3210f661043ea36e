"""Atomic checkpoints (named modules, optimizers, schedulers, RNG streams, step) and exact resume.

Layout inside a run directory::

    checkpoints/step-000040/   the policy (save_pretrained), other modules in sub-directories, trainer_state.pt,
                               state.json
    checkpoints/latest          the name of the newest complete checkpoint

Each checkpoint is written to a temporary directory and renamed into place, then ``latest`` is replaced atomically,
so a run killed at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from posttrain.data.io import atomic_write_text

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_atomic(model, tokenizer, out_dir: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then rename over ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _save_module(module, directory: Path) -> None:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(directory, safe_serialization=True)
    else:  # a plain nn.Module (e.g. a value head): its state dict
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, directory / "model.safetensors")


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    modules: dict[str, Any],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    tokenizer=None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically and point ``checkpoints/latest`` at it.

    The first of ``modules`` (the policy) is saved with ``save_pretrained`` at the checkpoint's root, any other
    (a value head, ...) in a sub-directory of its name; ``trainer_state.pt`` holds every optimizer and scheduler by
    name, the global RNG states and the named ``generators`` (e.g. the sampling stream of online RL).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    for i, (module_name, module) in enumerate(modules.items()):
        _save_module(module, tmp if i == 0 else tmp / module_name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({
        "optimizer": {k: o.state_dict() for k, o in optimizers.items()},
        "scheduler": {k: s.state_dict() for k, s in schedulers.items()},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "rng": rng_state(),
    }, tmp / STATE_FILE)
    (tmp / "state.json").write_text(json.dumps({"step": step, "modules": list(modules), **(extra or {})}, indent=1))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def _load_module(module, directory: Path, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(shard))
    missing, unexpected = module.load_state_dict(weights, strict=False)
    # Tied weights are saved once; anything else missing means a wrong checkpoint.
    config = getattr(module, "config", None)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{checkpoint}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def load_checkpoint(checkpoint: Path, *, modules: dict[str, Any], optimizers: dict[str, Any],
                    schedulers: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore, in place, the named modules, optimizers, schedulers and generators saved by :func:`save_checkpoint`,
    and the global RNG states; returns state.json (step, ...)."""
    checkpoint = Path(checkpoint)
    for i, (name, module) in enumerate(modules.items()):
        _load_module(module, checkpoint if i == 0 else checkpoint / name, checkpoint)
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    for what, objects in (("optimizer", optimizers), ("scheduler", schedulers)):
        if set(state[what]) != set(objects):
            raise RuntimeError(f"{checkpoint}: holds {what}s {sorted(state[what])}, the run has {sorted(objects)}")
        for name, obj in objects.items():
            obj.load_state_dict(state[what][name])
    for name, generator in (generators or {}).items():
        generator.set_state(state["generators"][name])
    set_rng_state(state["rng"])
    return read_checkpoint_state(checkpoint)
