"""Atomic, verified checkpoints (named modules, optimizers, schedulers, RNG streams, step) and exact resume.

Layout inside a run directory::

    checkpoints/step-000040/   the policy (save_pretrained), other modules in sub-directories, trainer_state.pt,
                               state.json, and manifest.json (written last: every other file's size and sha256)
    checkpoints/latest          the name of the newest checkpoint (a convenience: the directory is the truth)

A checkpoint is written to a temporary directory (``.step-000040.XXXX``), its manifest last, then renamed into
place, so a run killed at any moment leaves whole checkpoints and at most a temporary directory, which the next run
removes. Resume takes the newest checkpoint whose manifest verifies (:func:`find_checkpoint`): a damaged one
(truncated weights, a torn ``state.json``) is reported, renamed ``step-N.damaged`` (kept for inspection, never
loaded or counted; :func:`set_aside`) and the next older intact one is used; one without a manifest (an older
posttrain's) is reported and passed over, left in place. The ``latest`` pointer is never trusted
over the directory: missing or dangling, the newest intact checkpoint is found all the same. Retention keeps the
``keep_last`` newest checkpoints and never deletes the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from posttrain.data.io import atomic_write_text

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


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


def save_model_atomic(model, tokenizer, out_dir: Path, state_dict=None) -> None:
    """``save_pretrained`` into a temporary sibling, then rename over ``out_dir`` (``state_dict``: the full state of
    a sharded model, gathered on rank 0)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    _save_module(model, tmp, state_dict)
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


def _save_module(module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` (or a plain module's state dict as safetensors); ``state_dict``: the full state gathered
    from sharded (FSDP) parameters, else the module's own."""
    if hasattr(module, "peft_config"):  # LoRA: the adapters (and a trained head) in peft's format
        module.save_pretrained(directory, safe_serialization=True)
    elif hasattr(module, "save_pretrained"):
        module.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    else:  # a plain nn.Module (e.g. a value head): its state dict
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict or module.state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, directory / "model.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: every file under ``directory`` (but itself) with its size and sha256, each file and the
    manifest flushed to disk first, so a manifest on disk vouches for files that are on disk."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    with (directory / MANIFEST).open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(checkpoint: Path, *, checksums: bool = True) -> list[str]:
    """What is wrong with ``checkpoint`` (empty when every file of its manifest is there with its size and, when
    ``checksums``, its sha256)."""
    checkpoint = Path(checkpoint)
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST} (an interrupted save, or written by a posttrain without manifests)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"unreadable {MANIFEST}: {err}"]
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e)
                                              for e in files.values()):
        return [f"unreadable {MANIFEST}: not a map of file -> size and sha256"]
    problems = []
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}")
        elif checksums and _sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match its checksum")
    for required in ("state.json", STATE_FILE):
        if required not in files:
            problems.append(f"the manifest lists no {required}")
    return problems


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's ``checkpoints/step-N`` directories, oldest first (damaged and temporary ones excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary directories of saves that were interrupted (``checkpoints/.step-*``, ``.model.*``);
    one writer per run directory is assumed (the harness's)."""
    run_dir = Path(run_dir)
    stale = [p for p in [*run_dir.glob("checkpoints/.step-*"), *run_dir.glob(".model.*")] if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[str], list[Path]]:
    """(the newest intact checkpoint or None, a report line per checkpoint passed over and per pointer problem, the
    damaged checkpoints newer than it). Read-only: :func:`set_aside` acts on the result.

    Damaged: a manifest that does not verify (a truncated or altered file, a file missing). A checkpoint without a
    manifest (an older posttrain's, or one copied by hand) cannot be verified either; it is passed over and reported
    but left where it is, so the version that wrote it can still resume it."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    found, report, damaged = None, [], []
    for candidate in reversed(checkpoint_dirs(run_dir)):
        problems = verify_checkpoint(candidate)
        if not problems:
            found = candidate
            break
        if (candidate / MANIFEST).exists():
            damaged.append(candidate)
            report.append(f"checkpoint {candidate} is damaged ({'; '.join(problems)}): skipped")
        else:
            report.append(f"checkpoint {candidate} has no {MANIFEST} (written by an older posttrain, or by hand), "
                          f"so it cannot be verified: skipped and left as it is (a new run can start from its "
                          f"weights with --model={candidate})")
    if found is not None and named != found.name and not report:
        what = "is missing" if named is None else f"names {named!r}, which is not the newest intact checkpoint"
        report.append(f"checkpoints/latest {what}; using {found.name}")
    return found, report, damaged


def set_aside(run_dir: Path, damaged: list[Path], found: Path | None) -> None:
    """Rename each damaged checkpoint ``step-N.damaged`` (kept for inspection; never loaded, counted by retention
    or overwritten again) and point ``checkpoints/latest`` at ``found``."""
    for path in damaged:
        target = path.with_name(path.name + ".damaged")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if found is not None and (not pointer.is_file() or pointer.read_text(errors="replace").strip() != found.name):
        atomic_write_text(pointer, found.name)


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
    procs=None,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, with its manifest, and point ``checkpoints/latest`` at it.

    The first of ``modules`` (the policy) is saved with ``save_pretrained`` at the checkpoint's root, any other
    (a value head, ...) in a sub-directory of its name; ``trainer_state.pt`` holds every optimizer and scheduler by
    name, the global RNG states and the named ``generators`` (e.g. the sampling stream of online RL).

    Under several processes (``procs``, a :class:`~posttrain.plumbing.distributed.Processes`) every rank calls
    this: rank 0 writes the model, optimizer and scheduler (DDP keeps them identical on every rank; FSDP gathers
    the full state first), each other rank its own RNG states and generators as ``rank-N.pt`` into the same
    temporary directory, and rank 0 writes the manifest over all of them and renames.
    """
    rank, main = (procs.rank, procs.is_main) if procs is not None else (0, True)
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:06d}"
    full = [procs.full_state_dict(m) if procs is not None else None for m in modules.values()]
    optimizer_states = {k: procs.full_optimizer_state(o) if procs is not None else o.state_dict()
                        for k, o in optimizers.items()}
    tmp = None
    if main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    if procs is not None:
        tmp = Path(procs.broadcast(str(tmp)))
    if not main:
        torch.save({"generators": {k: g.get_state() for k, g in (generators or {}).items()}, "rng": rng_state()},
                   tmp / f"rank-{rank}.pt")
    if procs is not None:
        procs.barrier()  # every rank's file is in place
    if not main:
        procs.barrier()  # rank 0 has renamed
        return root / name
    try:
        for i, (module_name, module) in enumerate(modules.items()):
            _save_module(module, tmp if i == 0 else tmp / module_name, full[i])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({
            "optimizer": optimizer_states,
            "scheduler": {k: s.state_dict() for k, s in schedulers.items()},
            "generators": {k: g.get_state() for k, g in (generators or {}).items()},
            "rng": rng_state(),
        }, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps({"step": step, "modules": list(modules), **(extra or {})}, indent=1))
        write_manifest(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if procs is not None:
            procs.barrier()
    atomic_write_text(root / "latest", name)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints, unless that would leave no intact one: then the newest
    intact older checkpoint stays too, and when there is none either, nothing is deleted."""
    existing = checkpoint_dirs(run_dir)
    keep = max(1, keep_last)
    kept, older = existing[-keep:], existing[:-keep]
    # Sizes only: the newest was verified as it was written; checksumming every save would cost minutes on a 7B.
    if older and all(verify_checkpoint(c, checksums=False) for c in kept):
        intact = [c for c in older if not verify_checkpoint(c, checksums=False)]
        older = [c for c in older if intact and c != intact[-1]]
    for old in older:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of the run."""
    return find_checkpoint(run_dir)[0]


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def _load_module(module, directory: Path, checkpoint: Path, procs=None) -> None:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(shard))
    if hasattr(module, "peft_config"):  # LoRA: peft maps its saved names onto the adapter's parameters
        from peft import set_peft_model_state_dict

        unexpected = set_peft_model_state_dict(module, weights).unexpected_keys
        if unexpected or not weights:
            raise CheckpointError(f"{checkpoint}: the adapter does not match the model (unexpected {unexpected}, "
                                  f"{len(weights)} tensors)")
        return
    loaded = procs.load_module_state(module, weights) if procs is not None else module.load_state_dict(weights,
                                                                                                       strict=False)
    missing, unexpected = loaded
    # Tied weights are saved once; anything else missing means a wrong checkpoint.
    config = getattr(module, "config", None)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model (missing {missing}, "
                              f"unexpected {unexpected})")


def load_checkpoint(checkpoint: Path, *, modules: dict[str, Any], optimizers: dict[str, Any],
                    schedulers: dict[str, Any], generators: dict[str, torch.Generator] | None = None,
                    verify: bool = True, procs=None) -> dict[str, Any]:
    """Verify ``checkpoint`` against its manifest (unless the caller just did: ``verify=False`` spares a second
    checksum pass, minutes on a 7B model), then restore, in place, the named modules, optimizers, schedulers and
    generators saved by :func:`save_checkpoint`, and the global RNG states; returns state.json (step, ...).
    Under several processes (``procs``) each rank restores the full state and then its own RNG streams."""
    checkpoint = Path(checkpoint)
    if verify and (problems := verify_checkpoint(checkpoint)):
        raise CheckpointError(f"{checkpoint}: {'; '.join(problems)}")
    for i, (name, module) in enumerate(modules.items()):
        _load_module(module, checkpoint if i == 0 else checkpoint / name, checkpoint, procs)
    # map_location: a checkpoint written on a GPU resumes on another device (load_state_dict moves the state)
    state = torch.load(checkpoint / STATE_FILE, weights_only=False, map_location="cpu")
    for what, objects in (("optimizer", optimizers), ("scheduler", schedulers)):
        if set(state[what]) != set(objects):
            raise CheckpointError(f"{checkpoint}: holds {what}s {sorted(state[what])}, the run has {sorted(objects)}")
        for name, obj in objects.items():
            if what == "optimizer" and procs is not None:
                procs.load_optimizer_state(obj, state[what][name])
            else:
                obj.load_state_dict(state[what][name])
    if procs is not None and not procs.is_main:
        state = torch.load(checkpoint / f"rank-{procs.rank}.pt", weights_only=False, map_location="cpu")
    for name, generator in (generators or {}).items():
        generator.set_state(state["generators"][name])
    set_rng_state(state["rng"])
    return read_checkpoint_state(checkpoint)
