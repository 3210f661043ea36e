"""Classical control sanity check (issue 12): the RL maths of the language-model stages solves CartPole and a
thermostat.

An episode is a "sequence" and a time step a "token": a batch of N episodes is a set of (N, T) tensors with a mask
on the real steps, and REINFORCE and PPO are built from the very functions the language-model stages use
(``posttrain.maths``): ``gae`` (also, with zero values and lam = 1, the discounted reward-to-go), ``rloo``,
``clipped_surrogate``, ``clipped_value_loss`` and ``reduce_per_token``: a check, outside any language model, that
they learn what they should.

  python -m posttrain.classic cartpole --algo ppo       # trains, prints progress, evaluates 100 episodes

Environments (vectorised in torch: N copies step at once, each one episode from ``reset``; an episode that has ended
stays frozen with reward 0, and the rollout masks it out):

* ``CartPole``: Barto, Sutton & Anderson (1983) as in Gym's CartPole-v1 (see ``cartpole_dynamics``).
* ``Thermostat``: a 1-D room whose temperature leaks toward the outside, with heat / off / cool actions (see the
  class), a short fixed horizon, and an optimum computed by dynamic programming (``ThermostatPlanner``).

Simplifications, as nanochat lists its own:

* Rollouts are whole episodes (not cleanrl's fixed-length segments with auto-reset), so that each one is a
  sequence whose value after the last step is 0, as ``gae`` assumes. An episode cut at CartPole's 500 steps is not
  a failure: PPO adds gamma V(s_500) to its last reward instead (a value bootstrap folded into the reward).
  REINFORCE has no value and treats the cut as an end.
* REINFORCE's baseline is leave-one-out per time step: ``rloo`` over the episodes still running at step t (a
  "group" per step); no value network.
* Actions are sampled from a local ``torch.Generator`` and networks are initialised inside ``fork_rng``: training
  is reproducible from ``seed`` and never touches the global RNG.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.maths.advantages import gae, rloo
from posttrain.maths.policy import clipped_surrogate, clipped_value_loss
from posttrain.maths.reduction import reduce_per_token


class EnvName(StrEnum):
    cartpole = "cartpole"
    thermostat = "thermostat"


class Algo(StrEnum):
    reinforce = "reinforce"
    ppo = "ppo"


# --------------------------------------------------------------------------
# environments

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5  # Gym's "length" is half the pole's length
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE_MAG = 10.0
TAU = 0.02  # seconds per step
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * math.pi / 360  # 12 degrees, 0.2094 rad
CARTPOLE_MAX_STEPS = 500  # CartPole-v1's cap (v0's was 200, "solved" at 195)
SOLVED_WINDOW = 100  # Gym's "solved": a mean return over 100 consecutive episodes


def cartpole_dynamics(state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """One Euler step of the cart-pole (Gym's CartPole-v1 equations, from Florian's corrected derivation of Barto et
    al. 1983): state (..., 4) = (x, x_dot, theta, theta_dot), actions (...) in {0: push left, 1: push right}.

        temp = (F + m_p l theta_dot^2 sin theta) / (m_c + m_p)
        theta_acc = (g sin theta - cos theta temp) / (l (4/3 - m_p cos^2 theta / (m_c + m_p)))
        x_acc = temp - m_p l theta_acc cos theta / (m_c + m_p)

    then x += tau x_dot, x_dot += tau x_acc, theta += tau theta_dot, theta_dot += tau theta_acc (positions use the
    old velocities, as Gym's "euler" does), with F = +-10 N, l = 0.5 (half length), tau = 0.02 s.
    """
    x, x_dot, theta, theta_dot = state.unbind(-1)
    force = torch.where(actions == 1, FORCE_MAG, -FORCE_MAG).to(state.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    temp = (force + POLE_MASS_LENGTH * theta_dot.pow(2) * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos.pow(2) / TOTAL_MASS))
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
    return torch.stack([x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc],
                       dim=-1)


def cartpole_failed(state: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...) bool: the cart left the track (|x| > 2.4) or the pole fell past 12 degrees (strict, as Gym)."""
    return (state[..., 0].abs() > X_LIMIT) | (state[..., 2].abs() > THETA_LIMIT)


class CartPole:
    """N cart-poles at once. Observation (N, 4) = (x, x_dot, theta, theta_dot), each drawn uniformly in +-0.05 at
    ``reset``; 2 actions (0 left, 1 right); reward +1 for every step taken, the failing one included (as Gym);
    an episode ends when ``cartpole_failed`` (terminated) or after 500 steps (truncated). Return at most 500."""

    obs_dim = 4
    num_actions = 2
    max_steps = CARTPOLE_MAX_STEPS

    def __init__(self, num_envs: int, seed: int = 0):
        self.num_envs = num_envs
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> torch.Tensor:
        self.state = (torch.rand(self.num_envs, 4, generator=self.generator) - 0.5) * 0.1  # uniform in +-0.05
        self.steps = torch.zeros(self.num_envs, dtype=torch.long)
        self.running = torch.ones(self.num_envs, dtype=torch.bool)
        return self.state.clone()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """actions (N,) -> (obs (N, 4), reward (N,), terminated (N,), truncated (N,)); the flags are set only on the
        step where an episode ends. Episodes already over keep their state and get reward 0."""
        running = self.running
        self.state = torch.where(running[:, None], cartpole_dynamics(self.state, actions), self.state)
        self.steps = self.steps + running.long()
        terminated = running & cartpole_failed(self.state)
        truncated = running & ~terminated & (self.steps >= self.max_steps)
        self.running = running & ~terminated & ~truncated
        return self.state.clone(), running.float(), terminated, truncated


OUTSIDE = 5.0  # degrees C
TARGET = 20.0
LEAK = 0.1  # fraction of the gap to the outside lost per step
POWER = 3.0  # degrees added (heat) or removed (cool) per step
THERMOSTAT_HORIZON = 20
INITIAL_RANGE = (5.0, 35.0)


def thermostat_dynamics(temperature: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """T' = T + 0.1 (5 - T) + 3 u with u = action - 1 in {-1 cool, 0 off, +1 heat}: the room leaks a tenth of its
    gap to the 5 degree outside each step (so left off it settles at 5, heated at 35, cooled at -25)."""
    return temperature + LEAK * (OUTSIDE - temperature) + POWER * (actions - 1).to(temperature.dtype)


class Thermostat:
    """N rooms at once. The temperature T_0 is uniform in [5, 35]; each of 20 steps the agent picks 0 (cool), 1 (off)
    or 2 (heat), T moves by ``thermostat_dynamics`` and the reward is -|T' - 20| (the distance from the 20 degree
    target after the move). Every episode lasts exactly 20 steps and then terminates (the horizon is part of the
    task, and the observation shows the time; CartPole's 500-step cap is a truncation instead). Observation
    (N, 2) = ((T - 20) / 10, t / 20), t the steps taken. The optimum (``ThermostatPlanner``) averages about -22 an
    episode (-21.56 on ``evaluate``'s 100 episodes); always off gets about -195, uniformly random actions -205."""

    obs_dim = 2
    num_actions = 3
    max_steps = THERMOSTAT_HORIZON

    def __init__(self, num_envs: int, seed: int = 0):
        self.num_envs = num_envs
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> torch.Tensor:
        low, high = INITIAL_RANGE
        self.temperature = low + (high - low) * torch.rand(self.num_envs, generator=self.generator)
        self.steps = torch.zeros(self.num_envs, dtype=torch.long)
        self.running = torch.ones(self.num_envs, dtype=torch.bool)
        return self.observe()

    def observe(self) -> torch.Tensor:
        return torch.stack([(self.temperature - TARGET) / 10, self.steps / self.max_steps], dim=-1)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``CartPole.step``: actions (N,) -> (obs (N, 2), reward (N,), terminated (N,), truncated (N,))."""
        running = self.running
        self.temperature = torch.where(running, thermostat_dynamics(self.temperature, actions), self.temperature)
        self.steps = self.steps + running.long()
        reward = torch.where(running, -(self.temperature - TARGET).abs(), 0.0)
        terminated = running & (self.steps >= self.max_steps)
        self.running = running & ~terminated
        return self.observe(), reward, terminated, torch.zeros_like(terminated)


def make_env(env_name: str, num_envs: int, seed: int) -> CartPole | Thermostat:
    match EnvName(env_name):
        case EnvName.cartpole:
            return CartPole(num_envs, seed)
        case EnvName.thermostat:
            return Thermostat(num_envs, seed)


class ThermostatPlanner(nn.Module):
    """The thermostat's optimal policy by backward dynamic programming on a temperature grid (step ``resolution``,
    V_t linear between grid points): V_20 = 0, V_t(T) = max_a [-|T'(T, a) - 20| + V_{t+1}(T'(T, a))].

    As a policy it maps observations (N, 2) to logits (N, 3) that are 0 for the best action and -inf otherwise, so
    ``evaluate`` rolls it out in the real environment: its return there is an achievable one, not the grid's
    estimate (the grid only picks the actions).
    """

    def __init__(self, resolution: float = 0.005):
        super().__init__()
        self.low, self.resolution = -30.0, resolution  # every reachable temperature lies in [-25, 35]
        grid = torch.arange(self.low, 40.0 + resolution / 2, resolution, dtype=torch.float64)
        values = [torch.zeros_like(grid)]  # values[k] = V_{20 - k}
        for _ in range(THERMOSTAT_HORIZON):
            values.append(self._q(grid, values[-1]).amax(-1))
        self.values = torch.stack(values[::-1])  # (21, G): V_0 ... V_20

    def _q(self, temperature: torch.Tensor, next_value: torch.Tensor) -> torch.Tensor:
        """temperatures (N,), V_{t+1} on the grid (G,) or one per temperature (N, G) -> action values (N, 3)."""
        after = thermostat_dynamics(temperature[:, None], torch.arange(3)[None, :])  # (N, 3)
        position = ((after - self.low) / self.resolution).clamp(0, next_value.shape[-1] - 1.000001)
        left = position.floor().long()
        frac = position - left
        table = next_value.expand(len(temperature), -1)
        interpolated = table.gather(1, left) * (1 - frac) + table.gather(1, left + 1) * frac
        return -(after - TARGET).abs() + interpolated

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        temperature = obs[:, 0].double() * 10 + TARGET  # (N,)
        t = (obs[:, 1] * THERMOSTAT_HORIZON).round().long().clamp(max=THERMOSTAT_HORIZON - 1)
        best = F.one_hot(self._q(temperature, self.values[t + 1]).argmax(-1), 3).bool()  # (N, 3)
        return torch.where(best, 0.0, -torch.inf)


# --------------------------------------------------------------------------
# rollouts: N episodes as (N, T) sequences


def mlp(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, outputs))


class Scaled(nn.Module):
    """``net`` times a constant: a value network whose targets are in the hundreds starts at their scale (a tanh
    MLP's output starts near 0 and Adam moves its weights by about lr a step)."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


@dataclass
class Episodes:
    """N complete episodes, one row each, padded to the longest (T steps): obs (N, T, D); actions, logprobs (the
    sampling policy's log-probs of the actions), values (0 without a value network), rewards (N, T); mask (N, T),
    True on the real steps (a prefix of each row); final_obs (N, D), the observation after the last step, and
    truncated (N,), whether the episode was cut by the step limit rather than ended."""

    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    final_obs: torch.Tensor
    truncated: torch.Tensor

    @property
    def returns(self) -> torch.Tensor:
        """(N,) undiscounted episode returns."""
        return (self.rewards * self.mask).sum(-1)


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None, greedy: bool = False) -> torch.Tensor:
    """logits (N, A) -> actions (N,): the argmax, or a draw from softmax(logits) by the Gumbel-max trick."""
    if greedy:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, generator=generator).clamp(min=1e-12)
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)


@torch.no_grad()
def rollout(env: CartPole | Thermostat, policy: nn.Module, generator: torch.Generator, *,
            value: nn.Module | None = None, greedy: bool = False) -> Episodes:
    """Runs every env of ``env`` from ``reset`` to the end of its episode."""
    obs = env.reset()
    final_obs, truncated = obs.clone(), torch.zeros(env.num_envs, dtype=torch.bool)
    steps: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "mask")}
    while env.running.any():
        mask = env.running.clone()
        logits = policy(obs)  # (N, A)
        actions = sample_actions(logits, generator, greedy)
        steps["obs"].append(obs)
        steps["actions"].append(actions)
        steps["logprobs"].append(torch.log_softmax(logits, -1).gather(-1, actions[:, None])[:, 0])
        steps["values"].append(value(obs)[:, 0] if value is not None else torch.zeros(env.num_envs))
        steps["mask"].append(mask)
        obs, reward, ended, cut = env.step(actions)
        steps["rewards"].append(reward)
        final = ended | cut
        final_obs[final], truncated[cut] = obs[final], True
    stacked = {k: torch.stack(v, dim=1) for k, v in steps.items()}  # (N, T) each, obs (N, T, D)
    stacked["logprobs"] = torch.where(stacked["mask"], stacked["logprobs"], 0.0)  # -inf off the mask would give NaN
    return Episodes(**stacked, final_obs=final_obs, truncated=truncated)


def evaluate(policy: nn.Module, env_name: str, episodes: int = 100, seed: int = 10_000, greedy: bool = False) -> float:
    """Mean undiscounted return of ``episodes`` fresh episodes, actions sampled from the policy (``greedy``: its
    argmax). The seed is far from the training seeds', so evaluation starts from unseen states."""
    env = make_env(env_name, episodes, seed)
    return rollout(env, policy, torch.Generator().manual_seed(seed), greedy=greedy).returns.mean().item()


# --------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class Settings:
    """A training run's hyperparameters (``settings_for`` gives each env and algorithm its defaults)."""

    num_envs: int = 16  # episodes per update (the batch's sequences)
    updates: int = 100  # the budget
    lr: float = 1e-2  # Adam
    hidden: int = 64  # two tanh layers, for the policy and the value network alike
    gamma: float = 0.99
    lam: float = 0.95  # PPO's GAE lambda
    epochs: int = 4  # PPO: passes over each batch
    minibatches: int = 4  # PPO: episodes are split into this many minibatches
    clip: float = 0.2  # PPO's ratio clip
    value_scale: float = 100.0  # the value network's output is multiplied by this: about the returns' size
    value_clip: float | None = 20.0  # clipped_value_loss's clip in return units: PPO's usual 0.2 x value_scale
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True  # divide by their std over the batch's steps (and centre them, PPO)
    # Gym's criterion, the mean return of the last 100 training episodes: stop once it reaches stop_return
    # (CartPole: v1's 475), and record when it first reached solved_return (CartPole: v0's 195)
    stop_return: float | None = None
    solved_return: float | None = None


def settings_for(env_name: str, algo: str) -> Settings:
    match EnvName(env_name), Algo(algo):
        case EnvName.cartpole, Algo.reinforce:
            return Settings(num_envs=16, updates=200, lr=1e-2, stop_return=475.0, solved_return=195.0)
        case EnvName.cartpole, Algo.ppo:
            return Settings(num_envs=16, updates=100, lr=3e-3, stop_return=475.0, solved_return=195.0)
        case EnvName.thermostat, Algo.reinforce:
            return Settings(num_envs=64, updates=150, lr=1e-2, gamma=1.0)
        case EnvName.thermostat, Algo.ppo:
            return Settings(num_envs=64, updates=100, lr=3e-3, gamma=1.0)


@dataclass
class Trained:
    """What ``train`` returns: the policy (obs (N, D) -> logits (N, A)), and how the run went. ``history`` holds
    one dict of namespaced metrics per update."""

    policy: nn.Module
    value: nn.Module | None
    settings: Settings
    updates: int = 0
    episodes: int = 0
    steps: int = 0
    seconds: float = 0.0
    solved_at: int | None = None  # the first update where the last 100 episodes' mean reached solved_return
    solved_episodes: int | None = None  # episodes trained on by then
    history: list[dict] = field(default_factory=list)


def _logprobs_and_entropy(policy: nn.Module, obs: torch.Tensor,
                          actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """obs (B, T, D), actions (B, T) -> the actions' log-probs and the policy's entropy, both (B, T)."""
    logp = torch.log_softmax(policy(obs), -1)  # (B, T, A)
    return logp.gather(-1, actions[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def reinforce_loss(policy: nn.Module, episodes: Episodes, settings: Settings) -> tuple[torch.Tensor, dict]:
    """REINFORCE (Williams 1992) with a leave-one-out baseline per time step: A_t = G_t - mean of the other running
    episodes' G_t, G_t the discounted reward-to-go; per-step loss -log pi(a_t | s_t) A_t, token-mean over the mask."""
    mask = episodes.mask
    # gae with V = 0 and lam = 1: delta_t = r_t, so A_t = r_t + gamma A_{t+1} is the discounted reward-to-go
    returns, _ = gae(episodes.rewards, torch.zeros_like(episodes.rewards), mask, settings.gamma, 1.0)  # (B, T)
    # each time step is a "group" of the episodes still running (rloo drops the NaN of the ended ones)
    grouped = torch.where(mask, returns, torch.nan).T  # (T, B)
    advantages = rloo(grouped).T  # (B, T), 0 off the mask and where fewer than two episodes run
    if settings.normalize_advantages:
        advantages = advantages / (advantages[mask].std() + 1e-8)
    logprobs, entropy = _logprobs_and_entropy(policy, episodes.obs, episodes.actions)
    per_step = -logprobs * advantages - settings.entropy_coef * entropy
    loss = reduce_per_token(per_step, mask, "token_mean")
    return loss, {"losses/policy": loss.item(), "losses/entropy": reduce_per_token(entropy, mask).item()}


def ppo_advantages(value: nn.Module, episodes: Episodes, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over each episode, (B, T) advantages and returns. A truncated episode's last reward gets gamma V(s_T)
    added, so that ``gae``'s "value after the last step is 0" holds for it too."""
    rewards = episodes.rewards.clone()
    if episodes.truncated.any():
        last = episodes.mask.sum(-1) - 1  # (B,)
        with torch.no_grad():
            bootstrap = value(episodes.final_obs)[:, 0] * episodes.truncated  # (B,)
        rewards[torch.arange(len(last)), last] += settings.gamma * bootstrap
    return gae(rewards, episodes.values, episodes.mask, settings.gamma, settings.lam)


def train(env_name: str, algo: str = Algo.reinforce, *, seed: int = 0, log_every: int = 0,
          **overrides) -> Trained:
    """Trains a policy on ``env_name`` with REINFORCE or PPO; ``overrides`` replace fields of ``settings_for``'s
    defaults. Stops after ``settings.updates`` updates or once the mean return of the last 100 training episodes
    reaches ``stop_return``. ``log_every`` > 0 prints a progress line every that many updates."""
    settings = replace(settings_for(env_name, algo), **overrides)
    algo = Algo(algo)
    env = make_env(env_name, settings.num_envs, seed)
    generator = torch.Generator().manual_seed(seed + 1)  # actions and minibatch order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = mlp(env.obs_dim, env.num_actions, settings.hidden)
        value = Scaled(mlp(env.obs_dim, 1, settings.hidden), settings.value_scale) if algo is Algo.ppo else None
    networks = [policy] + ([value] if value is not None else [])
    optimizer = torch.optim.Adam([p for net in networks for p in net.parameters()], lr=settings.lr)
    result = Trained(policy, value, settings)
    recent = torch.zeros(0)  # the last 100 training episodes' returns
    start = time.perf_counter()
    for update in range(1, settings.updates + 1):
        episodes = rollout(env, policy, generator, value=value)
        mean_return = episodes.returns.mean().item()
        recent = torch.cat([recent, episodes.returns])[-SOLVED_WINDOW:]
        window = recent.mean().item() if len(recent) >= SOLVED_WINDOW else math.nan  # NaN >= x is False
        metrics: dict = {}
        match algo:
            case Algo.reinforce:
                loss, metrics = reinforce_loss(policy, episodes, settings)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
                optimizer.step()
            case Algo.ppo:
                metrics = _ppo_update(policy, value, optimizer, episodes, settings, generator)
        result.updates, result.episodes = update, result.episodes + settings.num_envs
        result.steps += int(episodes.mask.sum())
        result.seconds = time.perf_counter() - start
        if settings.solved_return is not None and result.solved_at is None and window >= settings.solved_return:
            result.solved_at, result.solved_episodes = update, result.episodes
        result.history.append({"update": update, "charts/episodic_return": mean_return, "charts/return_100": window,
                               "charts/episodes": result.episodes, "charts/seconds": result.seconds, **metrics})
        if log_every and (update % log_every == 0 or update == 1):
            print(f"update {update:4d}  episodes {result.episodes:6d}  return {mean_return:8.2f}  "
                  f"last 100 {window:8.2f}  {result.seconds:6.1f}s", flush=True)
        if settings.stop_return is not None and window >= settings.stop_return:
            break
    return result


def _ppo_update(policy: nn.Module, value: nn.Module, optimizer: torch.optim.Optimizer, episodes: Episodes,
                settings: Settings, generator: torch.Generator) -> dict:
    """PPO (Schulman et al. 2017) on one batch: GAE, then ``epochs`` passes of minibatches of whole episodes, each
    minimising clipped surrogate + value_coef x clipped value loss - entropy_coef x entropy, token-mean per
    minibatch."""
    advantages, returns = ppo_advantages(value, episodes, settings)  # (B, T) each
    mask = episodes.mask
    if settings.normalize_advantages:
        steps = advantages[mask]
        advantages = torch.where(mask, (advantages - steps.mean()) / (steps.std() + 1e-8), 0.0)
    sums: dict[str, float] = {}
    num = episodes.obs.shape[0]
    for _ in range(settings.epochs):
        order = torch.randperm(num, generator=generator)
        for rows in order.chunk(settings.minibatches):
            m = mask[rows]
            logprobs, entropy = _logprobs_and_entropy(policy, episodes.obs[rows], episodes.actions[rows])
            surrogate, stats = clipped_surrogate(logprobs, episodes.logprobs[rows], advantages[rows],
                                                 clip_low=settings.clip)
            values = value(episodes.obs[rows])[..., 0]  # (b, T)
            value_loss = clipped_value_loss(values, episodes.values[rows], returns[rows], clip=settings.value_clip)
            policy_loss = reduce_per_token(surrogate, m)
            loss = (policy_loss + settings.value_coef * reduce_per_token(value_loss, m)
                    - settings.entropy_coef * reduce_per_token(entropy, m))
            optimizer.zero_grad()
            loss.backward()
            for net in (policy, value):  # apart: the value loss, in squared return units, would swamp the norm
                nn.utils.clip_grad_norm_(net.parameters(), settings.max_grad_norm)
            optimizer.step()
            for name, x in (("losses/policy", policy_loss), ("losses/value", reduce_per_token(value_loss, m)),
                            ("losses/entropy", reduce_per_token(entropy, m)),
                            ("policy/clipfrac", reduce_per_token(stats["clipfrac"], m)),
                            ("policy/approx_kl", reduce_per_token(stats["approx_kl"], m))):
                sums[name] = sums.get(name, 0.0) + x.item()
    count = settings.epochs * min(settings.minibatches, num)
    return {name: total / count for name, total in sums.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m posttrain.classic", description=__doc__.split("\n\n")[0])
    parser.add_argument("env", choices=[e.value for e in EnvName])
    parser.add_argument("--algo", choices=[a.value for a in Algo], default=Algo.reinforce.value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, help="the update budget (default: the env's and algorithm's)")
    parser.add_argument("--num-envs", type=int, help="episodes per update")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny networks: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("updates", args.updates), ("num_envs", args.num_envs), ("lr", args.lr))
                 if v is not None}
    print(f"{args.env} {args.algo} seed {args.seed}: {asdict(replace(settings_for(args.env, args.algo), **overrides))}")
    result = train(args.env, args.algo, seed=args.seed, log_every=10, **overrides)
    print(f"trained: {result.updates} updates, {result.episodes} episodes, {result.steps} steps, "
          f"{result.seconds:.1f}s; last-100 mean first >= solved_return at update {result.solved_at} "
          f"({result.solved_episodes} episodes)")
    for greedy in (False, True):
        score = evaluate(result.policy, args.env, args.eval_episodes, greedy=greedy)
        print(f"eval: mean return over {args.eval_episodes} episodes ({'greedy' if greedy else 'sampled'}): "
              f"{score:.2f}")
    if EnvName(args.env) is EnvName.thermostat:
        print(f"optimum (dynamic programming, same episodes): {evaluate(ThermostatPlanner(), args.env, 100):.2f}")


if __name__ == "__main__":
    main()
