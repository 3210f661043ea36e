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
                                           read_checkpoint_state, remove_stale_temporaries, save_checkpoint)
from posttrain.data.io import atomic_write_text
from posttrain.plumbing.config import ConfigError, config_to_dict, save_config, validate_config
from posttrain.plumbing.runlog import MetricsLog
from posttrain.plumbing.training import seed_everything


# Settings a resumed run may change: they are applied and recorded (resumes.jsonl, config.yaml). Any other change
# (data, model, learning rate, batch, steps, seed, loss, ...) would make the resumed run a different experiment
# than its checkpoint's, so resuming with it is refused, naming the setting (docs/reliability.md).
CHANGEABLE_ON_RESUME = ("resume", "out", "log_every", "eval_every", "save_every", "keep_last", "progress", "device",
                        "max_bad_steps", "deterministic")


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite losses, gradients or weights; the message names the step and the checkpoint
    that is still good."""


def settings_changed(saved: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
    """{option: (saved value, new value)} for every option of ``config`` that differs from ``saved`` (the
    resolved options a checkpoint was written with); two spellings of the same existing path are the same."""
    current = json.loads(json.dumps(config_to_dict(config)))
    changed = {}
    for key, value in current.items():
        old = saved.get(key, value)
        if key == "resume":
            continue
        if old == value:
            continue
        if isinstance(old, str) and isinstance(value, str) and old and value and os.path.exists(old) \
                and os.path.exists(value) and os.path.samefile(old, value):
            continue
        changed[key] = (old, value)
    return changed


def set_deterministic() -> None:
    """The documented deterministic set: deterministic kernels only (an op without one raises instead of silently
    varying), cuDNN's deterministic mode without autotuning, no TF32 matmuls, and the cuBLAS workspace setting
    deterministic cuBLAS needs. On CPU the same inputs, seed and thread count already give the same results; this
    makes a GPU run keep that promise too (at some cost in speed)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


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


def save_final_model(run_dir: Path, model, tokenizer, info: dict[str, Any]) -> Path:
    """The finished run's model in ``run_dir/model`` (atomic), its ``complete.json`` marker, and the plots."""
    from posttrain.plumbing.checkpoint import save_model_atomic
    from posttrain.plumbing.runlog import plot_metrics

    final = Path(run_dir) / "model"
    model.config.use_cache = True
    if getattr(model.config, "_attn_implementation", None) == "posttrain_segments":
        model.config._attn_implementation = "sdpa"  # the training-only attention; loaders pick their own
    save_model_atomic(model, tokenizer, final)
    atomic_write_text(final / "complete.json", json.dumps(info))
    plot_metrics(run_dir)
    return final


class Run:
    """One training run's plumbing (see the module docstring for the shape of a stage)."""

    def __init__(self, config, stage: str, *, on_step_end: Callable[[int, dict], None] | None = None):
        """Seeds python and torch with ``config.seed``; ``config`` needs ``out``, ``resume``, ``log_every``, ``eval_every``, ``save_every``, ``keep_last`` and
        ``progress`` (every ``TrainConfig`` has them). ``on_step_end(step, info)`` is called after every optimizer
        step with the keyword arguments the stage gave :meth:`end_step` (benchmarks and tests hook in here)."""
        self.config, self.stage, self.on_step_end = config, stage, on_step_end
        validate_config(config)
        if getattr(config, "deterministic", False):
            set_deterministic()
        seed_everything(config.seed)  # python and torch: initialisation of new weights, dropout
        self.dir = Path(config.out)
        self.checkpoint: Path | None = None
        self.complete = is_complete(self.dir) if config.resume else None
        if not config.resume and checkpoint_dirs(self.dir):
            raise FileExistsError(f"{self.dir} already holds a run (checkpoint {checkpoint_dirs(self.dir)[-1].name}); "
                                  "pass --resume to continue it or choose another --out")
        if config.resume and not self.complete:
            self.checkpoint = self._checkpoint_to_resume()
        self.start_step = read_checkpoint_state(self.checkpoint)["step"] if self.checkpoint is not None else 0
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.dir / "config.yaml")
        (self.dir / "command.txt").write_text(" ".join(shlex.quote(a) for a in sys.argv) + "\n")
        if self.complete:
            print(f"{self.dir}: run already complete ({self.complete['steps']} steps); final model in "
                  f"{self.final_dir}. Nothing to do.")
        self.step = self.start_step
        self.total_steps = 0
        self.bad_in_a_row = self.skipped_steps = 0
        self.log: MetricsLog | None = None

    def _checkpoint_to_resume(self) -> Path | None:
        """The newest intact checkpoint (damaged newer ones reported and set aside, the temporary directories of
        interrupted saves removed), after checking that the settings changed since it was written may change."""
        for stale in remove_stale_temporaries(self.dir):
            print(f"removed {stale.name}, left by a save that was interrupted")
        checkpoint, report = find_checkpoint(self.dir)
        for line in report:
            print(f"warning: {line}", file=sys.stderr)
        if checkpoint is None:
            damaged = sorted(p.name for p in self.dir.glob("checkpoints/step-*.damaged"))
            if damaged:
                raise CheckpointError(f"{self.dir}: no intact checkpoint to resume from (damaged: "
                                      f"{', '.join(damaged)}); remove them to start the run over, or choose another "
                                      "--out")
            return None
        state = read_checkpoint_state(checkpoint)
        saved = state.get("config")
        if saved is None and (self.dir / "config.yaml").exists():  # a checkpoint from before configs were kept in it
            import yaml

            saved = yaml.safe_load((self.dir / "config.yaml").read_text()) or {}
        changed = settings_changed(saved or {}, self.config)
        refused = {k: v for k, v in changed.items() if k not in CHANGEABLE_ON_RESUME}
        if refused:
            listed = "; ".join(f"--{k} was {old!r}, now {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(f"{self.dir}: cannot resume with changed settings ({listed}). A resumed run continues "
                              f"the checkpoint's experiment: drop these options to resume it as it was, or start a new "
                              f"run in another --out (e.g. --model={self.dir / 'model'} once it is complete). Only "
                              f"{', '.join(CHANGEABLE_ON_RESUME[2:])} may change on resume.")
        if changed:
            print("resuming with changed settings: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                                  for k, (old, new) in changed.items()))
        with (self.dir / "resumes.jsonl").open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "checkpoint": checkpoint.name, "step": state["step"],
                                "changed": {k: list(v) for k, v in changed.items()}, "report": report}) + "\n")
        return checkpoint

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
        self.extra = {"total_steps": total_steps, "config": json.loads(json.dumps(config_to_dict(self.config))),
                      **(extra or {})}
        if self.start_step:
            load_checkpoint(self.checkpoint, modules=modules, optimizers=optimizers, schedulers=schedulers,
                            generators=self.generators)
            print(f"resumed from step {self.start_step} of {total_steps}")
        self.log = MetricsLog(self.dir, resume_step=self.start_step,
                              clock=not getattr(self.config, "deterministic", False))

    def __enter__(self) -> "Run":
        from tqdm.auto import tqdm

        self._signals = stop_at_step_boundary()
        self._stop_requested = self._signals.__enter__()
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.stage,
                         disable=not self.config.progress, dynamic_ncols=True)
        self._step_started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self._signals.__exit__(*exc)

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

        A step whose ``train/loss`` or ``train/grad_norm`` is not finite was skipped by ``optimizer_step``: it is
        logged (always, with ``train/skipped_steps``) and warned about, no checkpoint is written while such steps
        continue, and ``max_bad_steps`` of them in a row stop the run with :class:`NonFiniteError`."""
        elapsed = time.perf_counter() - self._step_started
        self.step = step
        bad = {k: float(metrics[k]) for k in ("train/loss", "train/grad_norm")
               if k in metrics and not math.isfinite(float(metrics[k]))}
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        self.skipped_steps += bool(bad)
        if bad:
            metrics = {**metrics, "train/skipped_steps": self.skipped_steps}
            print(f"warning: step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; update skipped "
                  f"({self.bad_in_a_row} in a row, the run stops at {self.config.max_bad_steps})", file=sys.stderr)
        if bad or step % self.config.log_every == 0 or step == self.total_steps:
            extra = {"train/tokens_per_s": info["tokens"] / elapsed} if "tokens" in info and self.log.clock else {}
            self.log.log(step, {**metrics, **extra})
        if self.bad_in_a_row >= self.config.max_bad_steps:
            self._bar.close()
            good = find_checkpoint(self.dir, quarantine=False)[0]
            raise NonFiniteError(f"{self.dir}: {self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                 f"(the last at step {step}); stopped. The last good checkpoint is "
                                 f"{good if good else 'none (no checkpoint was written yet)'}. Try a lower --lr, "
                                 f"--max_grad_norm, or check the data.")
        if self.config.save_every and step % self.config.save_every == 0 and step < self.total_steps and not bad:
            self.save_checkpoint(step)
        self._bar.update(1)
        if "train/loss" in metrics:
            self._bar.set_postfix(loss=f"{float(metrics['train/loss']):.4f}")
        if self.on_step_end is not None:
            self.on_step_end(step, info)
        if self._stop_requested:
            self.save_checkpoint(step)
            print(f"interrupted: checkpoint saved at step {step}; continue with --resume")
            raise KeyboardInterrupt
        self._step_started = time.perf_counter()

    def save_checkpoint(self, step: int) -> Path:
        """A checkpoint of everything registered; refused (:class:`NonFiniteError`) when a weight is not finite, so
        a bad state never replaces a good checkpoint."""
        if bad := nonfinite_parameters(self.modules):
            good = find_checkpoint(self.dir, quarantine=False)[0]
            raise NonFiniteError(f"{self.dir}: at step {self.step} {len(bad)} parameters are non-finite "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was saved. The "
                                 f"last good checkpoint is {good if good else 'none'}.")
        return save_checkpoint(self.dir, step, modules=self.modules, optimizers=self.optimizers,
                               schedulers=self.schedulers, tokenizer=self.tokenizer, generators=self.generators,
                               extra=self.extra, keep_last=self.config.keep_last)

    def finish(self, info: dict[str, Any] | None = None) -> Path:
        """The last checkpoint, the metrics log closed, the final model in ``out/model`` with ``complete.json``
        (``{"steps", "stage", **info}``) and the plots; returns ``out/model``. Non-finite weights stop here
        (:class:`NonFiniteError`), before anything is written: a run never ends "complete" with them."""
        self.save_checkpoint(self.step)
        self.log.close()
        model = next(iter(self.modules.values()))
        return save_final_model(self.dir, model, self.tokenizer, {"steps": self.step, "stage": self.stage,
                                                                   "skipped_steps": self.skipped_steps,
                                                                   **(info or {})})
