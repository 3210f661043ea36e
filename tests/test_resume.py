"""Checkpoint/resume: a run killed at step k and resumed ends with weights identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from posttrain.plumbing.checkpoint import latest_checkpoint
from posttrain.stages.sft import SFTConfig, train_sft


class Killed(Exception):
    """Stands in for the process dying: raised from inside the loop, no clean-up of ours runs."""


def _config(tiny_model_dir, world, out, **overrides) -> SFTConfig:
    settings = dict(
        model=str(tiny_model_dir), data=str(world.data / "sft_heldout.jsonl"), out=str(out), max_steps=6,
        batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, lr_schedule="cosine", save_every=2, log_every=1,
        progress=False, device="cpu",
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _kill_at(step_to_die: int, exception: type[BaseException]):
    def hook(step: int, info: dict) -> None:
        if step == step_to_die:
            raise exception()
    return hook


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return train_sft(_config(tiny_model_dir, world, out))


def test_hard_kill_then_resume_is_bit_identical(tiny_model_dir, world, tmp_path, uninterrupted):
    """Killed after step 5 with no chance to save: the last checkpoint is step 4; resuming replays step 5 and 6
    exactly (same batches, same optimizer and scheduler state) and the final weights match bit for bit."""
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_sft(_config(tiny_model_dir, world, out), on_step_end=_kill_at(5, Killed))
    assert latest_checkpoint(out).name == "step-000004"
    assert not (out / "model").exists()
    final = train_sft(_config(tiny_model_dir, world, out, resume=True))
    reference = _weights(uninterrupted)
    resumed = _weights(final)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    # metrics.jsonl reads as one run: steps 1..6 once each, step 5 from the resumed run only
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    reference_losses = [r["train/loss"] for r in map(json.loads, (uninterrupted.parent / "metrics.jsonl").read_text().splitlines())
                        if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                      if "train/loss" in r]
    assert resumed_losses == reference_losses


def _signal_at(step_to_signal: int, signum: int):
    def hook(step: int, info: dict) -> None:
        if step == step_to_signal:
            os.kill(os.getpid(), signum)
    return hook


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_saves_and_resumes_exactly(tiny_model_dir, world, tmp_path, uninterrupted, signum):
    """SIGTERM or Ctrl-C during step 3 stops the run at the end of that step with a checkpoint at step 3 (never a
    half-applied update); resuming is exact."""
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train_sft(_config(tiny_model_dir, world, out), on_step_end=_signal_at(3, signum))
    assert latest_checkpoint(out).name == "step-000003"
    final = train_sft(_config(tiny_model_dir, world, out, resume=True))
    reference = _weights(uninterrupted)
    for name, tensor in _weights(final).items():
        assert torch.equal(reference[name], tensor), name


def test_resume_of_complete_run_says_so(tiny_model_dir, world, uninterrupted, capsys):
    before = _weights(uninterrupted)
    final = train_sft(_config(tiny_model_dir, world, uninterrupted.parent, resume=True))
    assert "already complete" in capsys.readouterr().out
    assert final == uninterrupted
    for name, tensor in _weights(final).items():
        assert torch.equal(before[name], tensor)


def test_no_silent_overwrite(tiny_model_dir, world, uninterrupted):
    with pytest.raises(FileExistsError, match="--resume"):
        train_sft(_config(tiny_model_dir, world, uninterrupted.parent))


def test_checkpoint_contents(uninterrupted):
    checkpoint = latest_checkpoint(uninterrupted.parent)
    assert checkpoint.name == "step-000006"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6
    # no temporary directories left behind
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]
