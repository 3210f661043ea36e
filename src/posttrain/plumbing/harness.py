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
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from posttrain.plumbing.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_state, save_checkpoint
from posttrain.plumbing.config import save_config
from posttrain.plumbing.runlog import MetricsLog
from posttrain.plumbing.training import seed_everything


def is_complete(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``model/complete.json`` of a finished run, if any."""
    marker = Path(run_dir) / "model" / "complete.json"
    return json.loads(marker.read_text()) if marker.exists() else None


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
    (final / "complete.json").write_text(json.dumps(info))
    plot_metrics(run_dir)
    return final


class Run:
    """One training run's plumbing (see the module docstring for the shape of a stage)."""

    def __init__(self, config, stage: str, *, on_step_end: Callable[[int, dict], None] | None = None):
        """Seeds python and torch with ``config.seed``; ``config`` needs ``out``, ``resume``, ``log_every``, ``eval_every``, ``save_every``, ``keep_last`` and
        ``progress`` (every ``TrainConfig`` has them). ``on_step_end(step, info)`` is called after every optimizer
        step with the keyword arguments the stage gave :meth:`end_step` (benchmarks and tests hook in here)."""
        self.config, self.stage, self.on_step_end = config, stage, on_step_end
        seed_everything(config.seed)  # python and torch: initialisation of new weights, dropout
        self.dir = Path(config.out)
        checkpoint = latest_checkpoint(self.dir)
        if checkpoint is not None and not config.resume:
            raise FileExistsError(f"{self.dir} already holds a run (checkpoint {checkpoint.name}); pass --resume to "
                                  "continue it or choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.dir / "config.yaml")
        (self.dir / "command.txt").write_text(" ".join(shlex.quote(a) for a in sys.argv) + "\n")
        self.checkpoint = checkpoint if config.resume else None
        self.start_step = read_checkpoint_state(checkpoint)["step"] if self.checkpoint is not None else 0
        self.complete = is_complete(self.dir) if config.resume else None
        if self.complete:
            print(f"{self.dir}: run already complete ({self.complete['steps']} steps); final model in "
                  f"{self.final_dir}. Nothing to do.")
        self.step = self.start_step
        self.total_steps = 0
        self.log: MetricsLog | None = None

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
        self.extra = {"total_steps": total_steps, **(extra or {})}
        if self.start_step:
            load_checkpoint(self.checkpoint, modules=modules, optimizers=optimizers, schedulers=schedulers,
                            generators=self.generators)
            print(f"resumed from step {self.start_step} of {total_steps}")
        self.log = MetricsLog(self.dir, resume_step=self.start_step)

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
        progress bar, call the ``on_step_end`` hook, and stop with a checkpoint if a signal asked to."""
        elapsed = time.perf_counter() - self._step_started
        self.step = step
        if step % self.config.log_every == 0 or step == self.total_steps:
            extra = {"train/tokens_per_s": info["tokens"] / elapsed} if "tokens" in info else {}
            self.log.log(step, {**metrics, **extra})
        if self.config.save_every and step % self.config.save_every == 0 and step < self.total_steps:
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
        return save_checkpoint(self.dir, step, modules=self.modules, optimizers=self.optimizers,
                               schedulers=self.schedulers, tokenizer=self.tokenizer, generators=self.generators,
                               extra=self.extra, keep_last=self.config.keep_last)

    def finish(self, info: dict[str, Any] | None = None) -> Path:
        """The last checkpoint, the metrics log closed, the final model in ``out/model`` with ``complete.json``
        (``{"steps", "stage", **info}``) and the plots; returns ``out/model``."""
        self.save_checkpoint(self.step)
        self.log.close()
        model = next(iter(self.modules.values()))
        return save_final_model(self.dir, model, self.tokenizer, {"steps": self.step, "stage": self.stage,
                                                                   **(info or {})})
