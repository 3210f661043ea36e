"""``posttrain rl``: the loop's wiring on a tiny SFT'd model (the maths has its own tests in test_rl_maths.py).

The model is the world's tiny Llama after 40 SFT steps (about 10 s): enough to stop with its end-of-turn token most of
the time, so stopped and truncated completions both occur.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.data.render import end_of_turn_token_ids, render_prompt
from posttrain.models import load_causal_lm, load_tokenizer, prepare_for_training
from posttrain.models.generation import HFEngine, SamplingParams
from posttrain.models.logprobs import token_logps
from posttrain.stages import rl
from posttrain.stages.rl import AdaptiveKL, RLConfig, Sample, overlong_penalty, train_rl


@pytest.fixture(scope="module")
def sft_model(world, tiny_model_dir, tmp_path_factory):
    from posttrain.stages.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("rl-sft")
    return train_sft(SFTConfig(model=str(tiny_model_dir), data=str(world.data / "sft_train.jsonl"),
                               out=str(out / "run"), max_steps=40, lr=3e-3, batch_size=16, warmup_steps=5,
                               save_every=0, progress=False))


@pytest.fixture(scope="module")
def prompts(world, tmp_path_factory):
    """24 world prompts with their answers."""
    path = tmp_path_factory.mktemp("rl-prompts") / "prompts.jsonl"
    lines = (world.data / "rl_train.jsonl").read_text().splitlines()[:24]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(sft_model, prompts, out, **kwargs) -> RLConfig:
    defaults = dict(model=str(sft_model), data=str(prompts), eval_data="", reward="verifier:math", batch_size=4,
                    group_size=4, max_new_tokens=24, max_steps=2, lr=1e-3, out=str(out), progress=False, seed=3)
    return RLConfig(**{**defaults, **kwargs})


def run_and_collect(cfg: RLConfig) -> tuple[list[dict], list[list[Sample]]]:
    steps: list[list[Sample]] = []
    train_rl(cfg, on_step_end=lambda step, info: steps.append(info["samples"]))
    return read_metrics(Path(cfg.out)), steps


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir) -> dict[str, torch.Tensor]:
    return weights_file(Path(model_dir) / "model.safetensors")


def weights_file(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_rollout_logprobs_equal_the_trainers_token_logps(sft_model, temperature, top_p):
    """The engine's log-probs of the sampled tokens (softmax(logits / T)) equal the trainer's recomputation on the
    shared-prompt rows, for a model in training mode (padding-free segment attention), at T = 1 and at T != 1 with
    top-p < 1; so PPO's ratio starts at exactly 1."""
    tokenizer = load_tokenizer(sft_model)
    model = prepare_for_training(load_causal_lm(sft_model, device=torch.device("cpu")))
    prompts = [[{"role": "user", "content": "What is 3 * 5?"}],
               [{"role": "user", "content": "Multiply 61 by 9. Explain each step."}]]
    params = SamplingParams(n=3, max_new_tokens=20, temperature=temperature, top_p=top_p, seed=1, logprobs=True,
                            scaled_logprobs=True)
    out = HFEngine(model, tokenizer).generate(prompts, params)
    samples = [Sample(g, render_prompt(tokenizer, p), c.token_ids, c.logprobs, c.text, c.finish_reason != "stop", 0.0)
               for g, (p, cs) in enumerate(zip(prompts, out)) for c in cs]
    batch, ordered = rl.shared_prompt_batch(samples)
    with torch.no_grad():
        recomputed = rl.split_tokens(token_logps(model, batch, temperature=temperature), ordered)
    for s, logps in zip(ordered, recomputed):
        assert torch.allclose(torch.tensor(s.sampler_logps), logps, atol=1e-5)
    # and at T != 1 they are NOT the raw-logit log-probs (the scaling is real)
    if temperature != 1.0:
        with torch.no_grad():
            raw = rl.split_tokens(token_logps(model, batch), ordered)
        assert max(float((torch.tensor(s.sampler_logps) - r).abs().max()) for s, r in zip(ordered, raw)) > 1e-2


def test_first_update_starts_at_ratio_one_and_zero_kl(sft_model, prompts, tmp_path):
    """In the loop, at T = 0.7 / top-p 0.9: the first minibatch's ratio is 1 and the KL to the (identical)
    reference is 0."""
    metrics, _ = run_and_collect(config(sft_model, prompts, tmp_path / "run", algo="grpo", beta=0.1, temperature=0.7,
                                        top_p=0.9, max_steps=1))
    first = metrics[0]
    assert first["policy/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["policy/kl"] == pytest.approx(0.0, abs=1e-4)
    assert first["policy/clipfrac"] == 0.0
    assert first["rollout/logprob_mismatch"] < 1e-5  # the sampler's log-probs against the trainer's (fp32 on CPU)


def test_reward_lands_on_the_end_of_turn_token(sft_model, prompts, tmp_path):
    """PPO's per-token rewards: the score sits on the last sampled token, the end-of-turn token of a stopped
    completion, and every token carries -beta k1."""
    metrics, steps = run_and_collect(config(sft_model, prompts, tmp_path / "run", algo="ppo", beta=0.1, max_steps=1,
                                            ppo_epochs=1))
    end_of_turn = set(end_of_turn_token_ids(load_tokenizer(sft_model)))
    stopped = [s for s in steps[0] if not s.truncated]
    assert stopped, "the SFT'd tiny model should stop sometimes"
    for s in stopped:
        assert s.token_ids[-1] in end_of_turn
        rewards = s.extra["token_rewards"]
        assert torch.allclose(rewards[:-1], -0.1 * s.kl[:-1])
        assert float(rewards[-1]) == pytest.approx(s.reward - 0.1 * float(s.kl[-1]), abs=1e-6)
    assert metrics[0]["value/loss"] > 0 and "value/explained_variance" in metrics[0]


def test_token_rewards_and_overlong_penalty_hand_values():
    """token_rewards: 1.0 on the last of 3 tokens, -0.1 * kl everywhere; overlong shaping with budget 20, buffer 4:
    length 16 -> 0, 18 -> -(18 - 16) / 4 = -0.5, truncated -> -1."""
    rewards = rl.token_rewards(1.0, torch.tensor([0.5, -0.2, 1.0]), 0.1, 3)
    assert torch.allclose(rewards, torch.tensor([-0.05, 0.02, 0.9]))
    assert torch.equal(rl.token_rewards(2.0, None, 0.1, 3), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.equal(rl.token_rewards(math.nan, None, 0.1, 2), torch.zeros(2))
    assert overlong_penalty(16, False, 20, 4, 1.0) == 0.0
    assert overlong_penalty(18, False, 20, 4, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(20, False, 20, 4, 1.0) == pytest.approx(-1.0)
    assert overlong_penalty(20, True, 20, 4, 2.0) == -2.0
    assert overlong_penalty(19, False, 20, 0, 1.0) == 0.0


def test_adaptive_kl_controller_hand_values():
    """Ziegler et al.: KL 0.2 against target 0.1 -> error clipped to +0.2; beta 0.1 -> 0.1 (1 + 0.2 * 8 / 100)."""
    control = AdaptiveKL(0.1, 0.1, 100)
    control.update(0.2, 8)
    assert control.beta == pytest.approx(0.1 * (1 + 0.2 * 8 / 100))
    control.update(0.09, 8)  # error -0.1
    assert control.beta == pytest.approx(0.1 * (1 + 0.2 * 0.08) * (1 - 0.1 * 0.08))
    fixed = AdaptiveKL(0.1, 0.0, 100)
    fixed.update(5.0, 8)
    assert fixed.beta == 0.1


def test_group_advantages_per_algorithm():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    reinforce = rl.group_advantages(rewards, rl.Algo.reinforce, "group")
    assert torch.allclose(reinforce, rewards - 5 / 8)  # the batch mean
    assert torch.allclose(rl.group_advantages(rewards, rl.Algo.rloo, "group")[0], torch.tensor(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=torch.float64))
    none = rl.group_advantages(rewards, rl.Algo.dr_grpo, "none")
    assert torch.allclose(none[1], torch.tensor([0.25, 0.25, 0.25, -0.75], dtype=torch.float64))
    batch = rl.group_advantages(rewards, rl.Algo.grpo, "batch")
    assert torch.allclose(batch, none / (rewards.std() + 1e-4))


def test_truncated_completions_masked_contribute_no_loss_tokens(sft_model, prompts, tmp_path):
    """--overlong=mask: completions cut at the budget are not trained on (their tokens are not in the loss)."""
    infos = []
    train_rl(config(sft_model, prompts, tmp_path / "run", algo="grpo", overlong="mask", max_new_tokens=10,
                    max_steps=1, beta=0.0), on_step_end=lambda step, info: infos.append(info))
    samples = infos[0]["samples"]
    truncated = [s for s in samples if s.truncated]
    assert truncated and any(not s.truncated for s in samples)
    assert all(not s.trained for s in truncated) and all(s.trained for s in samples if not s.truncated)
    assert infos[0]["trained_tokens"] == sum(len(s.token_ids) for s in samples if not s.truncated)


def test_truncated_completion_is_penalised_even_when_the_prompt_holds_end_of_turn(sft_model, world, tmp_path,
                                                                                 monkeypatch):
    """Truncation is read from the sampled tokens, not from the text: a prompt that quotes the end-of-turn marker
    does not make a cut completion look finished. A constant reward of 1 with --overlong=shape leaves 0 on every
    truncated completion."""
    tokenizer = load_tokenizer(sft_model)
    marker = tokenizer.decode(end_of_turn_token_ids(tokenizer)[:1])
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 2? {marker}", "answer": str(i + 2)}) + "\n"
                            for i in range(8)))
    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": (
        lambda prompts, completions, **columns: [1.0] * len(completions)))
    _, steps = run_and_collect(config(sft_model, path, tmp_path / "run", algo="rloo", overlong="shape",
                                      overlong_buffer=0, max_new_tokens=6, max_steps=1, beta=0.0))
    samples = steps[0]
    assert any(s.truncated for s in samples)
    for s in samples:
        assert s.reward == (0.0 if s.truncated else 1.0)


def test_missing_reward_drops_the_sample_not_its_group(sft_model, prompts, tmp_path, monkeypatch):
    """A reward of None drops that sample (counted) and the group's other advantages are those of the group
    without it."""
    calls = {"n": 0}

    def reward(prompts_, completions, **columns):
        calls["n"] += 1
        return [None if i % 4 == 0 else float(len(c) % 3) for i, c in enumerate(completions)]

    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": reward)
    metrics, steps = run_and_collect(config(sft_model, prompts, tmp_path / "run", algo="grpo", max_steps=1, beta=0.0))
    assert metrics[0]["rollout/dropped"] == 4  # one per group of 4
    samples = steps[0]
    for g in range(4):
        group = [s for s in samples if s.group == g]
        dropped = [s for s in group if math.isnan(s.reward)]
        assert len(dropped) == 1 and not dropped[0].trained and float(dropped[0].advantages[0]) == 0.0
        kept = torch.tensor([[s.reward for s in group if s.trained]], dtype=torch.float64)
        expected = rl.adv.grpo(kept)[0]
        got = torch.tensor([float(s.advantages[0]) for s in group if s.trained], dtype=torch.float64)
        assert torch.allclose(got, expected)


def test_micro_batches_give_the_same_gradient(sft_model, prompts, tmp_path, monkeypatch):
    """One rollout batch as one micro-batch or as three (uneven: 6, 5, 5 of 16 completions): the same gradient at
    the optimizer step, under each aggregation (the denominators are the whole step's). The gradients themselves are
    compared, not the weights: Adam's first step is lr * sign(g) and would hide a uniformly scaled gradient. A reward
    that varies within groups, so the gradient is not 0."""
    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": (
        lambda prompts_, completions, **columns: [float(len(c) % 3) for c in completions]))
    captured: list[dict[str, torch.Tensor]] = []
    real_step = rl.optimizer_step

    def capture(model, optimizer, scheduler, max_grad_norm, **kwargs):
        if not hasattr(model, "score"):  # the policy, not a critic
            captured.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(model, optimizer, scheduler, max_grad_norm, **kwargs)

    monkeypatch.setattr(rl, "optimizer_step", capture)
    for aggregation in ("token_mean", "sequence_mean", "fixed_length"):
        captured.clear()
        for accum in (1, 3):
            train_rl(config(sft_model, prompts, tmp_path / f"{aggregation}-{accum}", algo="grpo", max_steps=1,
                            beta=0.1, grad_accum=accum, loss_aggregation=aggregation))
        one, three = captured
        assert one.keys() == three.keys() and one
        assert max(float(g.abs().max()) for g in one.values()) > 1e-6
        for name in one:
            assert torch.allclose(one[name], three[name], rtol=1e-4, atol=1e-7), (aggregation, name)


@pytest.fixture
def one_thread():
    """Bit-exact comparisons on one thread: with two, some CPU kernels reduce in an order that depends on the
    machine's load (measured: 1e-8 differences between two identical runs beside three busy processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_is_exact_with_the_critic_and_the_kl_controller(sft_model, prompts, tmp_path, one_thread):
    """PPO with the adaptive KL, 3 steps: straight, or interrupted after step 2 and resumed: the same final policy
    and critic and the same metrics at step 3 (the rollout of a step is a function of (seed, step))."""
    common = dict(algo="ppo", beta=0.1, target_kl=0.01, kl_horizon=50, num_minibatches=2, ppo_epochs=2,
                  max_steps=3, save_every=1)
    straight = tmp_path / "straight"
    metrics_a, _ = run_and_collect(config(sft_model, prompts, straight, **common))

    def interrupt(step, info):
        if step == 2:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_rl(config(sft_model, prompts, resumed, **common), on_step_end=interrupt)
    assert not (resumed / "model").exists()
    train_rl(config(sft_model, prompts, resumed, resume=True, **common))
    for part in ("model/model.safetensors", "checkpoints/step-000003/critic/model.safetensors"):
        a, b = weights_file(straight / part), weights_file(resumed / part)
        assert all(torch.equal(a[n], b[n]) for n in a), part
    last_a, last_b = metrics_a[-1], read_metrics(resumed)[-1]
    for key in ("rollout/reward_mean", "policy/kl", "policy/beta", "value/loss", "train/loss"):
        assert last_a[key] == last_b[key], key
    assert last_a["policy/beta"] != 0.1  # the controller moved beta, and the resumed run continued from its value


def test_no_reference_model_is_loaded_when_beta_is_zero(sft_model, prompts, tmp_path, monkeypatch):
    loaded = []
    real = rl.load_causal_lm
    monkeypatch.setattr(rl, "load_causal_lm", lambda *a, **k: loaded.append(a) or real(*a, **k))
    train_rl(config(sft_model, prompts, tmp_path / "zero", algo="grpo", beta=0.0, max_steps=1))
    assert len(loaded) == 1
    train_rl(config(sft_model, prompts, tmp_path / "kl", algo="grpo", beta=0.05, max_steps=1))
    assert len(loaded) == 3
    train_rl(config(sft_model, prompts, tmp_path / "tracked", algo="grpo", beta=0.0, track_kl=True, max_steps=2,
                    reward="gold"))  # the gold reward varies within groups: the policy moves
    assert len(loaded) == 5  # --track_kl: the reference only to report the KL
    assert read_metrics(tmp_path / "tracked")[-1]["policy/kl"] != 0.0
    assert (tmp_path / "tracked" / "plots" / "reward_vs_kl.png").exists()  # the over-optimization view
    assert not (tmp_path / "zero" / "plots" / "reward_vs_kl.png").exists()  # no KL measured, no such plot


def test_dynamic_sampling_trains_only_groups_whose_rewards_differ(sft_model, prompts, tmp_path, monkeypatch):
    """Groups with equal rewards carry no signal: dropped and refilled; a constant reward leaves nothing to train
    (and the weights do not move)."""
    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": (
        lambda prompts_, completions, **columns: [float(len(c) % 2) for c in completions]))
    trained_groups = []
    infos = []
    train_rl(config(sft_model, prompts, tmp_path / "mixed", algo="grpo", dynamic_sampling=True, max_steps=2,
                    beta=0.0), on_step_end=lambda step, info: infos.append(info))
    for info in infos:
        groups: dict[int, list[Sample]] = {}
        for s in info["trained_samples"]:
            groups.setdefault(s.group, []).append(s)
        assert groups and len(groups) == info["rollout_metrics"]["rollout/groups_trained"]
        assert all(len({s.score for s in g}) > 1 for g in groups.values())  # every trained group carries signal
    first_round = {s.group for s in infos[0]["samples"]}
    assert infos[0]["rollout_metrics"]["rollout/groups_filtered"] == len(first_round) - len(
        {g for g in first_round if len({s.score for s in infos[0]["samples"] if s.group == g}) > 1})

    def capture(step, info):
        trained_groups.append(info)

    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": (
        lambda prompts_, completions, **columns: [1.0] * len(completions)))
    train_rl(config(sft_model, prompts, tmp_path / "flat", algo="grpo", dynamic_sampling=True, max_steps=1,
                    max_refills=2, beta=0.0), on_step_end=capture)
    flat = [json.loads(line) for line in (tmp_path / "flat" / "metrics.jsonl").read_text().splitlines()][0]
    assert flat["rollout/groups_trained"] == 0 and flat["rollout/groups_filtered"] == 4
    before, after = weights(sft_model), weights(tmp_path / "flat" / "model")
    assert all(torch.equal(before[n], after[n]) for n in after)


@pytest.mark.parametrize("algo", ["reinforce", "rloo", "ppo", "grpo", "dr_grpo", "gspo", "cispo"])
def test_every_algorithm_runs_and_logs_the_metrics(sft_model, prompts, tmp_path, algo):
    metrics, _ = run_and_collect(config(sft_model, prompts, tmp_path / algo, algo=algo, max_steps=2,
                                        eval_data=str(prompts), eval_prompts=4))
    train = [m for m in metrics if "rollout/reward_mean" in m]
    assert len(train) == 2
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/gold_reward", "rollout/mean_length",
                "rollout/truncated_rate", "policy/kl", "policy/clipfrac", "policy/entropy", "policy/approx_kl",
                "rollout/generation_tokens_per_s", "train/training_tokens_per_s"):
        assert key in train[-1] and math.isfinite(train[-1][key]), key
    assert any("eval/reward" in m for m in metrics)
    if algo == "ppo":
        assert "value/loss" in train[-1] and "value/explained_variance" in train[-1]
    saved = json.loads((tmp_path / algo / "model" / "complete.json").read_text())
    assert saved["algo"] == algo


def test_config_defaults_resolve_per_algorithm_and_bad_settings_are_refused():
    resolved = rl.resolve(RLConfig(model="m", algo="dr_grpo"))
    assert (resolved.loss_aggregation, resolved.scale_rewards, resolved.beta) == ("fixed_length", "none", 0.0)
    gspo = rl.resolve(RLConfig(model="m", algo="gspo"))
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)
    ppo = rl.resolve(RLConfig(model="m", algo="ppo", clip_low=0.1))
    assert (ppo.clip_low, ppo.clip_high, ppo.kl_in, ppo.kl_estimator, ppo.ppo_epochs) == (0.1, 0.1, "reward", "k1", 4)
    grpo = rl.resolve(RLConfig(model="m", algo="grpo", clip_high=0.28))
    assert (grpo.clip_low, grpo.clip_high, grpo.kl_estimator) == (0.2, 0.28, "k3")
    with pytest.raises(ValueError, match="group_size"):
        rl.resolve(RLConfig(model="m", algo="rloo", group_size=1))
    with pytest.raises(ValueError, match="sequence_mean"):
        rl.resolve(RLConfig(model="m", algo="gspo", loss_aggregation="token_mean"))
    with pytest.raises(ValueError, match="batch_size"):
        rl.resolve(RLConfig(model="m", batch_size=0))
    with pytest.raises(ValueError, match="beta > 0"):
        rl.resolve(RLConfig(model="m", algo="dr_grpo", target_kl=0.1))
    with pytest.raises(ValueError, match="step_reward"):
        rl.resolve(RLConfig(model="m", algo="gspo", step_reward="prm:x"))


@pytest.fixture(scope="module")
def process_model(sft_model, tmp_path_factory):
    """A process RM (random 3-label head on the SFT backbone): its step scores vary, which is all the wiring needs."""
    from posttrain.models.heads import load_head_model

    out = tmp_path_factory.mktemp("prm")
    tokenizer = load_tokenizer(sft_model)
    torch.manual_seed(0)
    load_head_model(sft_model, "process", tokenizer=tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_step_end_tokens_find_each_steps_last_token(sft_model):
    tokenizer = load_tokenizer(sft_model)
    ids = tokenizer("11 * 3 = 33. 2.5 + 1 = 3.5.\nThe answer is 19.", add_special_tokens=False)["input_ids"]
    for split, expected in (("sentences", ["11 * 3 = 33.", "2.5 + 1 = 3.5.", "The answer is 19."]),
                            ("lines", ["11 * 3 = 33. 2.5 + 1 = 3.5.", "The answer is 19."])):
        steps, ends = rl.step_end_tokens(tokenizer, ids, split)
        assert steps == expected
        for step, end in zip(steps, ends):  # token `end` completes the step, token end - 1 does not
            assert tokenizer.decode(ids[: end + 1]).rstrip().endswith(step)
            assert not tokenizer.decode(ids[:end]).rstrip().endswith(step)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_process_rewards_are_dense(sft_model, prompts, process_model, tmp_path, algo):
    """--step_reward=prm:DIR: PPO gets the change in P(correct) on each step's last token on top of the outcome
    reward; GRPO's advantages vary along a completion (the process term) around the outcome advantage."""
    _, steps = run_and_collect(config(sft_model, prompts, tmp_path / "run", algo=algo, max_steps=1, beta=0.0,
                                      step_reward=f"prm:{process_model}", step_split="sentences", ppo_epochs=1,
                                      step_reward_weight=0.5))
    dense = [s for s in steps[0] if "steps" in s.extra and s.trained]
    assert dense
    for s in dense:
        scores, ends = s.extra["steps"]
        assert len(scores) == len(ends) and all(0.0 <= p <= 1.0 for p in scores)
        if algo == "ppo":
            expected = torch.zeros(len(s.token_ids))
            expected[-1] += s.reward
            previous = 0.0
            for p, end in zip(scores, ends):
                expected[end] += 0.5 * (p - previous)
                previous = p
            assert torch.allclose(s.extra["token_rewards"], expected, atol=1e-6)
    if algo == "grpo":
        assert any(len(set(s.advantages.tolist())) > 1 for s in dense)


def test_truncated_importance_sampling_scales_by_the_samplers_mismatch(sft_model, prompts, tmp_path, monkeypatch):
    """A sampler that is not the learner, simulated: the engine reports each sampled token's log-prob log 4 below the
    learner's, so pi_old / pi_sampler = 4 on every token. With --tis_cap 2 every weight is the cap and the step's
    gradient is exactly twice the uncorrected one (--tis_cap 0); with --tis_cap 8 it is four times; the metrics report
    the mean weight and the capped share. The gradients themselves are compared (Adam would hide a scale)."""
    from posttrain.models import generation

    monkeypatch.setattr("posttrain.rewards.reward_from_spec", lambda spec, device="cpu": (
        lambda prompts_, completions, **columns: [float(len(c) % 3) for c in completions]))
    real_generate = generation.HFEngine.generate

    def biased_sampler(self, prompts_, params):
        out = real_generate(self, prompts_, params)
        for samples in out:
            for c in samples:
                if c.logprobs is not None:
                    c.logprobs = [x - math.log(4.0) for x in c.logprobs]
        return out

    monkeypatch.setattr(generation.HFEngine, "generate", biased_sampler)
    captured: list[dict[str, torch.Tensor]] = []
    real_step = rl.optimizer_step

    def capture(model, optimizer, scheduler, max_grad_norm, **kwargs):
        captured.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(model, optimizer, scheduler, max_grad_norm, **kwargs)

    monkeypatch.setattr(rl, "optimizer_step", capture)
    metrics = {}
    for cap in (0.0, 2.0, 8.0):
        out = tmp_path / f"tis-{cap}"
        train_rl(config(sft_model, prompts, out, algo="grpo", beta=0.0, max_steps=1, tis_cap=cap,
                        max_grad_norm=0.0))
        metrics[cap] = read_metrics(out)[0]
    plain, capped, uncapped = captured
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-6
    for name in plain:
        assert torch.allclose(capped[name], 2 * plain[name], rtol=1e-4, atol=1e-7), name
        assert torch.allclose(uncapped[name], 4 * plain[name], rtol=1e-4, atol=1e-7), name
    assert "rollout/tis_weight_mean" not in metrics[0.0]
    assert metrics[2.0]["rollout/tis_weight_mean"] == pytest.approx(2.0, abs=1e-4)
    assert metrics[2.0]["rollout/tis_capped_frac"] == pytest.approx(1.0)
    assert metrics[8.0]["rollout/tis_weight_mean"] == pytest.approx(4.0, rel=1e-4)
    assert metrics[8.0]["rollout/tis_capped_frac"] == 0.0
    assert metrics[2.0]["rollout/logprob_mismatch"] == pytest.approx(math.log(4.0), abs=1e-4)
