"""Data-parallel training under ``accelerate launch`` with 2 CPU processes (gloo), as a user runs it.

Each test launches the real CLI in 2 processes. What they pin down (docs/scaling.md):
* the same global batch gives the losses, gradient norms and weights of one process (SFT, DPO: tolerance 1e-5
  relative on losses and norms, 1e-4 absolute on weights after Adam; only the order of float sums differs), which
  holds only if token-mean losses divide by the global token count over ranks and micro-batches;
* only rank 0 writes: one metrics line per step, the run directory's files once;
* ``config.yaml`` records how the run ran; a 2-process run killed at a random step resumes bit-exactly as 2
  processes, and resuming it with another number of processes is refused;
* RL (GRPO) shards the prompts, whole groups per rank, and reduces its metrics over the ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import cli
from test_reliability import _steps_logged, data, one_thread, stage_args  # noqa: F401  (data: a fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "cpu-2proc.yaml"


def launch(args: list[str], **popen) -> subprocess.Popen:
    """``accelerate launch --config_file examples/accelerate/cpu-2proc.yaml -m posttrain.cli ARGS`` (the README's
    command: on a CPU-only machine accelerate starts 2 processes and posttrain joins them over gloo), one thread
    each, in its own process group."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--main_process_port", str(free_port()), "-m", "posttrain.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)


def launch_and_wait(args: list[str], timeout: float = 600) -> None:
    process = launch(args)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the 2-process run hung (killed after {timeout} s)") from None
    assert process.returncode == 0, err.decode()[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def two_process_args(stage: str, model: Path, data: dict[str, Path], out: Path, steps: int = 4,
                     *extra: str) -> list[str]:
    """A short run whose global step is 4 units in 2 micro-batches: each rank trains on 2 of them, one per
    micro-batch, so the ranks' token counts differ (rl: 2 prompts, one per rank; GRPO's advantages scaled by the
    std of the whole batch, every rank's groups)."""
    if stage == "rl":
        extra = ("--scale_rewards=batch", *extra)
    args = stage_args(stage, model, data, out, "--grad_accum=2", "--max_grad_norm=0", *extra, steps=steps)
    return [a for a in args if not a.startswith("--device")]


STEPS = 5


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, data, tmp_path_factory):  # noqa: F811
    """stage -> (its one-process run, its 2-process run) of the same command line, made once per stage."""
    made = {}

    def make(stage: str) -> tuple[Path, Path]:
        if stage not in made:
            root = tmp_path_factory.mktemp(f"{stage}-runs")
            one, two = root / "one", root / "two"
            with one_thread():
                assert cli.main(two_process_args(stage, tiny_model_dir, data, one, STEPS)) == 0
            launch_and_wait(two_process_args(stage, tiny_model_dir, data, two, STEPS))
            made[stage] = one, two
        return made[stage]

    return make


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_train_exactly_as_one(stage, two_process_runs):
    one, two = two_process_runs(stage)
    expected, got = metrics(one), metrics(two)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one line per step: rank 1 writes nothing
    for a, b in zip(expected, got):
        for key in ("train/loss", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (stage, a["step"], key)
        if stage == "sft":
            assert b["train/trained_tokens"] == a["train/trained_tokens"]  # the global count, over both ranks
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        # Adam divides by sqrt(v): where a gradient is ~0 a 1e-7 difference moves a weight by up to ~lr (1e-3);
        # seen: 1 weight in 98304 off by 1.01e-5 after 4 DPO steps. 1e-4 still fails any wrong normalisation.
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)

    launch_record = yaml.safe_load((two / "config.yaml").read_text())["launch"]
    assert launch_record == {"num_processes": 2, "global_batch_size": 8, "per_device_batch_size": 4, "grad_accum": 2,
                             "backend": "gloo", "parallelism": "ddp", "device": "cpu:0"}
    assert yaml.safe_load((one / "config.yaml").read_text())["launch"]["num_processes"] == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    checkpoint = two / "checkpoints" / f"step-{STEPS:06d}"
    assert (checkpoint / "rank-1.pt").exists() and not (checkpoint / "rank-0.pt").exists()
    assert "rank-1.pt" in json.loads((checkpoint / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_a_two_process_run_killed_at_a_random_step_resumes_bit_exactly(stage, tiny_model_dir, data,  # noqa: F811
                                                                       tmp_path, two_process_runs):
    """SIGKILL to the whole launch (both ranks and the launcher) once a randomly drawn step is logged, then
    ``--resume`` under 2 processes: the weights and every logged metric but the clock's are those of an
    uninterrupted 2-process run, bit for bit. Resuming with 1 process is refused (each rank's RNG streams are in
    the checkpoint)."""
    if stage == "sft":
        reference = two_process_runs(stage)[1]
    else:
        reference = tmp_path / "reference"
        launch_and_wait(two_process_args(stage, tiny_model_dir, data, reference, STEPS))
    out = tmp_path / "killed"
    kill_after = random.Random(f"{stage}-2proc").randint(1, STEPS - 2)
    process = launch(two_process_args(stage, tiny_model_dir, data, out, STEPS))
    deadline = time.monotonic() + 300
    while _steps_logged(out / "metrics.jsonl") < kill_after and process.poll() is None:
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "model" / "complete.json").exists()

    with one_thread():
        assert cli.main([*two_process_args(stage, tiny_model_dir, data, out, STEPS), "--resume"]) == 2  # 1 process

    launch_and_wait([*two_process_args(stage, tiny_model_dir, data, out, STEPS), "--resume"])
    expected, got = weights(reference), weights(out)
    for name in expected:
        assert torch.equal(expected[name], got[name]), (stage, kill_after, name)

    def logged(run):
        return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_per_s")} for r in metrics(run)]

    assert logged(out) == logged(reference)
    if stage == "rl":  # the prompts were shared out, whole groups per rank, and the metrics reduced over both
        for record in metrics(reference):
            assert record["rollout/groups_trained"] == 2  # --batch_size=2 prompts in all: one per rank
            assert 0.0 <= record["rollout/gold_reward"] <= 2.0


def test_a_rank_with_nothing_to_train_still_takes_part_in_every_update(tiny_model_dir, world, tmp_path):
    """PPO (critic, advantages whitened over every rank's tokens) on prompts that alternate between the tiny world's
    and others, in file order: rank 1 always gets the other kind, which the gold reward cannot score, so it has
    nothing to train on in any update. It must still join every collective (the whitening statistics, the
    gradient reduction of the policy and of the critic) or the run hangs."""
    world_rows = (world.data / "rl_train.jsonl").read_text().splitlines()[:4]
    other = json.dumps({"prompt": [{"role": "user", "content": "Tell me about the sea."}]})
    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text("".join(f"{row}\n{other}\n" for row in world_rows))
    out = tmp_path / "ppo"
    launch_and_wait(["rl", f"--model={tiny_model_dir}", f"--data={prompts}", "--reward=gold", "--algo=ppo",
                     "--batch_size=2", "--group_size=2", "--max_new_tokens=8", "--shuffle=false", "--max_steps=3",
                     "--log_every=1", "--save_every=0", "--progress=false", f"--out={out}"], timeout=240)
    records = [r for r in metrics(out) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["rollout/dropped"] == 2  # rank 1's two samples: unscored, so not trained
        assert record["rollout/groups_trained"] == 2
        assert all(math.isfinite(record[k]) for k in ("train/loss", "train/grad_norm", "value/loss"))
        assert record["train/skipped_updates"] == 0


def test_fsdp_pieces_train_save_and_load_as_one_process(tiny_model_dir, world, tmp_path):
    """accelerate applies FSDP2 only on GPUs, so tests/fsdp_worker.py shards the model itself over 2 CPU processes
    as accelerate's plugin does, and runs posttrain's FSDP code: the wrapper forward, the global token-mean, the
    gradient norm over DTensor shards, the checkpoint's full state gathered on rank 0 and scattered back on load.
    Same losses and norms as one process (1e-5), same final weights (1e-4 after Adam); the reloaded shards hold the
    saved weights and Adam moments exactly."""
    import fsdp_worker
    from posttrain.plumbing.distributed import processes

    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join((world.data / "sft_heldout.jsonl").read_text().splitlines(True)[:64]))
    out = tmp_path / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(Path(__file__).with_name("fsdp_worker.py")), str(tiny_model_dir), str(rows),
               str(out), "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["sharded"] == "DTensor" and result["same_weights"] and result["same_adam"]

    with one_thread():
        model, _, losses, norms = fsdp_worker.train(str(tiny_model_dir), str(rows), 3, processes("cpu"))
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert result["norms"] == pytest.approx(norms, rel=1e-5)
    sharded_final = torch.load(out / "final_weights.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(sharded_final[name], tensor, rtol=0, atol=1e-4)
