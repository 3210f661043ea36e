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


def test_over_optimization_curve_averages_windows_that_end_at_the_last_step():
    """Seven logged steps (kl = step, proxy = step / 10, gold 1 2 3 2 1 0 0) in windows of 3: the windows end at the
    last step, so step 1 is left out: steps 2-4 (kl 3, proxy 0.3, gold 7/3) and 5-7 (kl 6, proxy 0.6, gold 1/3);
    the peak is the first window, the final point the second. Rows without all three metrics (an evaluation) are
    skipped."""
    from posttrain.stages.demo import over_optimization_curve

    golds = [1, 2, 3, 2, 1, 0, 0]
    rows = [{"step": s, "policy/kl": float(s), "rollout/reward_mean": s / 10, "rollout/gold_reward": float(g)}
            for s, g in zip(range(1, 8), golds)]
    rows.insert(3, {"step": 3, "eval/reward": 9.0})
    curve = over_optimization_curve(rows, 3)
    assert [point["steps"] for point in curve["curve"]] == [[2, 4], [5, 7]]
    assert [point["kl"] for point in curve["curve"]] == pytest.approx([3.0, 6.0])
    assert [point["proxy"] for point in curve["curve"]] == pytest.approx([0.3, 0.6])
    assert [point["gold"] for point in curve["curve"]] == pytest.approx([7 / 3, 1 / 3])
    assert curve["peak_gold"] == pytest.approx(7 / 3) and curve["peak_kl"] == pytest.approx(3.0)
    assert curve["peak_steps"] == [2, 4]
    assert curve["final_gold"] == pytest.approx(1 / 3) and curve["final_kl"] == pytest.approx(6.0)
    assert curve["first_proxy"] == pytest.approx(0.3) and curve["final_proxy"] == pytest.approx(0.6)
    assert curve["proxy_rise"] == pytest.approx(0.6)  # every step's proxy, step 1 too: slope 0.1 over 6 steps
    # a zig-zag proxy 0 1 0 1 over steps 1-4: least-squares slope 1.0 / 5 (cov / var about 2.5), over 3 steps 0.6
    zigzag = [{"step": s, "policy/kl": 1.0, "rollout/reward_mean": float(s % 2 == 0), "rollout/gold_reward": 0.0}
              for s in range(1, 5)]
    assert over_optimization_curve(zigzag, 2)["proxy_rise"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="fewer than one window of 8"):
        over_optimization_curve(rows, 8)


def test_demo_sft_over_two_processes(world_with_base, tmp_path):
    """--sft_processes=2: the demo's SFT under torchrun (2 CPU processes, gloo): a complete run recording both
    processes and the global batch; a run the launched processes refuse (a negative learning rate) is a
    ChildProcessError (the CLI's exit 1), not a silent fallback."""
    import yaml

    from posttrain.stages.demo import DemoConfig, train_demo_sft

    out = tmp_path / "sft"
    model = train_demo_sft(DemoConfig(out=str(tmp_path), sft_steps=3, sft_processes=2, progress=False, device="cpu"),
                           world_with_base, out)
    assert model == out / "model" and (model / "complete.json").exists()
    launch = yaml.safe_load((out / "config.yaml").read_text())["launch"]
    assert launch["num_processes"] == 2 and launch["global_batch_size"] == 32
    with pytest.raises(ChildProcessError, match="failed with exit code [1-9]"):
        train_demo_sft(DemoConfig(out=str(tmp_path), sft_steps=3, sft_processes=2, sft_lr=-1.0, progress=False,
                                  device="cpu"), world_with_base, tmp_path / "bad")
