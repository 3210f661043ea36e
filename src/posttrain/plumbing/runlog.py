"""A run directory's logging: ``metrics.jsonl`` (namespaced keys), TensorBoard events, PNG plots at the end."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from posttrain.data.io import atomic_write_text


def _parse(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line as a record with a step, or None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class StageClock:
    """Wall-clock seconds of each named stage of a multi-stage command (demo, overopt): ``timed("sft")`` records the
    time since the previous call (or since the clock started) under "sft", and prints it when ``echo``."""

    def __init__(self, echo: bool = False):
        self.started = self.last = time.time()
        self.seconds: dict[str, float] = {}
        self.echo = echo

    def __call__(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now
        if self.echo:
            print(f"    ({name}: {self.seconds[name]:.0f} s)")

    def total(self) -> float:
        return round(time.time() - self.started, 1)


class MetricsLog:
    """Appends ``{"step": k, "train/loss": ...}`` lines to ``metrics.jsonl`` and mirrors them to TensorBoard.

    On resume from step k, lines logged after step k by the interrupted run are dropped first, so the file reads as
    one uninterrupted run. With ``clock=False`` (``--deterministic``) nothing read off the wall clock is written (the
    ``time`` of a line, throughputs ``*_per_s``), so two identical runs write identical files. ``enabled=False``
    (ranks other than 0 of a multi-process run) writes nothing.
    """

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True, clock: bool = True,
                 enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.clock, self.enabled = clock, enabled
        self._writer = None
        if not enabled:
            return
        if self.path.exists():  # a line torn by a crash mid-write is dropped with the steps after resume_step
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := _parse(line)) is not None and record["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)} if self.clock else {"step": step}
        for key, value in metrics.items():
            if not self.clock and key.endswith("_per_s"):
                continue
            value = float(value.item() if hasattr(value, "item") else value)
            record[key] = value
            if self._writer is not None and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: Path, keys: list[str] | None = None) -> list[Path]:
    """One PNG per metric namespace (``train``, ``eval``, ...) with a panel per metric; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for key, value in record.items():
            if "/" in key and (keys is None or key in keys) and isinstance(value, (int, float)):
                series[key.split("/")[0]][key].append((record["step"], value))
    written = []
    plot_dir = Path(run_dir) / "plots"
    for namespace, metrics in sorted(series.items()):
        plot_dir.mkdir(exist_ok=True)
        names = sorted(metrics)
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = zip(*metrics[name])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        out = plot_dir / f"{namespace}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written


def plot_against(run_dir: Path, x_key: str, y_keys: list[str], name: str) -> Path | None:
    """``y_keys`` against ``x_key`` over the logged steps that have them (e.g. RL's rewards against its KL to the
    reference: the over-optimization curve), one panel, in ``plots/{name}.png``; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if isinstance(r.get(x_key), (int, float))]
    curves = {key: [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float))] for key in y_keys}
    curves = {key: sorted(points) for key, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, points in curves.items():
        xs, ys = zip(*points)
        dots = ax.plot(xs, ys, marker=".", linestyle="none", alpha=0.4)[0]
        window = max(1, len(ys) // 8)  # a running mean over neighbouring x: the trend through noisy batches
        smooth = [sum(ys[max(0, i - window): i + window + 1]) / len(ys[max(0, i - window): i + window + 1])
                  for i in range(len(ys))]
        ax.plot(xs, smooth, color=dots.get_color(), label=key)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "plots" / f"{name}.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
