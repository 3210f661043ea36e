"""The vLLM rollout engine of online RL: weight sync after every step, loud failures, the log-prob mismatch.

vLLM needs a CUDA GPU; its code paths run here against a fake engine with vLLM's interface (``generate``,
``load_weights``): its own copy of the starting model, loaded from disk as vLLM loads it, so it samples from the
trained policy only if the weights really reach it. The test against the real vLLM runs where vLLM imports and a
GPU is present, and is skipped with the reason elsewhere."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.models.generation import HFEngine, SamplingParams, WeightSyncError, engine_weights, sync_weights


class FakeVLLM:
    """vLLM's interface on the CPU: ``generate`` by the built-in engine on a separate copy of the model;
    ``load_weights(named tensors)`` copies each into its parameter by name, as vLLM's model does, and rejects an
    unknown name."""

    instances: list["FakeVLLM"] = []

    def __init__(self, path, *, chat_template="", rollout=False, timeout_s=0, **llm_kwargs):
        self.model = load_causal_lm(path)
        self.engine = HFEngine(self.model, load_tokenizer(path, chat_template or None))
        self.rollout, self.kwargs, self.loads = rollout, llm_kwargs, 0
        FakeVLLM.instances.append(self)

    def load_weights(self, named_tensors) -> None:
        state = self.model.state_dict()
        received = set()
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"no parameter named {name!r}")
            state[name].copy_(tensor)
            received.add(name)
        assert received == set(state), set(state) - received  # every weight, every time
        self.loads += 1

    def generate(self, prompts, params: SamplingParams):
        return self.engine.generate(prompts, params)


@pytest.fixture(scope="module")
def random_rm(tiny_model_dir, tmp_path_factory) -> str:
    """A reward model with a random head: scores that differ within every group, so GRPO moves the policy."""
    from posttrain.models.heads import load_head_model

    path = tmp_path_factory.mktemp("random-rm")
    torch.manual_seed(0)
    load_head_model(tiny_model_dir, "scalar").save_pretrained(path)
    load_tokenizer(tiny_model_dir).save_pretrained(path)
    return f"rm:{path}"


def grpo_config(tiny_model_dir, world, out, reward, **overrides):
    from posttrain.stages.rl import RLConfig

    return RLConfig(**{**dict(model=str(tiny_model_dir), data=str(world.data / "rl_train.jsonl"), reward=reward,
                              out=str(out), max_steps=3, batch_size=2, group_size=4, max_new_tokens=12, beta=0.1,
                              lr=3e-2, warmup_steps=0, log_every=1, progress=False, device="cpu", seed=2,
                              rollout_engine="vllm"), **overrides})


def mismatches(final) -> list[float]:
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    return [r["rollout/logprob_mismatch"] for r in records if "rollout/logprob_mismatch" in r]


@pytest.fixture
def fake_vllm(monkeypatch):
    from posttrain.stages import rl

    FakeVLLM.instances.clear()
    monkeypatch.setattr(rl, "VLLMEngine", FakeVLLM)
    return rl


def test_weights_reach_the_engine_after_every_step(fake_vllm, tiny_model_dir, world, tmp_path, random_rm):
    """The engine samples from the policy as trained so far: the trainer's recomputed log-probs of what it sampled
    equal the engine's (mean |difference| per token ~ 0 at every step), and every step sent the weights once."""
    final = fake_vllm.train_rl(grpo_config(tiny_model_dir, world, tmp_path / "run", random_rm))
    engine, = FakeVLLM.instances
    assert engine.loads == 3 and engine.rollout and engine.kwargs["gpu_memory_utilization"] == 0.3
    assert all(m < 1e-5 for m in mismatches(final)), mismatches(final)


def test_a_stale_engine_shows_in_the_logprob_mismatch(fake_vllm, tiny_model_dir, world, tmp_path, monkeypatch,
                                                      random_rm):
    """The same run with the sync switched off: the engine keeps the starting weights and the mismatch the run
    logs grows once the policy has moved (the check above can fail)."""
    monkeypatch.setattr(fake_vllm, "sync_weights", lambda engine, model: 0)
    found = mismatches(fake_vllm.train_rl(grpo_config(tiny_model_dir, world, tmp_path / "run", random_rm)))
    assert found[0] < 1e-5 and max(found[1:]) > 1e-3, found


def test_a_rejected_weight_update_stops_the_run_loudly(fake_vllm, tiny_model_dir, world, tmp_path, monkeypatch,
                                                      random_rm):
    def refuse(self, named_tensors):
        next(iter(named_tensors))
        raise KeyError("no parameter named 'model.layers.0.mlp.up_proj.weight'")

    monkeypatch.setattr(FakeVLLM, "load_weights", refuse)
    with pytest.raises(WeightSyncError, match="rejected the policy's weights after 1 tensors: KeyError"):
        fake_vllm.train_rl(grpo_config(tiny_model_dir, world, tmp_path / "run", random_rm))


def test_engine_weights_have_checkpoint_names_and_merged_lora_values(tiny_model_dir):
    from posttrain.models.adapters import add_lora

    plain = load_causal_lm(tiny_model_dir)
    names = [name for name, _ in engine_weights(plain)]
    assert names == list(plain.state_dict())

    model = add_lora(load_causal_lm(tiny_model_dir), r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj",
                     base_path=tiny_model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained adapter (B starts at 0)
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    receiver = load_causal_lm(tiny_model_dir)

    class Receiver:
        def load_weights(self, named):
            missing, unexpected = receiver.load_state_dict(dict(named), strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sync_weights(Receiver(), model) == len(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(receiver(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # the merged weights were computed out of place: the frozen base (the reference) is untouched, bit for bit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_call_past_its_deadline_ends_the_process_with_the_stacks():
    program = ("import time\nfrom posttrain.models.generation import deadline\n"
               "with deadline(0.5, 'vLLM generation'):\n    time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "vLLM generation did not finish within 0.5 s" in done.stderr
    assert 'File "<string>", line 4 in <module>' in done.stderr  # the stack names the line that hung


def test_vllm_engine_on_a_machine_without_a_gpu_says_so(tiny_model_dir):
    from posttrain.models.generation import VLLMEngine

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("this machine can run vLLM")
    with pytest.raises((ImportError, ValueError), match="vllm|CUDA GPU"):
        VLLMEngine(tiny_model_dir, rollout=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vLLM and a CUDA GPU (benchmarks/gpu.sh runs it on one)")
def test_real_vllm_takes_the_policy_weights(tiny_model_dir):  # pragma: no cover - GPU only
    import os

    from posttrain.models.generation import VLLMEngine

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = VLLMEngine(tiny_model_dir, rollout=True, timeout_s=600, gpu_memory_utilization=0.2, dtype="float32")
    policy = load_causal_lm(tiny_model_dir, device="cuda")
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    sync_weights(engine, policy)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
    greedy = SamplingParams(n=1, max_new_tokens=8, temperature=0.0)
    hf = HFEngine(policy, load_tokenizer(tiny_model_dir)).generate(prompts, greedy)
    assert engine.generate(prompts, greedy)[0][0].token_ids == hf[0][0].token_ids
