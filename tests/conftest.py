"""Shared fixtures. The tiny world is built once into the posttrain cache ($POSTTRAIN_CACHE, default
~/.cache/posttrain) and reused by every test and by later runs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see posttrain/__init__.py)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers (-n 2): the tiny models' kernels barely use a second thread (measured: one
# RM run on 1 thread, two side by side, each as fast as one run on 2 threads), so the cores are split between them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


# `make test` hands whole files to two pytest-xdist workers in collection order (--dist loadfile
# --no-loadscope-reorder; xdist's default order is "most tests first", which put the demo's few tests last and left
# the other worker idle through it). The shared demo run is the longest job of the suite (10-12 min there, with its
# own second process), so its file goes first and the rest run beside it on the other worker. The RM learning tests
# start from the demo's SFT model (demo_sft_model), which the demo's worker trains first (2-3 min): they come after
# the files up to RM_LEARNING_AFTER (about 5 min of the other worker's), so they neither wait for it nor run alone
# at the end (placed last, they ran when the other worker had nothing left: pytest 22:55 against 20 min).
FIRST_FILE, RM_LEARNING, RM_LEARNING_AFTER = "test_learning.py", "test_rm_learning.py", "test_evaluate.py"


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        if name == FIRST_FILE:
            return 0
        if name == RM_LEARNING:
            return 2
        return 1 if name <= RM_LEARNING_AFTER else 3

    items.sort(key=rank)  # stable: each group keeps its order


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


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The shared demo run's directory: one per test session, common to every pytest-xdist worker (their base's
    parent), so the demo's SFT model can serve tests on another worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "demo"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def demo_sft_model(world_with_base, demo_dir):
    """The demo's SFT model (demo_sft_config), trained once per session by whichever of the demo run and the RM
    learning tests asks first, under a file lock: the other waits for it, and the demo then finds its SFT stage
    complete and goes on from it."""
    import fcntl

    from posttrain.plumbing.harness import is_complete
    from posttrain.stages.demo import DemoConfig, train_demo_sft

    sft_dir = demo_dir / "sft"
    with open(demo_dir / "sft.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not is_complete(sft_dir):  # as the demo trains it
            train_demo_sft(DemoConfig(out=str(demo_dir), progress=False, device="cpu"), world_with_base, sft_dir)
    return sft_dir / "model"


@pytest.fixture(scope="session")
def demo_run(world_with_base, demo_sft_model, demo_dir):
    """`posttrain demo` end to end, once per test session, shared by every learning test of test_learning.py: base
    model (cached) -> SFT (demo_sft_model) -> evaluation on held-out prompts -> BT RM -> best-of-16 -> rejection
    sampling (RM and verifier) -> DPO -> GRPO -> PPO -> over-optimization. Returns ``(out_dir, summary)``."""
    import fcntl
    import json

    from posttrain.stages.demo import DemoConfig, run_demo

    with open(demo_dir / "demo.lock", "w") as lock:  # once, even if test_learning.py's tests land on two workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (demo_dir / "summary.json").exists():  # the other worker ran it
            return demo_dir, json.loads((demo_dir / "summary.json").read_text())
        return demo_dir, run_demo(DemoConfig(out=str(demo_dir), progress=False, device="cpu"))


# The templates the rendering tests run under: the tiny world's own, and the built-in ones set on its tokenizer.
TEMPLATES = ["world", "chatml", "zephyr", "tulu"]


@pytest.fixture(scope="session")
def tokenizers(world_tokenizer):
    """``{template name: the world tokenizer under that template}`` for each of ``TEMPLATES``."""
    import copy

    from posttrain.data import set_chat_template

    result = {"world": world_tokenizer}
    for name in TEMPLATES[1:]:
        result[name] = set_chat_template(copy.deepcopy(world_tokenizer), name)
    return result


def defused(messages):
    """The conversation with the special-token strings of its contents replaced by '#': the template's own special
    tokens are then the only ones (``from conftest import defused``)."""
    out = []
    for message in messages:
        content = message["content"]
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"):
            content = content.replace(token, "#")
        out.append({**message, "content": content})
    return out


@pytest.fixture
def train_rm_briefly(tmp_path_factory):
    """``train_rm_briefly(start_model_dir, loss, steps, **options)`` -> the trained reward model's directory: a quiet
    CPU run on the tiny world's data for ``loss`` (batch 16, no checkpoints)."""
    from posttrain.stages.rm import RMConfig, train_rm

    def train(start, loss: str, steps: int, **options):
        out = tmp_path_factory.mktemp(f"rm-{loss}")
        return train_rm(RMConfig(loss=loss, model=str(start), out=str(out), max_steps=steps, batch_size=16,
                                 progress=False, device="cpu", save_every=0, **options))

    return train
