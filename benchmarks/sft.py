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

import json
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_workload, interleaved_runs, ratio_line, table, training_bench_parser

def run_posttrain_once(shared: Path, model: Path, data: Path, tag: str) -> dict:
    """One measured posttrain SFT run in this process (called in a fresh subprocess by main)."""
    sys.path.insert(0, str(shared))
    import benchlib  # noqa: E402  (the shared measurement code)
    from workloads import WORKLOADS  # noqa: E402

    benchlib.setup_threads(2)
    rss_after_import = benchlib.peak_rss_mb()
    from posttrain.stages.sft import SFTConfig, train_sft

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


def main() -> None:
    parser = training_bench_parser(__doc__, "sft")
    args = parser.parse_args()
    model, data = ensure_workload(args.shared, args.work)
    if args.one:
        print(json.dumps(run_posttrain_once(args.shared, model, data, args.one)))
        return
    rows = interleaved_runs(__file__, "sft", args.shared, args.work, model, data, repeats=args.repeats,
                            skip_trl=args.skip_trl, results=args.results)
    print(table(rows))
    print("\n" + ratio_line(rows, target=2.0))


if __name__ == "__main__":
    main()
