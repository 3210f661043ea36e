"""DPO benchmark: posttrain `dpo --loss dpo` vs TRL's DPOTrainer on the shared CPU workload `dpo`.

Shared workload (../shared/bench): tiny Llama (5.26 M params), `pref.jsonl`, 8 pairs per step in file order, max length
256, 20 steps, AdamW lr 1e-5 constant, beta 0.1, sigmoid loss, fp32, 2 threads. TRL runs its frozen reference model
every step; posttrain computes the reference log-probs once before training (for the pairs the run uses) and holds
only the policy while training. Interleaved runs, fresh process each.

Reported: train tok/s between optimizer steps (the shared harness's measure, step 1 excluded), end-to-end tok/s
(all trained tokens / the whole run, the reference precompute included), and peak RSS.
Targets: >= 2x TRL's train tokens/s, peak RSS <= TRL's.

Usage: python benchmarks/dpo.py [--repeats 2] [--skip-trl]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_workload, interleaved_runs, ratio_line, table, training_bench_parser


def run_posttrain_once(shared: Path, model: Path, data: Path, tag: str) -> dict:
    sys.path.insert(0, str(shared))
    import benchlib  # noqa: E402
    from workloads import WORKLOADS  # noqa: E402

    benchlib.setup_threads(2)
    rss_after_import = benchlib.peak_rss_mb()
    from posttrain.stages.dpo import DPOConfig, train_dpo

    wl = WORKLOADS["dpo"]
    counter = benchlib.TokenCounter()
    timer = benchlib.StepTimer(counter)
    trained_tokens = []

    def on_step_end(step: int, info: dict) -> None:
        counter.c["grad_tokens"] += info["tokens"]
        trained_tokens.append(info["tokens"])
        timer.mark()

    with tempfile.TemporaryDirectory() as out:
        # exactly the rows the 20 steps use (file order), so the precompute is not charged for unused pairs
        rows = (data / wl["data"]).read_text().splitlines()[: wl["steps"] * wl["batch_size"]]
        used = Path(out) / "pairs.jsonl"
        used.write_text("\n".join(rows) + "\n")
        config = DPOConfig(loss="dpo", model=str(model), data=str(used), out=str(Path(out) / "run"),
                           max_length=wl["max_length"], batch_size=wl["batch_size"], max_steps=wl["steps"],
                           lr=wl["lr"], beta=wl["beta"], lr_schedule="constant", warmup_steps=0, weight_decay=0.0,
                           max_grad_norm=1.0, shuffle=False, seed=0, precision="fp32", device="cpu", save_every=0,
                           log_every=5, progress=False)
        started = time.perf_counter()
        timer.start()
        train_dpo(config, on_step_end=on_step_end)
        train_s = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"lib": "posttrain", "stage": "dpo", "tag": tag, "workload": wl, **timer.summary(warmup=wl["warmup"]),
            "end_to_end_tokens_per_s": sum(trained_tokens) / train_s,
            "peak_rss_mb": benchlib.peak_rss_mb(), "peak_rss_after_imports_mb": rss_after_import, "train_s": train_s,
            "log_history": [{"step": r["step"], "loss": r["train/loss"], "margin": r.get("rewards/margin")}
                            for r in records if "train/loss" in r],
            "env": benchlib.env_info()}


def main() -> None:
    parser = training_bench_parser(__doc__, "dpo")
    args = parser.parse_args()
    model, data = ensure_workload(args.shared, args.work)
    if args.one:
        print(json.dumps(run_posttrain_once(args.shared, model, data, args.one)))
        return
    rows = interleaved_runs(__file__, "dpo", args.shared, args.work, model, data, repeats=args.repeats,
                            skip_trl=args.skip_trl, results=args.results)
    print(table(rows))
    print("\n" + ratio_line(rows, target=2.0))
    ours = [r["end_to_end_tokens_per_s"] for r in rows if r["lib"] == "posttrain"]
    theirs = [r["train_tokens_per_s"] for r in rows if r["lib"] == "trl"]
    if ours and theirs:
        print(f"end-to-end (reference precompute included) posttrain {statistics.mean(ours):.0f} tok/s = "
              f"{statistics.mean(ours) / statistics.mean(theirs):.2f}x TRL's train tok/s")


if __name__ == "__main__":
    main()
