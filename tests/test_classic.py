"""The classical control sanity check (posttrain.classic): the environments' dynamics by hand and against a float64
scalar reference, the rollout's masks, REINFORCE's and PPO's use of the shared maths, and (slow) the learning tests:
CartPole and the thermostat solved by both algorithms with fixed seeds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from posttrain import classic
from posttrain.classic import (
    THETA_LIMIT,
    CartPole,
    Episodes,
    Settings,
    Thermostat,
    ThermostatPlanner,
    cartpole_dynamics,
    cartpole_failed,
    evaluate,
    ppo_advantages,
    reinforce_loss,
    rollout,
    thermostat_dynamics,
    train,
)
from posttrain.maths.advantages import gae


# --------------------------------------------------------------------------
# CartPole


def test_cartpole_one_euler_step_from_rest_by_hand():
    """At rest (sin 0 = 0, cos 0 = 1) pushing right (F = 10): temp = 10 / 1.1 = 100/11; the denominator is
    0.5 (4/3 - 0.1/1.1) = 0.5 (44 - 3)/33 = 41/66, so theta_acc = -(100/11) / (41/66) = -600/41 = -14.634;
    x_acc = 100/11 + 0.05 (600/41) / 1.1 = 100/11 + 300/451 = 4400/451 = 400/41 = 9.756. Euler with tau = 0.02: the
    positions keep their old (zero) velocities, x_dot = 0.02 * 400/41 = 8/41, theta_dot = -0.02 * 600/41 = -12/41.
    Pushing left mirrors it."""
    rest = torch.zeros(2, 4, dtype=torch.float64)
    after = cartpole_dynamics(rest, torch.tensor([1, 0]))
    expected = torch.tensor([[0, 8 / 41, 0, -12 / 41], [0, -8 / 41, 0, 12 / 41]], dtype=torch.float64)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-15)


def _gym_step(x, x_dot, theta, theta_dot, action):
    """Gym's CartPole-v1 step, written out with scalars (float64)."""
    force = 10.0 if action == 1 else -10.0
    cos, sin = math.cos(theta), math.sin(theta)
    temp = (force + 0.05 * theta_dot**2 * sin) / 1.1
    theta_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos**2 / 1.1))
    x_acc = temp - 0.05 * theta_acc * cos / 1.1
    return [x + 0.02 * x_dot, x_dot + 0.02 * x_acc, theta + 0.02 * theta_dot, theta_dot + 0.02 * theta_acc]


def test_cartpole_dynamics_match_a_float64_scalar_reference():
    g = torch.Generator().manual_seed(0)
    states = (torch.rand(20, 4, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([4.8, 4, 0.4, 4])
    actions = torch.randint(0, 2, (20,), generator=g)
    expected = torch.tensor([_gym_step(*s, a) for s, a in zip(states.tolist(), actions.tolist())], dtype=torch.float64)
    torch.testing.assert_close(cartpole_dynamics(states, actions), expected, rtol=0, atol=1e-12)


def test_cartpole_termination_thresholds_are_strict():
    """|x| > 2.4 or |theta| > 12 degrees = 12 * 2 pi / 360 = 0.20944 rad; the limits themselves are still alive."""
    assert THETA_LIMIT == pytest.approx(0.2094395102)
    eps = 1e-9
    states = torch.zeros(8, 4, dtype=torch.float64)
    states[:, 0] = torch.tensor([2.4, -2.4, 2.4 + eps, -2.4 - eps, 0, 0, 0, 0], dtype=torch.float64)
    theta = [THETA_LIMIT, -THETA_LIMIT, THETA_LIMIT + eps, -THETA_LIMIT - eps]
    states[4:, 2] = torch.tensor(theta, dtype=torch.float64)
    assert cartpole_failed(states).tolist() == [False, False, True, True, False, False, True, True]


def test_cartpole_episode_ends_on_failure_with_its_reward_then_freezes():
    """x = 2.39 moving at 1 m/s: one step moves it 0.02 * 1 = 0.02 to 2.41 > 2.4, so the episode terminates on that
    step, which still pays +1; afterwards the state is frozen and the reward 0."""
    env = CartPole(2, seed=0)
    env.state = torch.tensor([[2.39, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    obs, reward, terminated, truncated = env.step(torch.tensor([1, 1]))
    assert obs[0, 0].item() == pytest.approx(2.41)
    assert reward.tolist() == [1.0, 1.0] and terminated.tolist() == [True, False] and not truncated.any()
    obs2, reward, terminated, truncated = env.step(torch.tensor([1, 1]))
    assert torch.equal(obs2[0], obs[0]) and reward.tolist() == [0.0, 1.0] and not terminated.any()
    assert env.running.tolist() == [False, True]


def test_cartpole_truncates_after_500_steps_and_starts_near_upright():
    env = CartPole(1000, seed=3)
    assert env.state.abs().max() <= 0.05 and env.state.abs().max() > 0.049  # uniform in +-0.05
    env.steps.fill_(499)
    _, reward, terminated, truncated = env.step(torch.zeros(1000, dtype=torch.long))
    assert reward.eq(1).all() and not terminated.any() and truncated.all() and not env.running.any()


# --------------------------------------------------------------------------
# thermostat


def test_thermostat_dynamics_by_hand():
    """T' = T + 0.1 (5 - T) + 3 u: heat at 12: 12 - 0.7 + 3 = 14.3, reward -|14.3 - 20| = -5.7; cool at 30:
    30 - 2.5 - 3 = 24.5, reward -4.5; off at 20: 20 - 1.5 = 18.5, reward -1.5."""
    env = Thermostat(3, seed=0)
    env.temperature = torch.tensor([12.0, 30.0, 20.0])
    obs, reward, terminated, truncated = env.step(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(env.temperature, torch.tensor([14.3, 24.5, 18.5]))
    torch.testing.assert_close(reward, torch.tensor([-5.7, -4.5, -1.5]))
    torch.testing.assert_close(obs, torch.tensor([[-0.57, 0.05], [0.45, 0.05], [-0.15, 0.05]]))
    assert not terminated.any() and not truncated.any()
    for _ in range(19):
        _, _, terminated, truncated = env.step(torch.tensor([1, 1, 1]))
    assert terminated.all() and not truncated.any() and not env.running.any()  # exactly 20 steps


def test_thermostat_planner_matches_brute_force_over_the_last_steps():
    """The dynamic programme's V_14 (6 steps to go) equals the best of all 3^6 = 729 action sequences, from a few
    temperatures, to the grid's interpolation error; and rolled out, the planner beats every constant policy."""
    planner = ThermostatPlanner()
    for start in (3.0, 11.7, 19.9, 27.25, 34.0):
        best = -math.inf
        for actions in itertools.product(range(3), repeat=6):
            temperature, total = torch.tensor([start], dtype=torch.float64), 0.0
            for a in actions:
                temperature = thermostat_dynamics(temperature, torch.tensor([a]))
                total -= abs(temperature.item() - 20.0)
            best = max(best, total)
        v = planner._q(torch.tensor([start], dtype=torch.float64), planner.values[15]).amax().item()
        assert v == pytest.approx(best, abs=1e-3), start

    class Constant(nn.Module):
        def __init__(self, action):
            super().__init__()
            self.action = action

        def forward(self, obs):
            return torch.where(torch.arange(3) == self.action, 0.0, -torch.inf).expand(len(obs), 3)

    optimum = evaluate(planner, "thermostat")
    assert optimum == pytest.approx(-21.56, abs=0.01)
    assert all(evaluate(Constant(a), "thermostat") < optimum - 150 for a in range(3))


# --------------------------------------------------------------------------
# rollouts and the two algorithms' use of the shared maths


def test_rollout_gives_masked_sequences():
    policy = nn.Linear(4, 2)
    episodes = rollout(CartPole(8, seed=1), policy, torch.Generator().manual_seed(0))
    lengths = episodes.mask.sum(-1)
    assert episodes.mask.shape[1] == lengths.max()
    assert torch.equal(episodes.mask, torch.arange(episodes.mask.shape[1]) < lengths[:, None])  # a prefix per row
    assert torch.equal(episodes.returns, lengths.float())  # +1 per step
    assert (episodes.logprobs[~episodes.mask] == 0).all() and (episodes.logprobs[episodes.mask] < 0).all()
    assert not episodes.truncated.any()  # a random policy never lasts 500 steps
    thermo = rollout(Thermostat(5, seed=1), nn.Linear(2, 3), torch.Generator().manual_seed(0))
    assert thermo.mask.shape == (5, 20) and thermo.mask.all()


def _episodes(obs: torch.Tensor, rewards: list[list[float]], mask: list[list[bool]]) -> Episodes:
    b, t = len(rewards), len(rewards[0])
    return Episodes(obs=obs, actions=torch.zeros(b, t, dtype=torch.long), logprobs=torch.zeros(b, t),
                    values=torch.zeros(b, t), rewards=torch.tensor(rewards, dtype=torch.float32),
                    mask=torch.tensor(mask),
                    final_obs=torch.zeros(b, obs.shape[-1]), truncated=torch.zeros(b, dtype=torch.bool))


def test_reinforce_loss_by_hand():
    """Two episodes of +1 rewards, lengths 3 and 1, gamma = 1: reward-to-go [3, 2, 1] and [1]. At t = 0 both run,
    so the leave-one-out advantages are 3 - 1 = +2 and 1 - 3 = -2; at t = 1, 2 one episode runs, no baseline, 0.
    Token-mean over the 4 real steps: loss = (-2 log pi(a_00) + 2 log pi(a_10)) / 4."""
    policy = nn.Linear(4, 2)
    obs = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    episodes = _episodes(obs, [[1, 1, 1], [1, 0, 0]], [[True] * 3, [True, False, False]])
    loss, _ = reinforce_loss(policy, episodes, Settings(gamma=1.0, normalize_advantages=False))
    logp = torch.log_softmax(policy(obs), -1)[..., 0]  # actions are all 0
    torch.testing.assert_close(loss, (-2 * logp[0, 0] + 2 * logp[1, 0]) / 4)


def test_ppo_bootstraps_only_truncated_episodes():
    """A truncated episode's last reward gets gamma V(s_T) added before ``gae``; an ended one does not."""
    value = classic.Scaled(nn.Linear(4, 1), 1.0)
    nn.init.zeros_(value.net.weight)
    nn.init.constant_(value.net.bias, 5.0)  # V = 5 everywhere
    episodes = _episodes(torch.zeros(2, 3, 4), [[1, 1, 1], [1, 1, 0]], [[True] * 3, [True, True, False]])
    episodes.values = torch.full((2, 3), 5.0)
    episodes.truncated = torch.tensor([True, False])
    settings = Settings(gamma=0.9, lam=0.8)
    advantages, returns = ppo_advantages(value, episodes, settings)
    rewards = torch.tensor([[1, 1, 1 + 0.9 * 5.0], [1, 1, 0]])
    expected = gae(rewards, episodes.values, episodes.mask, 0.9, 0.8)
    torch.testing.assert_close(advantages, expected[0])
    torch.testing.assert_close(returns, expected[1])


def test_training_is_reproducible_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    runs = [train("thermostat", algo, seed=4, updates=3, num_envs=8) for algo in ("reinforce", "ppo") for _ in (0, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in (runs[:2], runs[2:]):
        assert all(torch.equal(p, q) for p, q in zip(a.policy.parameters(), b.policy.parameters()))
        assert a.history[-1]["charts/episodic_return"] == b.history[-1]["charts/episodic_return"]
    assert {"losses/value", "policy/clipfrac", "policy/approx_kl"} <= set(runs[2].history[0])


def test_entry_point_runs(capsys):
    classic.main(["thermostat", "--algo", "ppo", "--updates", "2", "--num-envs", "4", "--eval-episodes", "5"])
    out = capsys.readouterr().out
    assert "update    1" in out and "(sampled)" in out and "(greedy)" in out and "optimum" in out


# --------------------------------------------------------------------------
# learning tests: fixed seeds, never chosen to pass (docs/online-rl.md has seeds 0-9 and their numbers)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_cartpole_is_solved(algo):
    """CartPole-v0's "solved": a mean return >= 195 over 100 episodes, here with actions *sampled* from the policy
    on 100 fresh evaluation episodes (capped at 500; measured 500.0 for both on seed 0, in about 2 s and 3 s)."""
    result = train("cartpole", algo, seed=0)
    assert result.solved_at is not None  # the last 100 training episodes averaged >= 195 at some update
    assert evaluate(result.policy, "cartpole", episodes=100) >= 195.0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_thermostat_is_solved(algo):
    """Sampled actions on 100 evaluation episodes reach the dynamic-programming optimum (-21.56 on them) within 0.5
    (2%; always off is 173 below it). Measured gaps on seeds 0-7: at most 0.11 (REINFORCE) and 0.28 (PPO)."""
    result = train("thermostat", algo, seed=0)
    optimum = evaluate(ThermostatPlanner(), "thermostat", episodes=100)
    assert evaluate(result.policy, "thermostat", episodes=100) >= optimum - 0.5
