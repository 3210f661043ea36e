"""The run harness: everything around a training stage's loop body, written once.

A stage reads top to bottom like this (cleanrl's ppo.py, nanochat's chat_rl.py), the step body inline::

    run = Run(config, "sft", on_step_end=on_step_end)   # run dir + resolved config; refuses to overwrite a run
    if run.complete:                                    # --resume of a finished run: say so, do nothing
        return run.final_dir
    ... load data, model, optimizer, scheduler ...
    run.start(total_steps, modules={"model": model}, optimizers={"model": opt}, schedulers={"model": sched},
              tokenizer=tokenizer)                      # restores the latest checkpoint when resuming
    batches = batch_indices(..., start_batch=run.start_step)
    with run:                                           # progress bar; Ctrl-C / SIGTERM stop at a step boundary
        for step in run.steps():                        # start_step + 1 .. total_steps
            ... batch, forward, loss, backward, clip, optimizer step ...
            run.end_step(step, {"train/loss": ...}, tokens=n)   # log, checkpoint, progress, hook, stop
    run.finish({"eval": report})                        # last checkpoint, final model in out/model, plots

What it owns: the run directory with ``config.yaml`` and ``command.txt``; the refusal to overwrite an existing run
without ``--resume``; the already-complete check; resume from the latest checkpoint (any number of named modules,
optimizers, schedulers and ``torch.Generator`` streams, plus the global RNG states); ``metrics.jsonl`` / TensorBoard
/ plots; periodic atomic checkpoints; the progress bar; stopping only between optimizer steps on a signal; the final
save. What it does not own: anything a step computes. The data order is a pure function of (seed, step) (see
``batch_indices``), so resuming needs no sampler state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from posttrain.plumbing.checkpoint import (CheckpointError, checkpoint_dirs, find_checkpoint, load_checkpoint,
                                           read_checkpoint_state, remove_stale_temporaries, save_checkpoint,
                                           set_aside)
from posttrain.data.io import atomic_write_text
from posttrain.plumbing.config import ConfigError, config_to_dict, save_config, validate_config
from posttrain.plumbing.distributed import processes
from posttrain.plumbing.runlog import MetricsLog
from posttrain.plumbing.training import seed_everything


# Settings a resumed run may change: they are applied and recorded (resumes.jsonl, config.yaml). Any other change
# (data, model, learning rate, batch, steps, seed, loss, ...) would make the resumed run a different experiment
# than its checkpoint's, so resuming with it is refused, naming the setting (docs/reliability.md).
CHANGEABLE_ON_RESUME = ("log_every", "eval_every", "save_every", "keep_last", "progress", "device", "max_bad_steps",
                        "deterministic")


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite losses, gradients or weights; the message names the step and the checkpoint
    that is still good."""


def resolved_options(config) -> dict[str, Any]:
    """The options of ``config`` as JSON values (what a checkpoint stores and a resume compares)."""
    return json.loads(json.dumps(config_to_dict(config)))


def settings_changed(saved: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
    """{option: (saved value, new value)} for every option of ``config`` but ``resume`` and ``out`` that differs
    from ``saved`` (the resolved options a checkpoint was written with); two spellings of the same existing path
    are the same."""
    changed = {}
    for key, value in resolved_options(config).items():
        old = saved.get(key, value)
        if key in ("resume", "out") or old == value:
            continue
        if isinstance(old, str) and isinstance(value, str) and old and value and os.path.exists(old) \
                and os.path.exists(value) and os.path.samefile(old, value):
            continue
        changed[key] = (old, value)
    return changed


def set_deterministic() -> Callable[[], None]:
    """The documented deterministic set: deterministic kernels only (an op without one raises instead of silently
    varying), cuDNN's deterministic mode without autotuning, no TF32 matmuls, and the cuBLAS workspace setting
    deterministic cuBLAS needs (read when cuBLAS starts: set it in the environment too when CUDA was used before).
    On CPU the same inputs, seed and thread count already give the same results; this makes a GPU run keep that
    promise too (at some cost in speed). Returns a function that restores the previous flags."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
              matmul.allow_tf32, cudnn.allow_tf32)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = True, False, False, False

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0])
        cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = before[1:]

    return restore


def nonfinite_parameters(modules: dict[str, Any]) -> list[str]:
    """Names (``module.parameter``) of parameters holding a NaN or an infinity."""
    return [f"{name}.{p_name}" for name, module in modules.items() for p_name, p in module.named_parameters()
            if not bool(torch.isfinite(p).all())]


def is_complete(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``model/complete.json`` of a finished run, if any."""
    marker = Path(run_dir) / "model" / "complete.json"
    try:
        return json.loads(marker.read_text()) if marker.exists() else None
    except ValueError:  # torn by a crash of an older posttrain: the run is not known to be complete
        return None


@contextlib.contextmanager
def stop_at_step_boundary() -> Iterator[list[int]]:
    """Ctrl-C / SIGTERM ask the loop to stop *between* optimizer steps (the yielded list becomes non-empty), so a
    checkpoint never holds a half-applied update; a second signal aborts at once (the last checkpoint stays
    intact). Outside the main thread (where handlers cannot be installed) nothing is intercepted."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("\nstopping after this step (again to abort now)...", flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save_final_model(run_dir: Path, model, tokenizer, info: dict[str, Any], state_dict=None) -> Path:
    """The finished run's model in ``run_dir/model`` (atomic), its ``complete.json`` marker, and the plots."""
    from posttrain.plumbing.checkpoint import save_model_atomic
    from posttrain.plumbing.runlog import plot_metrics

    final = Path(run_dir) / "model"
    model.config.use_cache = True
    if getattr(model.config, "_attn_implementation", None) == "posttrain_segments":
        model.config._attn_implementation = "sdpa"  # the training-only attention; loaders pick their own
    save_model_atomic(model, tokenizer, final, state_dict=state_dict)
    atomic_write_text(final / "complete.json", json.dumps(info))
    plot_metrics(run_dir)
    return final


class Run:
    """One training run's plumbing (see the module docstring for the shape of a stage)."""

    def __init__(self, config, stage: str, *, on_step_end: Callable[[int, dict], None] | None = None,
                 global_batch: tuple[str, int] | None = None):
        """Validates ``config`` (a TrainConfig: ``out``, ``resume``, ``seed``, ``log_every``, ``eval_every``,
        ``save_every``, ``keep_last``, ``max_bad_steps``, ``deterministic``, ``progress``), seeds python and torch
        with ``config.seed``, and when resuming finds the checkpoint and checks the changed settings (see
        :meth:`_checkpoint_to_resume`). ``on_step_end(step, info)`` is called after every optimizer step with the
        keyword arguments the stage gave :meth:`end_step` (benchmarks and tests hook in here). ``global_batch``:
        (its name, its size), the units of a step that processes share (default ``batch_size * grad_accum``)."""
        self.config, self.stage, self.on_step_end = config, stage, on_step_end
        validate_config(config)
        # One process, or one of several under accelerate launch / torchrun: only rank 0 writes (plumbing/distributed)
        self.procs = processes(getattr(config, "device", "auto"))
        self.device = self.procs.device
        self.global_batch = global_batch or ("batch_size * grad_accum", config.batch_size * config.grad_accum)
        self.procs.check_divisible(self.global_batch[1], self.global_batch[0])
        if getattr(config, "lora_r", 0) and self.procs.kind == "fsdp":
            raise ConfigError("LoRA (--lora_r) runs data-parallel with DDP (accelerate launch --multi_gpu), not FSDP: "
                              "the adapters are small and the frozen base is shared, so DDP is the fit (with "
                              "--load_in_4bit for a base that does not fit one GPU)")
        self._restore_flags = set_deterministic() if getattr(config, "deterministic", False) else None
        seed_everything(config.seed)  # python and torch: initialisation of new weights, dropout
        self.dir = Path(config.out)
        complete = is_complete(self.dir)
        self.complete = complete if config.resume else None
        if not config.resume and (checkpoint_dirs(self.dir) or list(self.dir.glob("checkpoints/step-*.damaged"))
                                  or complete):
            raise FileExistsError(f"{self.dir} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
        self.checkpoint, state = self._checkpoint_to_resume() if config.resume else (None, {})
        self.start_step = state.get("step", 0)
        self.skipped_steps, self.bad_in_a_row = state.get("skipped_steps", 0), state.get("bad_in_a_row", 0)
        self._saved_step = self.start_step if self.checkpoint is not None else None
        if self.complete:  # nothing runs, so nothing is written
            print(f"{self.dir}: run already complete ({self.complete['steps']} steps); final model in "
                  f"{self.final_dir}. Nothing to do.")
        elif self.procs.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.dir / "config.yaml",
                        launch=self.procs.describe(self.global_batch[1], config.grad_accum))
            (self.dir / "command.txt").write_text(" ".join(shlex.quote(a) for a in sys.argv) + "\n")
        self.procs.barrier()
        self.step = self.start_step
        self.total_steps = 0
        self.log: MetricsLog | None = None

    def _checkpoint_to_resume(self) -> tuple[Path | None, dict[str, Any]]:
        """(the newest intact checkpoint, its state.json), once the settings changed since it was written are known
        to be ones that may change (else :class:`ConfigError` naming them, before anything on disk is touched).
        Then, unless the run is already complete: damaged newer checkpoints are reported and set aside, the
        temporary directories of interrupted saves removed, and the resume recorded in ``resumes.jsonl``."""
        checkpoint, report, damaged = find_checkpoint(self.dir)
        if checkpoint is None:
            left = sorted(p.name for p in self.dir.glob("checkpoints/step-*") if p.is_dir())
            if left:
                raise CheckpointError(f"{self.dir}: no intact checkpoint to resume from ({'; '.join(report) or ''}"
                                      f"{'; ' if report else ''}on disk: {', '.join(left)}); move them away to start "
                                      "the run over, or choose another --out")
            return None, {}
        state = read_checkpoint_state(checkpoint)
        if state.get("num_processes", 1) != self.procs.world:
            raise ConfigError(f"{self.dir}: {checkpoint.name} was written by {state.get('num_processes', 1)} "
                              f"process(es), this run has {self.procs.world}: resume with the same number (each "
                              f"process's random streams are in the checkpoint), or start a new run from its weights "
                              f"(--model={checkpoint})")
        changed = settings_changed(state.get("config", {}), self.config)
        if refused := {k: v for k, v in changed.items() if k not in CHANGEABLE_ON_RESUME}:
            listed = "; ".join(f"--{k} was {old!r}, now {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(f"{self.dir}: cannot resume with changed settings ({listed}). A resumed run continues "
                              f"the checkpoint's experiment: drop these options to resume it as it was, or start a "
                              f"new run in another --out from its weights (--model={checkpoint}). Only "
                              f"{', '.join(sorted(CHANGEABLE_ON_RESUME))} may change on resume.")
        if self.complete:
            return checkpoint, state
        self.procs.barrier()  # every rank has found it before rank 0 moves damaged ones aside
        if self.procs.is_main:
            for line in report:
                print(f"warning: {line}", file=sys.stderr)
            set_aside(self.dir, damaged, checkpoint)
            for stale in remove_stale_temporaries(self.dir):
                print(f"removed {stale.name}, left by a save that was interrupted")
            if changed:
                print("resuming with changed settings: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                                      for k, (old, new) in changed.items()))
            with (self.dir / "resumes.jsonl").open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "checkpoint": checkpoint.name,
                                    "step": state["step"], "changed": {k: list(v) for k, v in changed.items()},
                                    "report": report}) + "\n")
        return checkpoint, state

    @property
    def final_dir(self) -> Path:
        return self.dir / "model"

    def start(self, total_steps: int, *, modules: dict[str, Any], optimizers: dict[str, Any],
              schedulers: dict[str, Any], tokenizer=None, generators: dict[str, torch.Generator] | None = None,
              extra: dict[str, Any] | None = None) -> None:
        """Register what a checkpoint holds (the first module is the one saved as the final model) and, when
        resuming, restore it all from the latest checkpoint."""
        self.total_steps = total_steps
        self.modules, self.optimizers, self.schedulers = modules, optimizers, schedulers
        self.tokenizer, self.generators = tokenizer, generators or {}
        self.extra = {"total_steps": total_steps, "config": resolved_options(self.config),
                      "num_processes": self.procs.world, **(extra or {})}
        if self.start_step:  # verified by find_checkpoint a moment ago: no second checksum pass
            load_checkpoint(self.checkpoint, modules=modules, optimizers=optimizers, schedulers=schedulers,
                            generators=self.generators, verify=False, procs=self.procs)
            print(f"resumed from step {self.start_step} of {total_steps}")
        self.log = MetricsLog(self.dir, resume_step=self.start_step,
                              clock=not getattr(self.config, "deterministic", False), enabled=self.procs.is_main)

    def __enter__(self) -> "Run":
        from tqdm.auto import tqdm

        self._signals = stop_at_step_boundary()
        self._stop_requested = self._signals.__enter__()
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.stage,
                         disable=not self.config.progress or not self.procs.is_main, dynamic_ncols=True)
        self._step_started = time.perf_counter()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._bar.close()
        self._signals.__exit__(kind, error, traceback)
        if kind is not None and self._restore_flags is not None:
            self._restore_flags()
        if isinstance(error, NonFiniteError) and "last good checkpoint" not in str(error):  # e.g. from the sampler
            raise NonFiniteError(f"{self.dir}: at step {self.step + 1}: {error}. {self._good_checkpoint()}") from error

    def steps(self) -> range:
        """The optimizer steps still to take, 1-based: ``start_step + 1 .. total_steps``."""
        return range(self.start_step + 1, self.total_steps + 1)

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after ``step`` (every ``eval_every`` steps; the final evaluation is the stage's)."""
        every = self.config.eval_every
        return bool(every) and step % every == 0 and step < self.total_steps

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Write ``metrics`` for ``step`` now (evaluation results)."""
        self.log.log(step, metrics)

    def end_step(self, step: int, metrics: dict[str, Any], **info: Any) -> None:
        """After the optimizer step: log ``metrics`` (every ``log_every`` steps and at the last one; with
        ``train/tokens_per_s`` when ``info`` has ``tokens``), checkpoint every ``save_every`` steps, advance the
        progress bar, call the ``on_step_end`` hook, and stop with a checkpoint if a signal asked to.

        A step whose ``train/loss``, ``train/grad_norm`` or ``value/loss`` is not finite was skipped by
        ``optimizer_step`` (rl: every update of the step was): it is
        logged (always, with ``train/skipped_steps``) and warned about, no checkpoint is written while such steps
        continue, and ``max_bad_steps`` of them in a row stop the run with :class:`NonFiniteError`."""
        elapsed = time.perf_counter() - self._step_started
        self.step = step
        bad = {k: float(metrics[k]) for k in ("train/loss", "train/grad_norm", "value/loss")
               if k in metrics and not math.isfinite(float(metrics[k]))}
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        self.skipped_steps += bool(bad)
        if bad:
            metrics = {**metrics, "train/skipped_steps": self.skipped_steps}
            print(f"warning: step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; update skipped "
                  f"({self.bad_in_a_row} in a row, the run stops at {self.config.max_bad_steps})", file=sys.stderr)
        if bad or step % self.config.log_every == 0 or step == self.total_steps:
            extra = {"train/tokens_per_s": info["tokens"] / elapsed} if "tokens" in info else {}
            self.log.log(step, {**metrics, **extra})
        if self.bad_in_a_row >= self.config.max_bad_steps:
            raise NonFiniteError(f"{self.dir}: {self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                 f"(the last at step {step}); stopped. {self._good_checkpoint()}")
        if self.config.save_every and step % self.config.save_every == 0 and step < self.total_steps and not bad:
            self.save_checkpoint(step)
        self._bar.update(1)
        if "train/loss" in metrics:
            self._bar.set_postfix(loss=f"{float(metrics['train/loss']):.4f}")
        if self.on_step_end is not None:
            self.on_step_end(step, info)
        # Under several processes the stop is decided together (a signal reaches the ranks at slightly different
        # moments; a rank that stopped alone would leave the others waiting in the next step's reduction).
        if self.procs.max(float(bool(self._stop_requested))) if self.procs.world > 1 else self._stop_requested:
            self.save_checkpoint(step)
            print(f"interrupted: checkpoint saved at step {step}; continue with --resume")
            raise KeyboardInterrupt
        self._step_started = time.perf_counter()

    def save_checkpoint(self, step: int) -> Path:
        """A checkpoint of everything registered; refused (:class:`NonFiniteError`) when a weight is not finite, so
        a bad state never replaces a good checkpoint."""
        if step == self._saved_step:  # saved already (a resume at its last step, Ctrl-C right after a save):
            return self.dir / "checkpoints" / f"step-{step:06d}"  # never delete a good copy to write it again
        if bad := nonfinite_parameters(self.modules):
            raise NonFiniteError(f"{self.dir}: at step {self.step} {len(bad)} parameters are non-finite "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was saved. "
                                 f"{self._good_checkpoint()}")
        path = save_checkpoint(self.dir, step, modules=self.modules, optimizers=self.optimizers,
                               schedulers=self.schedulers, tokenizer=self.tokenizer, generators=self.generators,
                               extra={**self.extra, "skipped_steps": self.skipped_steps,
                                      "bad_in_a_row": self.bad_in_a_row},
                               keep_last=self.config.keep_last, procs=self.procs)
        self._saved_step = step
        return path

    def _good_checkpoint(self) -> str:
        good = find_checkpoint(self.dir)[0]
        if good is None:
            return "There is no last good checkpoint: none was written yet."
        return (f"The last good checkpoint is {good}: start a new run from it (--model={good}, another --out) with a "
                "lower --lr or --max_grad_norm, or check the data.")

    def finish(self, info: dict[str, Any] | None = None) -> Path:
        """The last checkpoint, the metrics log closed, the final model in ``out/model`` with ``complete.json``
        (``{"steps", "stage", **info}``) and the plots; returns ``out/model``. Non-finite weights stop here
        (:class:`NonFiniteError`), before anything is written: a run never ends "complete" with them."""
        self.save_checkpoint(self.step)
        self.log.close()
        if self._restore_flags is not None:
            self._restore_flags()
        model = next(iter(self.modules.values()))
        state = self.procs.full_state_dict(model)  # collective under FSDP
        if self.procs.is_main:
            save_final_model(self.dir, model, self.tokenizer, {"steps": self.step, "stage": self.stage,
                                                               "skipped_steps": self.skipped_steps,
                                                               "num_processes": self.procs.world, **(info or {})},
                             state_dict=state)
        self.procs.barrier()  # the final model is on disk before any rank returns its path
        return self.final_dir
