"""Building and caching the tiny world's tokenizer and datasets; the paths of every cached artefact.

The cache lives in ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``) under two keys, each a version and a hash
of every setting that shapes the artefacts, so tests and the demo build the world once and a change of settings
never reuses stale files:

* ``world-v{WORLD_VERSION}-{hash}/data``: the datasets (seconds to build);
* the tokenizer and the pretrained base model (minutes), keyed only by what they are made from: the pretraining
  corpus, the tokenizer's corpus, the model and the recipe. These are unchanged since world v2, whose key named the
  directory (``world-v2-6e06a7dfa9/{tokenizer,base-model}``), so a machine that built the v2 base model keeps it.

Each artefact is built in a temporary directory and renamed into place.

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

BASE_VERSION = "2"
"""Version of the base model's inputs (pretraining corpus, tokenizer corpus): unchanged since world v2."""
TOKENIZER_VOCAB = 1024
DATA_SEED = 0
# Pretraining recipe of the base model: ~12 minutes on 2 idle cores, once per machine (cached). 1500 steps at lr 3e-3,
# because fewer do not teach the model to copy operands: at 500 steps (held-out LM loss 0.69) it got 19 % of
# single-digit results right and its SFT model answered 4 % of held-out questions; 1000 steps at lr 4e-3 (tried for
# world v3, on a corpus with checked and warm examples added) continue "Question: <q>" correctly on 10 % / 0 % / 7 %
# of levels 1 / 2 / 3; these 1500 steps (loss 0.52): 100 % / 70 % / 80 %, which the later stages need.
BASE_MODEL_RECIPE = dict(init="world-llama", block_size=128, batch_size=32, max_steps=1500, lr=3e-3, warmup_steps=30,
                         lr_schedule="cosine", weight_decay=0.1, seed=0, save_every=100, log_every=10)
BASE_TOKENIZER_SYSTEM_PROMPTS = (
    "You are a careful math tutor.",
    "You are a helpful assistant. Answer arithmetic questions concisely.",
    "Solve the problem step by step and end with 'The answer is N.'",
    "You are a precise calculator that shows its work.",
)
"""System prompts of world v2's SFT conversations, part of the tokenizer's training text."""
BASE_DATASET_SIZES = {"pretrain": 20000, "sft": 4000, "preference": 4000, "rankings": 2000, "rl": 2000,
                      "outcome": 4000, "process": 2000}
"""World v2's dataset sizes, part of the base model's key (the key of its v2 cache directory)."""


@dataclass
class WorldPaths:
    root: Path
    tokenizer: Path
    data: Path
    base_model: Path


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def world_key() -> str:
    """Key of the datasets: the world version, the data seed and sizes, and the generators' revision (the base model
    has its own key)."""
    from posttrain.world.datagen import DATA_REVISION, DEFAULT_SIZES, EVAL_SIZES

    settings = dict(seed=DATA_SEED, sizes=DEFAULT_SIZES, eval_sizes=EVAL_SIZES, revision=DATA_REVISION)
    return f"world-v{WORLD_VERSION}-{_digest(settings)}"


def base_key() -> str:
    """Key of the tokenizer and base model: what they are made from (the settings world v2's key hashed)."""
    from posttrain.world.model import TINY_SIZES
    from posttrain.world.tokenizer import SPECIAL_TOKENS, WORLD_CHAT_TEMPLATE

    settings = dict(version=BASE_VERSION, vocab=TOKENIZER_VOCAB, seed=DATA_SEED, sizes=BASE_DATASET_SIZES,
                    model=TINY_SIZES, recipe=BASE_MODEL_RECIPE, template=WORLD_CHAT_TEMPLATE, specials=SPECIAL_TOKENS)
    return f"world-v{BASE_VERSION}-{_digest(settings)}"


def _tokenizer_chat_text(seed: int = DATA_SEED, n: int = BASE_DATASET_SIZES["sft"]):
    """World v2's SFT conversations as plain text ("role\ncontent" lines): a system prompt with probability 0.2,
    one round or (probability 0.15) two, each a training question and its worked reply."""
    from posttrain.world.datagen import _rng, draw_question, good_completion

    rng = _rng("sft", seed, "train")
    for _ in range(n):
        lines = []
        if rng.random() < 0.2:
            lines.append(f"system\n{rng.choice(BASE_TOKENIZER_SYSTEM_PROMPTS)}")
        for _ in range(2 if rng.random() < 0.15 else 1):
            q = draw_question(rng, "train")
            lines += [f"user\n{q.text}", f"assistant\n{good_completion(q)}"]
        yield "\n".join(lines)


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
    """Texts the BPE is trained on: the pretraining corpus, then world v2's SFT conversations as plain text."""
    with (data_dir / "pretrain_train.jsonl").open() as f:
        for line in f:
            yield json.loads(line)["text"]
    yield from _tokenizer_chat_text()


def build_data(out_dir: Path) -> None:
    from posttrain.world.datagen import write_all

    write_all(out_dir, seed=DATA_SEED)


def build_tokenizer(out_dir: Path, data_dir: Path) -> None:
    from posttrain.world.tokenizer import train_tokenizer

    train_tokenizer(_tokenizer_corpus(data_dir), out_dir, vocab_size=TOKENIZER_VOCAB)


def world_paths() -> WorldPaths:
    """Where the cached world's artefacts live (whether or not they are built yet); ``root`` is the base model's
    directory (its pretraining run lives there)."""
    root = cache_root() / base_key()
    return WorldPaths(root, root / "tokenizer", cache_root() / world_key() / "data", root / "base-model")


def ensure_world_data() -> WorldPaths:
    """Paths of the cached world, building its datasets and tokenizer if missing (not the base model)."""
    paths = world_paths()
    build_into(paths.data, build_data)
    build_into(paths.tokenizer, lambda tmp: build_tokenizer(tmp, paths.data))
    return paths
