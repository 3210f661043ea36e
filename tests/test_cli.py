"""Smoke runs of every CLI stage on tiny inputs (seconds each): world build, pretrain, sft, chat, resume.

Most runs call ``posttrain.cli.main(argv)`` in process (the console script's entry point; a fresh interpreter costs
~6 s of torch/transformers imports); the ones where the process itself matters (stdin, exit status, stderr) run
``python -m posttrain.cli`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain import cli

SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN_KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=cli_env(), timeout=300)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensorboard_scalars(run_dir: Path) -> dict[str, list[int]]:
    """{tag: [steps]} from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {run_dir / 'tensorboard'}"
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_loadable(model_dir: Path, model_type: str, vocab_size: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    assert model.config.model_type == model_type
    assert model.get_input_embeddings().weight.shape[0] == vocab_size
    assert (model_dir / "tokenizer.json").is_file()
    return model


# --------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_paths():
    from posttrain.stages.world import ensure_world

    return ensure_world(base_model=False, progress=False)


@pytest.fixture(scope="module")
def tok(world_paths):
    from posttrain.models import load_tokenizer

    return load_tokenizer(world_paths.tokenizer)


@pytest.fixture(scope="module")
def tiny_model(tok, tmp_path_factory) -> Path:
    from posttrain.world.model import init_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    init_tiny_model("world-llama", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "arith.jsonl"
    rows = [{"text": f"Question: What is {a} + {a + 3}? {a} + {a + 3} = {2 * a + 3}. The answer is {2 * a + 3}."}
            for a in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eval_data(world_paths, tmp_path_factory) -> Path:
    """The first 16 held-out conversations (the full held-out set would take longer to score than to train)."""
    lines = (world_paths.data / "sft_heldout.jsonl").read_text().splitlines()[:16]
    path = tmp_path_factory.mktemp("eval") / "sft_eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain_args(tokenizer: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--tokenizer", str(tokenizer), "--data", str(data), "--max_steps=3", "--block_size=32",
            "--batch_size=4", "--out", str(out), "--progress=false", "--log_every=1", *extra]


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--max_steps=3", "--batch_size=4", "--out", str(out),
            "--progress=false", *extra]


@pytest.fixture(scope="module")
def pretrain_run(world_paths, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    code = cli.main(pretrain_args(world_paths.tokenizer, text_data, out))
    return out, code


@pytest.fixture(scope="module")
def sft_run(tiny_model, world_paths, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    code = cli.main(sft_args(tiny_model, world_paths.data / "sft_train.jsonl", out, "--eval_data", str(eval_data)))
    return out, code


# --------------------------------------------------------------------------------------------------------------
# world build


def test_world_build(tmp_path, world_paths):
    out = tmp_path / "world"
    result = run_cli("world", "build", out)
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "data" / "sft_train.jsonl").is_file()
    assert (out / "data" / "sft_train.jsonl").read_bytes() == (world_paths.data / "sft_train.jsonl").read_bytes()
    assert not (out / "base-model").exists()  # only with --base-model
    assert f"tokenizer: {out / 'tokenizer'}" in result.stdout

    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    first = json.loads((out / "data" / "sft_train.jsonl").read_text().splitlines()[0])
    assert tokenizer.apply_chat_template(first["messages"], tokenize=False).startswith("<|im_start|>")


def test_world_build_without_dir_fills_the_cache_only(tmp_path, world_paths):
    """`posttrain world build` (what `make test` runs first) builds the cache and copies nothing."""
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "world", "build"], capture_output=True, text=True,
                            env=cli_env(), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"tokenizer: {world_paths.tokenizer}" in result.stdout
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# pretrain


def test_pretrain_outputs(pretrain_run, world_paths, text_data, tok, capsys):
    out, code = pretrain_run
    assert code == 0
    model = assert_loadable(out / "model", "llama", len(tok))
    assert model.num_parameters() > 0
    complete = json.loads((out / "model" / "complete.json").read_text())
    assert complete == {"steps": 3, "stage": "pretrain", "skipped_steps": 0,
                        "num_processes": 1}

    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for key in TRAIN_KEYS:
            assert key in record and record[key] == record[key], (key, record)  # present and not NaN
        assert record["train/tokens_per_s"] > 0 and record["train/loss"] > 0
    assert records[0]["train/lr"] < records[-1]["train/lr"]  # warm-up

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["max_steps"] == 3 and config["block_size"] == 32 and config["batch_size"] == 4
    assert config["data"] == str(text_data) and config["tokenizer"] == str(world_paths.tokenizer)
    assert_png(out / "plots" / "train.png")
    scalars = tensorboard_scalars(out)
    assert scalars["train/loss"] == [1, 2, 3] and "train/grad_norm" in scalars
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"


def test_pretrain_init_qwen2(world_paths, text_data, tok, tmp_path):
    out = tmp_path / "qwen"
    assert cli.main(pretrain_args(world_paths.tokenizer, text_data, out, "--init=world-qwen2", "--max_steps=1")) == 0
    assert_loadable(out / "model", "qwen2", len(tok))
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_pretrain_resume_of_complete_run(pretrain_run, world_paths, text_data, capsys):
    out, code = pretrain_run
    assert code == 0
    before = (out / "metrics.jsonl").read_text()
    model_bytes = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(pretrain_args(world_paths.tokenizer, text_data, out, "--resume")) == 0
    assert "run already complete (3 steps)" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "model" / "model.safetensors").read_bytes() == model_bytes


# --------------------------------------------------------------------------------------------------------------
# sft


def test_sft_outputs(sft_run, tok, capsys):
    out, code = sft_run
    assert code == 0
    assert_loadable(out / "model", "llama", len(tok))
    assert json.loads((out / "model" / "complete.json").read_text()) == {"steps": 3, "stage": "sft", "skipped_steps": 0,
                                                                          "num_processes": 1}

    records = read_metrics(out)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        for key in TRAIN_KEYS:
            assert key in record
        assert record["train/trained_tokens"] > 0
    evals = [r for r in records if "eval/loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 3 and 0 < evals[0]["eval/loss"] < 20

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["max_steps"] == 3 and config["batch_size"] == 4 and config["packing"] is False
    assert_png(out / "plots" / "train.png")
    assert_png(out / "plots" / "eval.png")
    scalars = tensorboard_scalars(out)
    assert scalars["train/loss"] == [1, 2, 3] and scalars["eval/loss"] == [3]


def test_sft_packing_and_grad_accum(sft_run, tiny_model, world_paths, tmp_path, capsys):
    out = tmp_path / "packed"
    args = sft_args(tiny_model, world_paths.data / "sft_train.jsonl", out, "--packing", "--grad_accum=2",
                    "--batch_size=2", "--max_length=256", "--max_steps=2")
    assert cli.main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["packing"] is True and config["grad_accum"] == 2 and config["batch_size"] == 2
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["train/loss"] > 0 and r["train/grad_norm"] > 0 for r in records)
    # 4 packed rows of up to 256 tokens hold many more trained tokens than 4 single conversations do.
    unpacked = read_metrics(sft_run[0])[0]["train/trained_tokens"]
    assert records[0]["train/trained_tokens"] > 2 * unpacked
    assert (out / "model" / "complete.json").is_file()


def test_sft_resume_of_complete_run(sft_run, tiny_model, world_paths, capsys):
    out, code = sft_run
    assert code == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(sft_args(tiny_model, world_paths.data / "sft_train.jsonl", out, "--resume")) == 0
    assert "run already complete (3 steps)" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


def test_existing_run_without_resume_exits_2(sft_run, tiny_model, world_paths):
    out, code = sft_run
    assert code == 0
    before = (out / "metrics.jsonl").read_text()
    result = run_cli(*sft_args(tiny_model, world_paths.data / "sft_train.jsonl", out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--resume" in result.stderr and str(out) in result.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing was overwritten


# --------------------------------------------------------------------------------------------------------------
# chat


def reference_replies(model_dir: Path, turns: list[str], max_new_tokens: int) -> list[str]:
    """What chat should print for ``turns``, computed with the library (greedy, same history handling)."""
    from posttrain.models.generation import generate
    from posttrain.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    history, replies = [], []
    for text in turns:
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [history], max_new_tokens=max_new_tokens, seed=0)[0]
        assert len(reply.token_ids) <= max_new_tokens
        history.append({"role": "assistant", "content": reply.text})
        replies.append(reply.text)
    return replies


def test_chat_one_shot(pretrain_run, capsys):
    model_dir = pretrain_run[0] / "model"
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(model_dir), "--prompt", "What is 2 + 3?", "--max_new_tokens=5"]) == 0
    out = capsys.readouterr().out
    assert out  # prints something (the reply, then a newline)
    assert out == reference_replies(model_dir, ["What is 2 + 3?"], 5)[0] + "\n"


def test_chat_interactive(sft_run):
    model_dir = sft_run[0] / "model"
    stdin = "What is 2 + 3?\nWhat is 4 + 4?\n/reset\nWhat is 4 + 4?\n/exit\nWhat is 9 + 9?\n"
    result = run_cli("chat", "--model", model_dir, "--max_new_tokens=5", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    replies = reference_replies(model_dir, ["What is 2 + 3?", "What is 4 + 4?", "/reset", "What is 4 + 4?"], 5)
    assert result.stdout == "".join(r + "\n" for r in replies)  # three replies; nothing after /exit


def test_chat_missing_model_dir(tmp_path, capsys):
    assert cli.main(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "directory not found" in capsys.readouterr().err
