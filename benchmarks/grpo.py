"""GRPO benchmark: posttrain `rl --algo grpo` vs TRL's GRPOTrainer on the shared CPU workload `grpo`.

Shared workload (../shared/bench): tiny Llama (5.26 M params), `rl.jsonl` (arithmetic prompts + `answer`), 2 prompts
x 8 samples per step in file order, at most 32 new tokens, temperature 1, reward `workloads.arith_reward`, beta 0 (no
reference model), one gradient step per generation batch, 50 steps, AdamW lr 1e-5 constant, grad-clip 1.0, fp32,
2 threads. Loss: TRL's default `loss_type="dapo"` (token-level mean over the batch's completion tokens) against
posttrain's `loss_aggregation=token_mean`; group-std advantage scaling and clip 0.2 on both sides for both.
Interleaved runs, fresh process each.

Reported (the shared harness's measures, step 1 excluded): s/step (interval between optimizer-step ends, median),
train tok/s (prompt + completion tokens of the trained samples, as TRL's loss forward counts them, over the measured
window), generation tok/s (completion tokens / time generating: posttrain's rollout phase, TRL's time inside
`generate`), peak RSS. Target: posttrain's s/step <= 1/3 of TRL's.

Usage: python benchmarks/grpo.py [--repeats 2] [--skip-trl]
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
    from workloads import WORKLOADS, arith_reward  # noqa: E402

    benchlib.setup_threads(2)
    rss_after_import = benchlib.peak_rss_mb()
    import posttrain.rewards
    import posttrain.stages.rl as rl

    wl = WORKLOADS["grpo"]

    def shared_reward(prompts, completions, answer, **columns) -> list[float | None]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [arith_reward(text, ans) for text, ans in zip(texts, answer, strict=True)]

    # The workload's reward is a plain function; RLConfig.reward is a spec string, so the spec resolves to it here.
    posttrain.rewards.reward_from_spec = lambda spec, device="auto": shared_reward
    counter = benchlib.TokenCounter()
    timer = benchlib.StepTimer(counter)
    internal = {"generation_tokens_per_s": [], "training_tokens_per_s": []}
    rewards = []

    def on_step_end(step: int, info: dict) -> None:
        samples, metrics = info["samples"], info["rollout_metrics"]
        trained = [s for s in samples if s.trained]
        generated = sum(len(s.token_ids) for s in samples)
        completion_tokens = sum(len(s.token_ids) for s in trained)
        gen_rate, train_rate = metrics["rollout/generation_tokens_per_s"], metrics["train/training_tokens_per_s"]
        counter.c["grad_tokens"] += sum(len(s.prompt_ids) + len(s.token_ids) for s in trained)
        counter.add("generated_tokens", generated)
        counter.add("generated_sequences", len(samples))
        counter.add("generation_s", generated / gen_rate if gen_rate > 0 else 0.0)
        counter.add("training_s", completion_tokens / train_rate if train_rate > 0 else 0.0)
        internal["generation_tokens_per_s"].append(gen_rate)
        internal["training_tokens_per_s"].append(train_rate)
        rewards.extend(s.reward for s in samples)
        timer.mark()

    with tempfile.TemporaryDirectory() as out:
        config = rl.RLConfig(
            algo="grpo", model=str(model), data=str(data / wl["data"]), eval_data="", reward="arith_reward",
            out=str(Path(out) / "run"), batch_size=wl["batch_size"] // wl["num_generations"],
            group_size=wl["num_generations"], max_new_tokens=wl["max_completion_length"],
            temperature=wl["temperature"], beta=wl["beta"], loss_aggregation="token_mean", scale_rewards="group",
            clip_low=0.2, clip_high=0.2, ppo_epochs=1, num_minibatches=1, grad_accum=1, max_steps=wl["steps"],
            lr=wl["lr"], lr_schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            shuffle=False, seed=0, precision="fp32", device="cpu", save_every=0, log_every=10, progress=False)
        started = time.perf_counter()
        timer.start()
        rl.train_rl(config, on_step_end=on_step_end)
        train_s = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    warm = wl["warmup"]
    return {"lib": "posttrain", "stage": "grpo", "tag": tag, "workload": wl, **timer.summary(warmup=warm),
            "peak_rss_mb": benchlib.peak_rss_mb(), "peak_rss_after_imports_mb": rss_after_import, "train_s": train_s,
            "internal_medians": {k: statistics.median(v[warm:]) for k, v in internal.items()},
            "reward_stats": {"completions": len(rewards), "exact_fraction": sum(r == 1.0 for r in rewards)
                             / max(1, len(rewards)), "mean_reward": sum(rewards) / max(1, len(rewards))},
            "log_history": [{"step": r["step"], "loss": r["train/loss"], "reward": r.get("rollout/reward_mean")}
                            for r in records if "train/loss" in r],
            "env": benchlib.env_info()}


def generation_rate(row: dict) -> float:
    """Completion tokens per second of generation time in the measured window."""
    counts = row["counts_in_window"]
    seconds = counts.get("generation_s") if row["lib"] == "posttrain" else row["diag_in_window"]["generate_s"]
    return counts["generated_tokens"] / seconds if seconds else float("nan")


def phase_table(rows: list[dict]) -> str:
    out = ["| lib | run | gen tok/s | generation s/step | generated tok/step | train tok/step | cores used |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        counts, steps = r["counts_in_window"], r["steps_measured"]
        gen_s = counts.get("generation_s") if r["lib"] == "posttrain" else r["diag_in_window"]["generate_s"]
        out.append(f"| {r['lib']} | {r['tag']} | {generation_rate(r):.0f} | {gen_s / steps:.3f} | "
                   f"{counts['generated_tokens'] / steps:.0f} | {r['train_tokens_per_step_mean']:.0f} | "
                   f"{r['process_cpu_cores_used']:.2f} |")
    return "\n".join(out)


def step_ratio_line(rows: list[dict]) -> str:
    steps = {lib: [r["step_s_median"] for r in rows if r["lib"] == lib] for lib in ("posttrain", "trl")}
    if not (steps["posttrain"] and steps["trl"]):
        return ""
    ratio = statistics.mean(steps["posttrain"]) / statistics.mean(steps["trl"])
    return f"s/step posttrain / TRL = {ratio:.2f} (target <= 0.33, i.e. {1 / ratio:.2f}x faster; target >= 3x)"


def main() -> None:
    parser = training_bench_parser(__doc__, "grpo")
    args = parser.parse_args()
    model, data = ensure_workload(args.shared, args.work)
    if args.one:
        print(json.dumps(run_posttrain_once(args.shared, model, data, args.one)))
        return
    rows = interleaved_runs(__file__, "grpo", args.shared, args.work, model, data, repeats=args.repeats,
                            skip_trl=args.skip_trl, results=args.results)
    print(table(rows))
    print("\n" + phase_table(rows))
    print("\n" + step_ratio_line(rows))
    print(ratio_line(rows, target=3.0))


if __name__ == "__main__":
    main()
