"""Shared fixtures. The tiny world is built once into the posttrain cache ($POSTTRAIN_CACHE, default
~/.cache/posttrain) and reused by every test and by later runs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world():
    """Tokenizer and datasets of the tiny world (no base model)."""
    from posttrain.stages.world import ensure_world

    return ensure_world(base_model=False, progress=False)


@pytest.fixture(scope="session")
def world_with_base():
    """The tiny world including its pretrained base model (minutes the first time, then cached)."""
    from posttrain.stages.world import ensure_world

    return ensure_world(base_model=True, progress=False)


@pytest.fixture(scope="session")
def world_tokenizer(world):
    from posttrain.models import load_tokenizer

    return load_tokenizer(world.tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(world, world_tokenizer, tmp_path_factory):
    """A randomly initialised tiny Llama with the world tokenizer, saved as a local HF directory."""
    from posttrain.world.model import init_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model = init_tiny_model("world-llama", world_tokenizer, seed=0)
    model.save_pretrained(path)
    world_tokenizer.save_pretrained(path)
    return path
