"""GRPO at equal wall-clock time on the tiny world: posttrain's `rl --algo grpo` vs TRL's GRPOTrainer (issue 12,
acceptance 6, second part).

Both start from the same SFT model (a tiny-world Llama with its chat template), train on the world's
`rl_train.jsonl` with the math verifier as the reward (`posttrain.verifiers.math_reward` against the row's `answer`:
1 / 0; posttrain's `verifier:math` leaves an unjudgeable completion (None) out of the loss, TRL's reward function
gets 0.0 for it), for the same wall-clock budget, and are then scored the same way on the world's
`rl_heldout.jsonl` with `posttrain.world.evaluate.evaluate_model` (greedy and sampled accuracy).

Identical settings: 8 prompts x 8 samples per step (TRL: per_device_train_batch_size=64 completions,
num_generations=8, gradient_accumulation_steps=1, hence generation_batch_size=64 and one optimizer step per
generation batch), at most 64 new tokens, temperature 1, no top-k/p, beta 0 (no reference model), one update per
batch (TRL num_iterations=1; posttrain ppo_epochs=1, num_minibatches=1), AdamW lr 1e-4 constant, no warm-up, wd 0,
grad clip 1.0, fp32, token-level loss (TRL loss_type="dapo" = posttrain loss_aggregation="token_mean"), clip
0.2 / 0.28 (TRL epsilon / epsilon_high = posttrain clip_low / clip_high), group-std advantage scaling, no dynamic
sampling, truncated completions kept, shuffled prompts with seed 0 (each library's own seeded order), 2 torch
threads, each run in a fresh process, one after the other.

Budget: wall time from the start of the first step (posttrain: entering the run loop; TRL: the first
`on_step_begin`); after each optimizer step, a run whose elapsed time reached the budget stops (so each overshoots
by less than one step; the table gives the actual training time). The final weights are then saved (not counted):
posttrain's harness `Run.finish` (out/model), TRL's `trainer.save_model`.

Usage: python benchmarks/grpo_world.py [--model runs/demo/sft/model] [--budget 150] [--skip-trl]
(the measured run used runs/demo9/sft/model, a demo's SFT model: the same settings as `make demo`'s)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import run_subprocess  # noqa: E402



def _world_data() -> Path:
    from posttrain.world.cache import world_paths

    return world_paths().data  # the cached tiny world's datasets (built by `make demo` / `posttrain world build`)


DATA_DIR = _world_data()
MAX_STEPS = 100_000  # never reached: the time budget stops both runs
SETTINGS = dict(prompts_per_step=8, group_size=8, max_new_tokens=64, temperature=1.0, beta=0.0, lr=1e-4,
                clip_low=0.2, clip_high=0.28, max_grad_norm=1.0, seed=0)


class BudgetSpent(Exception):
    """Raised by posttrain's step hook once the time budget is spent."""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def summary(lib: str, ends: list[float], rewards: list[float], budget: float, model_dir: Path) -> dict:
    """Steps, training seconds (start of step 1 to the end of the last step), s/step, train reward trend."""
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    k = min(10, len(rewards))
    return {"lib": lib, "budget_s": budget, "steps": len(ends), "train_s": ends[-1] if ends else 0.0,
            "step_s_mean": ends[-1] / len(ends) if ends else math.nan,
            "step_s_median_after_first": statistics.median(intervals) if intervals else math.nan,
            "first_step_s": ends[0] if ends else math.nan,
            "train_reward_first10": statistics.fmean(rewards[:k]) if k else math.nan,
            "train_reward_last10": statistics.fmean(rewards[-k:]) if k else math.nan,
            "step_end_s": ends, "train_reward": rewards, "model_dir": str(model_dir)}


def run_posttrain(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(2)
    import posttrain.plumbing.harness as harness
    import posttrain.stages.rl as rl

    state: dict = {}
    enter = harness.Run.__enter__

    def timed_enter(self):  # the step loop starts right after this: the budget's clock starts here
        entered = enter(self)
        state["run"], state["t0"] = self, time.perf_counter()
        return entered

    harness.Run.__enter__ = timed_enter
    ends: list[float] = []
    rewards: list[float] = []

    def on_step_end(step: int, info: dict) -> None:
        ends.append(time.perf_counter() - state["t0"])
        scores = [s.score for s in info["samples"] if not math.isnan(s.score)]
        rewards.append(statistics.fmean(scores) if scores else math.nan)
        if ends[-1] >= args.budget:
            raise BudgetSpent

    out = args.out / "posttrain"
    shutil.rmtree(out, ignore_errors=True)
    s = SETTINGS
    config = rl.RLConfig(
        algo="grpo", model=str(args.model), data=str(args.data_dir / "rl_train.jsonl"), eval_data="",
        reward="verifier:math", out=str(out), batch_size=s["prompts_per_step"], group_size=s["group_size"],
        max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0, beta=s["beta"],
        loss_aggregation="token_mean", scale_rewards="group", clip_low=s["clip_low"], clip_high=s["clip_high"],
        dynamic_sampling=False, overlong="none", ppo_epochs=1, num_minibatches=1, grad_accum=1, max_steps=MAX_STEPS,
        lr=s["lr"], lr_schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=s["max_grad_norm"],
        shuffle=True, seed=s["seed"], precision="fp32", device="cpu", eval_every=0, save_every=0, log_every=1,
        progress=False)
    try:
        rl.train_rl(config, on_step_end=on_step_end)
    except BudgetSpent:
        pass
    model_dir = state["run"].finish({"algo": "grpo", "stopped": f"time budget {args.budget} s"})
    return summary("posttrain", ends, rewards, args.budget, model_dir)


def run_trl(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(2)
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from posttrain.verifiers import math_reward

    rewards: list[float] = []

    def verifier(completions, answer, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [math_reward(text, ans) for text, ans in zip(texts, answer, strict=True)]
        out = [0.0 if r is None else float(r) for r in scores]
        rewards.append(statistics.fmean(out))
        return out

    ends: list[float] = []
    clock: dict = {}

    class Budget(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            clock.setdefault("t0", time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            ends.append(time.perf_counter() - clock["t0"])
            if ends[-1] >= args.budget:
                control.should_training_stop = True

    out = args.out / "trl"
    shutil.rmtree(out, ignore_errors=True)
    s = SETTINGS
    cfg = trl.GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=MAX_STEPS,
        per_device_train_batch_size=s["prompts_per_step"] * s["group_size"], num_generations=s["group_size"],
        gradient_accumulation_steps=1, max_completion_length=s["max_new_tokens"], temperature=s["temperature"],
        top_p=1.0, top_k=0, beta=s["beta"], num_iterations=1, epsilon=s["clip_low"], epsilon_high=s["clip_high"],
        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False, learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=s["max_grad_norm"],
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, seed=s["seed"], data_seed=s["seed"],
        shuffle_dataset=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    assert cfg.generation_batch_size == 64 and cfg.steps_per_generation == 1, (cfg.generation_batch_size,
                                                                                cfg.steps_per_generation)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = datasets.load_dataset("json", data_files=str(args.data_dir / "rl_train.jsonl"), split="train")
    trainer = trl.GRPOTrainer(model=str(args.model), reward_funcs=verifier, args=cfg, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Budget()])
    trainer.train()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    row = summary("trl", ends, rewards, args.budget, model_dir)
    row["trl_settings"] = {"optim": str(cfg.optim), "generation_batch_size": cfg.generation_batch_size,
                           "steps_per_generation": cfg.steps_per_generation, "loss_type": cfg.loss_type}
    return row


def evaluate(model_dir: str, heldout: Path, limit: int) -> dict:
    from posttrain.world.evaluate import evaluate_model

    greedy = evaluate_model(model_dir, heldout, limit=limit, device="cpu")
    sampled = evaluate_model(model_dir, heldout, limit=limit, device="cpu", temperature=1.0, n=4, seed=5)
    return {"greedy": greedy, "sampled": sampled}


def fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    out = ["| model | steps | train s | s/step (mean) | s/step (median) | train reward first/last 10 steps | "
           "held-out acc greedy | held-out acc sampled (T=1, n=4) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r["eval"]
        out.append(f"| {r['name']} | {r.get('steps', 0)} | {fmt(r.get('train_s'), '.1f')} | "
                   f"{fmt(r.get('step_s_mean'))} | {fmt(r.get('step_s_median_after_first'))} | "
                   f"{fmt(r.get('train_reward_first10'))} / {fmt(r.get('train_reward_last10'))} | "
                   f"{ev['greedy']['accuracy']:.3f} | {ev['sampled']['accuracy']:.3f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "sft" / "model",
                        help="SFT model (default: the one `make demo` trains, runs/demo/sft/model)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the world's data folder")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per library")
    parser.add_argument("--limit", type=int, default=200, help="held-out prompts evaluated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-work" / "grpo_world")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "grpo_world.jsonl")
    parser.add_argument("--one", choices=("posttrain", "trl"), help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_posttrain(args) if args.one == "posttrain" else run_trl(args)))
        return

    import torch

    torch.set_num_threads(2)
    rows: list[dict] = []
    common = ["--model", str(args.model), "--data-dir", str(args.data_dir), "--budget", str(args.budget),
              "--out", str(args.out)]
    for lib in ("posttrain",) + (() if args.skip_trl else ("trl",)):
        before = uptime()
        row = run_subprocess([sys.executable, __file__, *common, "--one", lib])  # rows are written with their eval
        if row is None:
            continue
        row.update(uptime_before=before, uptime_after=uptime(), name=f"{lib} GRPO, {args.budget:.0f} s")
        print(f"{lib}: {row['steps']} steps in {row['train_s']:.1f} s; {before} -> {row['uptime_after']}",
              flush=True)
        rows.append(row)
    heldout = args.data_dir / "rl_heldout.jsonl"
    sft = {"lib": "sft", "name": "SFT model (start)", "model_dir": str(args.model)}
    for row in [sft, *rows]:
        row["eval"] = evaluate(row["model_dir"], heldout, args.limit)
    rows = [sft, *rows]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "settings": SETTINGS, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
