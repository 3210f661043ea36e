"""Shared plumbing of the benchmark scripts: the shared workload files, fresh-process runs, tables, ratios."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SHARED = ROOT.parent / "shared" / "bench"
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def training_bench_parser(doc: str, stage: str) -> argparse.ArgumentParser:
    """The options every posttrain-vs-TRL training benchmark takes; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared bench folder")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work", help="tiny model + data go here")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-trl", action="store_true", help="measure posttrain only")
    parser.add_argument("--results", type=Path, default=HERE / "results" / f"{stage}.jsonl")
    parser.add_argument("--one", metavar="TAG", help=argparse.SUPPRESS)  # internal: one posttrain run
    return parser


def ensure_workload(shared: Path, work: Path) -> tuple[Path, Path]:
    """The shared tiny Llama and data (built by the shared scripts, bit-identical to TRL's reference runs)."""
    model, data = work / "tiny", work / "data"
    env = {**os.environ, **ENV}
    if not (model / "model.safetensors").exists():
        subprocess.run([sys.executable, str(shared / "make_tiny.py"), str(model)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    if not (data / "sft.jsonl").exists():
        subprocess.run([sys.executable, str(shared / "make_data.py"), str(model), str(data)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return model, data


def run_subprocess(cmd: list[str], results: Path | None = None) -> dict | None:
    """Run one measurement in a fresh process; its last JSON line is returned (and appended to ``results``)."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED: {' '.join(cmd)}\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    if results is not None:
        with results.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def table(rows: list[dict]) -> str:
    out = ["| lib | run | s/step median | train tok/s | peak RSS MB | steal |", "|---|---|---|---|---|---|"]
    for r in rows:
        steal = r.get("cpu_steal_fraction")
        out.append(f"| {r['lib']} | {r['tag']} | {r['step_s_median']:.3f} | {r['train_tokens_per_s']:.0f} | "
                   f"{r['peak_rss_mb']:.0f} | {'-' if steal is None else f'{steal:.1%}'} |")
    return "\n".join(out)


def ratio_line(rows: list[dict], target: float) -> str:
    tps = {lib: [r["train_tokens_per_s"] for r in rows if r["lib"] == lib] for lib in ("posttrain", "trl")}
    rss = {lib: [r["peak_rss_mb"] for r in rows if r["lib"] == lib] for lib in ("posttrain", "trl")}
    if not (tps["posttrain"] and tps["trl"]):
        return ""
    ratio = statistics.mean(tps["posttrain"]) / statistics.mean(tps["trl"])
    return (f"train tok/s posttrain / TRL = {ratio:.2f}x (target >= {target}x);  peak RSS posttrain / TRL = "
            f"{statistics.mean(rss['posttrain']) / statistics.mean(rss['trl']):.2f}")


def interleaved_runs(script: str, stage: str, shared: Path, work: Path, model: Path, data: Path, *, repeats: int,
                     skip_trl: bool, results: Path) -> list[dict]:
    """posttrain (``script --one TAG`` in a fresh process), then TRL's shared runner, repeated: A B A B."""
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(1, repeats + 1):
        ours = run_subprocess([sys.executable, script, "--shared", str(shared), "--work", str(work),
                               "--one", f"run{rep}"], results)
        rows += [ours] if ours else []
        if not skip_trl:
            theirs = run_subprocess([sys.executable, str(shared / "trl_bench.py"), stage, "--model", str(model),
                                     "--data", str(data), "--tag", f"run{rep}"], results)
            rows += [theirs] if theirs else []
    return rows
