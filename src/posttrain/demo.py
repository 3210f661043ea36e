"""``posttrain demo``: the pipeline tour on the tiny world, offline, on a CPU, in minutes.

Stages so far: build the world (cached) -> pretrain the base model (cached) -> SFT -> evaluate both on held-out
prompts against the gold reward -> a Bradley-Terry reward model from the SFT model, measured against the gold
preferences. Every stage's run directory lives under ``--out``; ``summary.json`` holds
``{"stages": {"base": {...}, "sft": {...}}, "reward_model": {...}}``: per policy format_rate, accuracy,
gold_reward, mean_length, stop_rate; for the RM held-out pair accuracy, top-1 selection and length correlation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import config_to_dict, option
from posttrain.training import is_complete

METRICS = ("format_rate", "accuracy", "gold_reward", "mean_length", "stop_rate")


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "directory for every stage's run directory and summary.json")
    sft_steps: int = option(150, "SFT optimizer steps")
    sft_batch_size: int = option(16, "SFT conversations per step")
    sft_lr: float = option(1e-3, "SFT peak learning rate")
    rm_steps: int = option(250, "Bradley-Terry reward-model optimizer steps (16 pairs each; 250 = one epoch of the "
                                "world's preference pairs); 0 = skip the RM stage")
    eval_prompts: int = option(200, "held-out prompts to evaluate each stage on")
    max_new_tokens: int = option(48, "generation budget per reply")
    device: str = option("auto", "auto | cpu | cuda")
    progress: bool = option(True, "show progress bars")


def format_table(stages: dict[str, dict[str, float]]) -> str:
    header = f"{'stage':<8}" + "".join(f"{m:>13}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for name, metrics in stages.items():
        lines.append(f"{name:<8}" + "".join(f"{metrics[m]:>13.3f}" for m in METRICS))
    return "\n".join(lines)


def _discard_if_config_changed(run_dir: Path, config) -> None:
    """Reuse (or resume) a stage run only if it was made with the same settings; otherwise start it afresh."""
    import shutil

    saved = run_dir / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != config_to_dict(config):
        print(f"{run_dir}: settings changed since the last demo, retraining this stage")
        shutil.rmtree(run_dir)


def _reward_model_stage(config: DemoConfig, paths, sft_model: Path, out: Path) -> dict:
    from posttrain.evaluate import evaluate_reward_on_world
    from posttrain.rewards import ScalarRewardModel
    from posttrain.rm import RMConfig, train_rm

    rm_dir = out / "rm"
    rm_config = RMConfig(
        loss="bt", model=str(sft_model), data=str(paths.data / "preference_train.jsonl"),
        eval_data=str(paths.data / "preference_heldout.jsonl"), out=str(rm_dir), max_steps=config.rm_steps,
        batch_size=16, lr=3e-4, save_every=100, device=config.device, progress=config.progress, resume=True,
    )
    _discard_if_config_changed(rm_dir, rm_config)
    rm_model = rm_dir / "model" if is_complete(rm_dir) else train_rm(rm_config)
    report = evaluate_reward_on_world(ScalarRewardModel(rm_model, device=config.device), paths.data)
    return {"loss": "bt", "model": str(rm_model), **report}


def run_demo(config: DemoConfig) -> dict:
    from posttrain.evaluate import evaluate_model
    from posttrain.sft import SFTConfig, train_sft
    from posttrain.world import build

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stage_count = 4 if config.rm_steps else 3
    print(f"[1/{stage_count}] tiny world: tokenizer, datasets, base model (cached after the first run)")
    paths = build.ensure_world(base_model=True, progress=config.progress)
    prompts = paths.data / "rl_heldout.jsonl"
    evaluate = lambda model_dir, name: evaluate_model(  # noqa: E731
        model_dir, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens, device=config.device,
        samples_path=out / f"samples_{name}.jsonl")
    stages: dict[str, dict[str, float]] = {}

    print(f"[2/{stage_count}] evaluating the base model")
    stages["base"] = evaluate(paths.base_model, "base")

    print(f"[3/{stage_count}] SFT ({config.sft_steps} steps)")
    sft_dir = out / "sft"
    sft_config = SFTConfig(
        model=str(paths.base_model), data=str(paths.data / "sft_train.jsonl"),
        eval_data=str(paths.data / "sft_heldout.jsonl"), out=str(sft_dir), max_steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, warmup_steps=10, save_every=50, log_every=5,
        device=config.device, progress=config.progress, resume=True,
    )
    _discard_if_config_changed(sft_dir, sft_config)
    sft_model = sft_dir / "model" if is_complete(sft_dir) else train_sft(sft_config)
    stages["sft"] = evaluate(sft_model, "sft")

    summary = {"stages": stages}
    if config.rm_steps:
        print(f"[4/{stage_count}] Bradley-Terry reward model from the SFT model ({config.rm_steps} steps)")
        summary["reward_model"] = _reward_model_stage(config, paths, sft_model, out)
    summary.update(world=str(paths.root), seconds=round(time.time() - started, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(format_table(stages))
    if rm := summary.get("reward_model"):
        print(f"\nreward model (bt): held-out pair accuracy {rm['pair_accuracy']:.3f} (pairs that need the answer "
              f"checked: {rm['pair_accuracy_answer_check']:.3f}; the rest: {rm['pair_accuracy_rest']:.3f}), top-1 "
              f"selection {rm['top1_accuracy']:.3f} (random {rm['random_top1']:.3f}), length correlation "
              f"{rm['length_correlation']:+.3f}")
    print(f"\nsummary: {out / 'summary.json'}   ({summary['seconds']} s)")
    return summary
