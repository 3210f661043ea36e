"""The checkpoint module on its own, in milliseconds (a two-layer module, no model files): manifests, verification,
the newest intact checkpoint, quarantine, the latest pointer, retention and stale temporaries. The same guarantees
end to end, through real runs, are in tests/test_reliability.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.plumbing.checkpoint import (CheckpointError, checkpoint_dirs, find_checkpoint, latest_checkpoint,
                                           load_checkpoint, prune_checkpoints, remove_stale_temporaries,
                                           save_checkpoint, set_aside, verify_checkpoint)


def _state(seed: int):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    module(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return module, optimizer, scheduler


def _save(run: Path, step: int, keep_last: int = 10) -> Path:
    module, optimizer, scheduler = _state(step)
    return save_checkpoint(run, step, modules={"m": module}, optimizers={"m": optimizer},
                           schedulers={"m": scheduler}, extra={"note": step}, keep_last=keep_last)


def _names(run: Path) -> list[str]:
    return [p.name for p in checkpoint_dirs(run)]


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_save_then_load_restores_everything_exactly(tmp_path):
    checkpoint = _save(tmp_path, 7)
    saved_module, saved_optimizer, saved_scheduler = _state(7)
    module, optimizer, scheduler = _state(99)
    state = load_checkpoint(checkpoint, modules={"m": module}, optimizers={"m": optimizer},
                            schedulers={"m": scheduler})
    assert state["step"] == 7 and state["note"] == 7
    for a, b in zip(saved_module.state_dict().values(), module.state_dict().values()):
        assert torch.equal(a, b)
    momentum = [s["momentum_buffer"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in
               zip(momentum, saved_optimizer.state_dict()["state"].values()))
    assert scheduler.get_last_lr() == saved_scheduler.get_last_lr() == [0.05]


def test_manifest_is_written_last_and_covers_every_file(tmp_path):
    checkpoint = _save(tmp_path, 1)
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    assert {"model.safetensors", "trainer_state.pt", "state.json"} <= set(files)
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    assert verify_checkpoint(checkpoint) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no manifest", "bad manifest"])
def test_verify_names_what_is_wrong(damage, tmp_path):
    checkpoint = _save(tmp_path, 1)
    weights = checkpoint / "model.safetensors"
    match damage:
        case "truncate":
            _truncate(weights)
            expected = "model.safetensors has"
        case "flip":
            blob = bytearray(weights.read_bytes())
            blob[len(blob) // 2] ^= 1
            weights.write_bytes(bytes(blob))
            expected = "model.safetensors does not match its checksum"
        case "delete":
            weights.unlink()
            expected = "model.safetensors is missing"
        case "no manifest":
            (checkpoint / "manifest.json").unlink()
            expected = "no manifest.json"
        case "bad manifest":
            _truncate(checkpoint / "manifest.json")
            expected = "unreadable manifest.json"
    problems = verify_checkpoint(checkpoint)
    assert any(expected in p for p in problems), problems
    if damage == "flip":  # sizes alone cannot see a flipped bit
        assert verify_checkpoint(checkpoint, checksums=False) == []
    with pytest.raises(CheckpointError, match=str(checkpoint.name)):
        load_checkpoint(checkpoint, modules={}, optimizers={}, schedulers={})


def test_newest_intact_is_found_and_damaged_ones_set_aside(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    _truncate(tmp_path / "checkpoints" / "step-000006" / "trainer_state.pt")
    assert latest_checkpoint(tmp_path).name == "step-000004"
    found, report, damaged = find_checkpoint(tmp_path)
    assert _names(tmp_path) == ["step-000002", "step-000004", "step-000006"]  # finding moves nothing
    assert found.name == "step-000004" and [p.name for p in damaged] == ["step-000006"]
    assert len(report) == 1 and "step-000006" in report[0] and "trainer_state.pt" in report[0]
    set_aside(tmp_path, damaged, found)
    assert _names(tmp_path) == ["step-000002", "step-000004"]
    assert (tmp_path / "checkpoints" / "step-000006.damaged").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000004"


def test_a_checkpoint_without_manifest_is_passed_over_and_left_in_place(tmp_path):
    """An older posttrain's checkpoint (no manifest) cannot be verified: skipped, reported with the way to reuse
    its weights, and never renamed (the version that wrote it can still resume it)."""
    for step in (2, 4):
        _save(tmp_path, step)
    (tmp_path / "checkpoints" / "step-000004" / "manifest.json").unlink()
    found, report, damaged = find_checkpoint(tmp_path)
    assert found.name == "step-000002" and damaged == []
    assert "no manifest.json" in report[0] and "--model=" in report[0]
    set_aside(tmp_path, damaged, found)
    assert _names(tmp_path) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("pointer", [None, "step-000099", "step-000002", "\udcff"])
def test_the_pointer_is_never_trusted_over_the_directory(pointer, tmp_path):
    for step in (2, 4):
        _save(tmp_path, step)
    latest = tmp_path / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    elif pointer == "\udcff":
        latest.write_bytes(b"\xff\xfe")
    else:
        latest.write_text(pointer)
    found, report, damaged = find_checkpoint(tmp_path)
    assert found.name == "step-000004" and damaged == []
    assert len(report) == 1 and "checkpoints/latest" in report[0]
    set_aside(tmp_path, damaged, found)
    assert latest.read_text() == "step-000004"


def test_no_checkpoint_and_only_damaged_ones(tmp_path):
    assert find_checkpoint(tmp_path) == (None, [], [])
    _save(tmp_path, 3)
    _truncate(tmp_path / "checkpoints" / "step-000003" / "state.json", keep=3)
    found, report, damaged = find_checkpoint(tmp_path)
    assert found is None and len(report) == 1 and "state.json" in report[0] and len(damaged) == 1


def test_retention_keeps_the_newest_and_never_the_last_intact_one_away(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    assert _names(tmp_path) == ["step-000002", "step-000003"]
    for step in (2, 3):
        _truncate(tmp_path / "checkpoints" / f"step-{step:06d}" / "model.safetensors")
    _save(tmp_path, 4, keep_last=1)  # intact: the damaged older ones may go
    assert _names(tmp_path) == ["step-000004"]
    _truncate(tmp_path / "checkpoints" / "step-000004" / "model.safetensors")
    (tmp_path / "checkpoints" / "step-000005").mkdir()  # a half-copied directory: no manifest
    prune_checkpoints(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["step-000004", "step-000005"]  # none intact: nothing deleted


def test_retention_keeps_an_older_intact_one_when_every_kept_one_is_damaged(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    _truncate(tmp_path / "checkpoints" / "step-000003" / "model.safetensors")
    prune_checkpoints(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["step-000002", "step-000003"]  # step 1 goes; step 2, the newest intact, stays


def test_stale_temporaries_are_removed_and_checkpoints_kept(tmp_path):
    _save(tmp_path, 1)
    stale = [tmp_path / "checkpoints" / ".step-000002.x1y2", tmp_path / ".model.abc"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert _names(tmp_path) == ["step-000001"] and verify_checkpoint(checkpoint_dirs(tmp_path)[0]) == []


def test_a_save_that_fails_leaves_no_temporary_and_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        _save(tmp_path, 2)
    assert _names(tmp_path) == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))
    assert latest_checkpoint(tmp_path).name == "step-000001"
