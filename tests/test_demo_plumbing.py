"""The demo's second process (posttrain.stages.demo._Background): a failure in it stops the demo with a message that
names the job and its run directory, cancelling it stops it, and the main process gets its threads back."""

from __future__ import annotations

import operator
import time

import pytest
import torch

from posttrain.stages.demo import _Background


def test_a_failing_job_is_reported_with_its_run_directory(tmp_path):
    threads = torch.get_num_threads()
    job = _Background("reward model's training", tmp_path / "rm", operator.truediv, 1, 0)  # ZeroDivisionError there
    assert torch.get_num_threads() == max(1, threads - 1)  # the other core is the job's meanwhile
    with pytest.raises(RuntimeError, match=r"reward model's training process failed \(exit code 1\).*rm"):
        job.join()
    assert torch.get_num_threads() == threads


def test_cancel_stops_a_running_job_and_gives_the_threads_back(tmp_path):
    threads = torch.get_num_threads()
    job = _Background("side work", tmp_path, time.sleep, 600)
    started = time.monotonic()
    job.cancel()
    assert not job.process.is_alive() and time.monotonic() - started < 60
    assert torch.get_num_threads() == threads
