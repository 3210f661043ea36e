"""``posttrain world build``: the tiny world in the cache, including its pretrained base model.

The world's datasets and tokenizer come from ``posttrain.world.cache``; the base model is pretrained here, by the
pretraining stage, with ``BASE_MODEL_RECIPE`` (once per machine, then cached). ``posttrain.world.build`` (the first
home of these functions) is this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from posttrain.world.cache import BASE_MODEL_RECIPE, WorldPaths, build_into, ensure_world_data


def build_base_model(out_dir: Path, paths: WorldPaths, *, progress: bool = True) -> None:
    """Pretrain the base model with ``BASE_MODEL_RECIPE`` and copy the final model to ``out_dir``."""
    from posttrain.stages.pretrain import PretrainConfig, train_pretrain

    run_dir = paths.root / "pretrain-run"
    config = PretrainConfig(tokenizer=str(paths.tokenizer), data=str(paths.data / "pretrain_train.jsonl"),
                            eval_data=str(paths.data / "pretrain_heldout.jsonl"), out=str(run_dir),
                            resume=True, progress=progress, **BASE_MODEL_RECIPE)
    from posttrain.plumbing.checkpoint import CheckpointError

    try:
        final = train_pretrain(config)
    except CheckpointError as err:  # e.g. an interrupted run of an older posttrain: the cache's own, so start over
        print(f"{err}\nstarting the base model's pretraining over")
        shutil.rmtree(run_dir)
        final = train_pretrain(config)
    shutil.copytree(final, out_dir, dirs_exist_ok=True)
    shutil.copy(run_dir / "metrics.jsonl", out_dir / "pretrain_metrics.jsonl")


def ensure_world(base_model: bool = True, *, progress: bool = True) -> WorldPaths:
    """Paths of the cached world, building whatever is missing (the base model only when asked)."""
    paths = ensure_world_data()
    if base_model and not paths.base_model.exists():
        print(f"pretraining the tiny world's base model (once; cached in {paths.base_model})")
        build_into(paths.base_model, lambda tmp: build_base_model(tmp, paths, progress=progress))
    return paths


def write_world(out_dir: str | Path, *, base_model: bool = False) -> WorldPaths:
    """``posttrain world build DIR``: copy (building if needed) the tokenizer, datasets and base model to DIR."""
    paths = ensure_world(base_model=base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(paths.tokenizer, out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(paths.data, out / "data", dirs_exist_ok=True)
    if base_model:
        shutil.copytree(paths.base_model, out / "base-model", dirs_exist_ok=True)
    return WorldPaths(out, out / "tokenizer", out / "data", out / "base-model")
