"""``posttrain demo``: the pipeline tour on the tiny world, offline, on a CPU, in minutes.

Stages so far: build the world (cached) -> pretrain the base model (cached) -> SFT -> evaluate both on held-out
prompts against the gold reward. Every stage's run directory lives under ``--out``; ``summary.json`` holds
``{"stages": {"base": {...}, "sft": {...}}}`` with format_rate, accuracy, gold_reward, mean_length, stop_rate.
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


def run_demo(config: DemoConfig) -> dict:
    from posttrain.evaluate import evaluate_model
    from posttrain.sft import SFTConfig, train_sft
    from posttrain.world import build

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("[1/3] tiny world: tokenizer, datasets, base model (cached after the first run)")
    paths = build.ensure_world(base_model=True, progress=config.progress)
    prompts = paths.data / "rl_heldout.jsonl"
    evaluate = lambda model_dir, name: evaluate_model(  # noqa: E731
        model_dir, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens, device=config.device,
        samples_path=out / f"samples_{name}.jsonl")
    stages: dict[str, dict[str, float]] = {}

    print("[2/3] evaluating the base model")
    stages["base"] = evaluate(paths.base_model, "base")

    print(f"[3/3] SFT ({config.sft_steps} steps)")
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

    summary = {"stages": stages, "world": str(paths.root), "seconds": round(time.time() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(format_table(stages))
    print(f"\nsummary: {out / 'summary.json'}   ({summary['seconds']} s)")
    return summary
