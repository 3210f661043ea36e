"""Building and caching the tiny world's tokenizer and datasets; the paths of every cached artefact.

The cache lives in ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``) under a key made of the world version and
a hash of every setting that shapes the artefacts, so tests and the demo build the world once and a change of
settings never reuses stale files. Each artefact is built in a temporary directory and renamed into place.

The base model is pretrained by the pretraining stage (``posttrain.stages.world.ensure_world``): the world never
imports a stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.world.tasks import WORLD_VERSION

TOKENIZER_VOCAB = 1024
DATA_SEED = 0
# Pretraining recipe of the base model: ~12 minutes on 2 CPU cores, once per machine (cached). 1500 steps, not 500:
# at 500 steps (held-out LM loss 0.69) the model has not yet learned to copy operands, gets 19 % of single-digit
# results right and its SFT model answers 4 % of held-out questions; at 1500 steps (loss 0.52) those are 100 % and
# 65 %, which the later stages (best-of-N, RL, reward models) need to have something to work with.
BASE_MODEL_RECIPE = dict(init="world-llama", block_size=128, batch_size=32, max_steps=1500, lr=3e-3, warmup_steps=30,
                         lr_schedule="cosine", weight_decay=0.1, seed=0, save_every=100, log_every=10)


@dataclass
class WorldPaths:
    root: Path
    tokenizer: Path
    data: Path
    base_model: Path


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def world_key() -> str:
    from posttrain.world.datagen import DEFAULT_SIZES
    from posttrain.world.model import TINY_SIZES
    from posttrain.world.tokenizer import SPECIAL_TOKENS, WORLD_CHAT_TEMPLATE

    settings = dict(version=WORLD_VERSION, vocab=TOKENIZER_VOCAB, seed=DATA_SEED, sizes=DEFAULT_SIZES,
                    model=TINY_SIZES, recipe=BASE_MODEL_RECIPE, template=WORLD_CHAT_TEMPLATE, specials=SPECIAL_TOKENS)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"world-v{WORLD_VERSION}-{digest}"


def build_into(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` then rename tmp_dir to ``final`` (no half-built artefact is ever visible)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        if final.exists():  # built concurrently by another process
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _tokenizer_corpus(data_dir: Path):
    """Texts the BPE is trained on: the pretraining corpus and the chat data, rendered as plain text."""
    for name in ("pretrain_train.jsonl", "sft_train.jsonl"):
        with (data_dir / name).open() as f:
            for line in f:
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                else:
                    yield "\n".join(f"{m['role']}\n{m['content']}" for m in row["messages"])


def build_data(out_dir: Path) -> None:
    from posttrain.world.datagen import write_all

    write_all(out_dir, seed=DATA_SEED)


def build_tokenizer(out_dir: Path, data_dir: Path) -> None:
    from posttrain.world.tokenizer import train_tokenizer

    train_tokenizer(_tokenizer_corpus(data_dir), out_dir, vocab_size=TOKENIZER_VOCAB)


def world_paths() -> WorldPaths:
    """Where the cached world's artefacts live (whether or not they are built yet)."""
    root = cache_root() / world_key()
    return WorldPaths(root, root / "tokenizer", root / "data", root / "base-model")


def ensure_world_data() -> WorldPaths:
    """Paths of the cached world, building its datasets and tokenizer if missing (not the base model)."""
    paths = world_paths()
    build_into(paths.data, build_data)
    build_into(paths.tokenizer, lambda tmp: build_tokenizer(tmp, paths.data))
    return paths
