"""SFT throughput: posttrain vs TRL's SFTTrainer on the shared CPU workload (../shared/bench).

Same tiny Llama (make_tiny.py), same data (make_data.py), same hyper-parameters (workloads.WORKLOADS["sft"]):
8 conversations per step in file order, max length 256 (truncate), 40 steps, AdamW lr 1e-4 constant, grad-clip 1,
fp32, 2 threads, loss on assistant tokens only. Measured the shared way (benchlib.StepTimer: step 1 excluded; train
tok/s = non-padding tokens in grad-enabled forwards / measured window; peak RSS of the whole process).

posttrain runs its real `train_sft` loop (the same code as `posttrain sft`). Its speed comes from two things that do
not change the loss: padding-free batches (the step's 8 conversations packed into rows with block-diagonal
attention, so no FLOPs go to padding) and the LM head applied only at trained positions.

Runs are interleaved (posttrain, TRL, posttrain, TRL, ...), each in a fresh process, and appended to
benchmarks/results/sft.jsonl. Usage:

    python benchmarks/sft.py [--repeats 2] [--skip-trl] [--shared ../shared/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SHARED = ROOT.parent / "shared" / "bench"
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def ensure_workload(shared: Path, work: Path) -> tuple[Path, Path]:
    model, data = work / "tiny", work / "data"
    env = {**os.environ, **ENV}
    if not (model / "model.safetensors").exists():
        subprocess.run([sys.executable, str(shared / "make_tiny.py"), str(model)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    if not (data / "sft.jsonl").exists():
        subprocess.run([sys.executable, str(shared / "make_data.py"), str(model), str(data)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return model, data


def run_posttrain_once(shared: Path, model: Path, data: Path, tag: str) -> dict:
    """One measured posttrain SFT run in this process (called in a fresh subprocess by main)."""
    sys.path.insert(0, str(shared))
    import benchlib  # noqa: E402  (the shared measurement code)
    from workloads import WORKLOADS  # noqa: E402

    benchlib.setup_threads(2)
    rss_after_import = benchlib.peak_rss_mb()
    from posttrain.sft import SFTConfig, train_sft

    wl = WORKLOADS["sft"]
    counter = benchlib.TokenCounter()  # tokens are added by hand: posttrain feeds packed rows to the backbone
    timer = benchlib.StepTimer(counter)

    def on_step_end(step: int, info: dict) -> None:
        counter.c["grad_tokens"] += info["tokens"]
        counter.c["grad_calls"] += 1
        timer.mark()

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            model=str(model), data=str(data / wl["data"]), out=out, max_length=wl["max_length"], truncation="right",
            batch_size=wl["batch_size"], max_steps=wl["steps"], lr=wl["lr"], lr_schedule="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, shuffle=False, seed=0, precision="fp32",
            device="cpu", save_every=0, log_every=10, progress=False,
        )
        started = time.perf_counter()
        timer.start()
        train_sft(config, on_step_end=on_step_end)
        train_s = time.perf_counter() - started
        losses = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {
        "lib": "posttrain", "stage": "sft", "tag": tag, "workload": wl, **timer.summary(warmup=wl["warmup"]),
        "peak_rss_mb": benchlib.peak_rss_mb(), "peak_rss_after_imports_mb": rss_after_import, "train_s": train_s,
        "log_history": [{"step": r["step"], "loss": r["train/loss"]} for r in losses if "train/loss" in r],
        "env": benchlib.env_info(),
    }


def run_subprocess(cmd: list[str], results: Path) -> dict | None:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED: {' '.join(cmd)}\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    with results.open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(rows: list[dict]) -> str:
    out = ["| lib | run | s/step median | train tok/s | peak RSS MB | steal |", "|---|---|---|---|---|---|"]
    for r in rows:
        steal = r.get("cpu_steal_fraction")
        out.append(f"| {r['lib']} | {r['tag']} | {r['step_s_median']:.3f} | {r['train_tokens_per_s']:.0f} | "
                   f"{r['peak_rss_mb']:.0f} | {steal:.1%} |" if steal is not None else "| - |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared bench folder")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work", help="tiny model + data go here")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-trl", action="store_true", help="measure posttrain only")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "sft.jsonl")
    parser.add_argument("--one", metavar="TAG", help=argparse.SUPPRESS)  # internal: one posttrain run
    args = parser.parse_args()
    model, data = ensure_workload(args.shared, args.work)
    if args.one:
        print(json.dumps(run_posttrain_once(args.shared, model, data, args.one)))
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(1, args.repeats + 1):
        ours = run_subprocess([sys.executable, __file__, "--shared", str(args.shared), "--work", str(args.work),
                               "--one", f"run{rep}"], args.results)
        rows += [ours] if ours else []
        if not args.skip_trl:
            theirs = run_subprocess([sys.executable, str(args.shared / "trl_bench.py"), "sft", "--model", str(model),
                                     "--data", str(data), "--tag", f"run{rep}"], args.results)
            rows += [theirs] if theirs else []
    print(table(rows))
    by_lib = {lib: [r["train_tokens_per_s"] for r in rows if r["lib"] == lib] for lib in ("posttrain", "trl")}
    rss = {lib: [r["peak_rss_mb"] for r in rows if r["lib"] == lib] for lib in ("posttrain", "trl")}
    if by_lib["posttrain"] and by_lib["trl"]:
        ratio = statistics.mean(by_lib["posttrain"]) / statistics.mean(by_lib["trl"])
        print(f"\ntrain tok/s posttrain / TRL = {ratio:.2f}x (target >= 2x);  peak RSS posttrain / TRL = "
              f"{statistics.mean(rss['posttrain']) / statistics.mean(rss['trl']):.2f}")


if __name__ == "__main__":
    main()
