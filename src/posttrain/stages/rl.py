"""Online RL: ``posttrain rl --algo reinforce | rloo | ppo | grpo | dr_grpo | gspo | cispo``.

Maximise E[r(x, y)] - beta KL(pi || pi_ref) by policy gradients (RLHF book, policy-gradient chapter), against any
reward of the reward contract: a reward model (RLHF), a verifier (RLVR), the tiny world's gold reward, a judge, or a
weighted sum. One step of the loop, top to bottom:

  1. rollouts: ``batch_size`` prompts x ``group_size`` completions from the generation engine, the exact sampled
     tokens kept (end-of-turn included) with their log-probs under softmax(logits / T) — the behaviour policy's
     log pi_old, so no extra forward is needed for them;
  2. rewards: the reward on each completion (None = cannot score: that sample is dropped and counted, its group's
     other samples keep their advantages); DAPO's overlong shaping or masking of truncated completions; dynamic
     sampling drops groups whose rewards are all equal (no signal) and refills the batch with fresh prompts;
  3. one forward of the reference (beta > 0) and the critic (ppo) over shared-prompt rows: each group's prompt
     appears once, its completions after it (``collate_shared_prefix``);
  4. advantages (``posttrain.maths.advantages``): REINFORCE with the batch-mean baseline, RLOO, GRPO's group
     normalisation (Dr. GRPO: no std), or GAE over per-token rewards (ppo). The KL penalty goes in the reward
     (k1 per token for ppo, summed per sequence for reinforce/rloo) or in the loss (k3, GRPO style);
  5. ``ppo_epochs`` passes of ``num_minibatches`` optimizer steps each over the rollout batch; each minibatch is
     ``grad_accum`` micro-batches whose losses share the minibatch's denominator (``reduce_per_token``), so the
     gradient does not depend on how the minibatch is split. Loss: PPO's clipped surrogate (reinforce, rloo, ppo,
     grpo, dr_grpo; with one epoch and one minibatch the ratio is 1 and this is the plain policy gradient), GSPO's
     sequence ratio, or CISPO's clipped detached weight; the critic takes the clipped value loss;
  6. the adaptive KL controller (when ``target_kl`` > 0), metrics, checkpoint.

The rollout of step s is a pure function of (seed, s): the prompts come from the seeded epoch order and the
sampling seed from (seed, s, round), so ``--resume`` replays the same rollouts without saving any RNG stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.data.packing import Example, add_scored_tokens, collate_shared_prefix
from posttrain.data.prompts import load_prompt_rows
from posttrain.data.render import render_prompt
from posttrain.maths import advantages as adv
from posttrain.maths.policy import (KLEstimator, cispo_surrogate, clipped_surrogate, clipped_value_loss,
                                    gspo_surrogate, kl_penalty, truncated_is_weights)
from posttrain.maths.reduction import Reduction, reduce_per_token
from posttrain.models.adapters import lora_from_config, quantization_config, reference_context
from posttrain.models import (load_causal_lm, load_tokenizer, prepare_for_training, resolve_device,
                              use_segment_attention)
from posttrain.models.generation import HFEngine, SamplingParams, VLLMEngine, sync_weights
from posttrain.models.heads import load_value_model, token_values
from posttrain.models.logprobs import logps_of, token_logps, trained_token_logits
from posttrain.plumbing.config import ChatTrainConfig, ConfigError, option, stage_config
from posttrain.plumbing.distributed import launched_world_size as run_world_size
from posttrain.plumbing.harness import Run
from posttrain.plumbing.runlog import plot_against
from posttrain.plumbing.training import (autocast, batch_indices, build_optimizer, build_scheduler, micro_batches,
                                         optimizer_and_scheduler, optimizer_step)


class Algo(StrEnum):
    reinforce = "reinforce"
    rloo = "rloo"
    ppo = "ppo"
    grpo = "grpo"
    dr_grpo = "dr_grpo"
    gspo = "gspo"
    cispo = "cispo"


MAX_REFILLS = 100
GROUP_ALGOS = (Algo.grpo, Algo.dr_grpo, Algo.gspo, Algo.cispo)

# What "auto" (or -1) resolves to per algorithm: where the KL goes, how the loss is reduced, the clip range, the
# passes over a rollout batch. Sources: PPO/RLHF (Ouyang et al. 2022; KL per token in the reward), RLOO (Ahmadian et
# al. 2024; KL in the sequence reward), GRPO (Shao et al. 2024; k3 in the loss, sequence mean), Dr. GRPO (Liu et al.
# 2025; no std, constant denominator), GSPO (Zheng et al. 2025; clip 3e-4 / 4e-4), CISPO (MiniMax-M1 2025; upper
# clip only, token mean).
ALGO_DEFAULTS: dict[Algo, dict[str, Any]] = {
    Algo.reinforce: dict(kl_in="reward", loss_aggregation="token_mean", clip_low=0.2, clip_high=0.2, ppo_epochs=1,
                         beta=0.05),
    Algo.rloo: dict(kl_in="reward", loss_aggregation="token_mean", clip_low=0.2, clip_high=0.2, ppo_epochs=1,
                    beta=0.05),
    Algo.ppo: dict(kl_in="reward", loss_aggregation="token_mean", clip_low=0.2, clip_high=0.2, ppo_epochs=4,
                   beta=0.05),
    Algo.grpo: dict(kl_in="loss", loss_aggregation="sequence_mean", clip_low=0.2, clip_high=0.2, ppo_epochs=1,
                    beta=0.04),
    Algo.dr_grpo: dict(kl_in="loss", loss_aggregation="fixed_length", clip_low=0.2, clip_high=0.2, ppo_epochs=1,
                       beta=0.0),
    Algo.gspo: dict(kl_in="loss", loss_aggregation="sequence_mean", clip_low=3e-4, clip_high=4e-4, ppo_epochs=1,
                    beta=0.0),
    Algo.cispo: dict(kl_in="loss", loss_aggregation="token_mean", clip_low=-1.0, clip_high=0.28, ppo_epochs=1,
                     beta=0.0),
}


STEP_PATTERNS = {
    "lines": re.compile(r"[^\n]*\S[^\n]*"),  # a step per non-blank line (the PRM data's own separator)
    "sentences": re.compile(r"\S.*?(?:[.!?](?=\s|$)|(?=\n)|$)"),  # a step per sentence ("2.5" does not end one)
}


@stage_config
class RLConfig(ChatTrainConfig):
    algo: str = option("grpo", "reinforce | rloo | ppo | grpo | dr_grpo | gspo | cispo",
                       choices=tuple(a.value for a in Algo))
    reward: str = option("verifier:math", "the reward (see `posttrain score --help`): gold | verifier:math | rm:DIR | "
                                          "prm:DIR | judge:DIR | weighted sums like 0.5*rm:DIR+0.5*verifier:math")
    group_size: int = option(8, "completions sampled per prompt (G)", minimum=1)
    max_new_tokens: int = option(64, "generation budget per completion, in tokens", minimum=1)
    temperature: float = option(1.0, "sampling temperature; the policy trained is softmax(logits / T)", above=0)
    top_p: float = option(1.0, "nucleus sampling at rollout (not part of the trained distribution, as in TRL/verl)",
                          above=0, maximum=1)
    ppo_epochs: int = option(-1, "passes over each rollout batch; -1 = the algorithm's (ppo 4, the others 1)",
                             minimum=1, unset=-1)
    num_minibatches: int = option(1, "optimizer steps per pass over a rollout batch (split by prompt groups)",
                                  minimum=1)
    beta: float = option(-1.0, "KL coefficient; -1 = the algorithm's (0.05 reinforce/rloo/ppo, 0.04 grpo, 0 for "
                               "dr_grpo/gspo/cispo); 0 loads no reference model", unset=-1)
    kl_estimator: str = option("auto", "auto (k1 in the reward, k3 in the loss) | k1 | k2 | k3",
                               choices=("auto", "k1", "k2", "k3"))
    kl_in: str = option("auto", "auto (the algorithm's) | reward (per token for ppo, per sequence otherwise) | loss",
                        choices=("auto", "reward", "loss"))
    target_kl: float = option(0.0, "adaptive KL controller's target KL per sequence (nats); 0 = fixed beta")
    kl_horizon: int = option(10000, "adaptive KL controller's horizon (in sequences)", minimum=1)
    loss_aggregation: str = option("auto", "auto (the algorithm's) | token_mean | sequence_mean | fixed_length",
                                   choices=("auto", "token_mean", "sequence_mean", "fixed_length"))
    scale_rewards: str = option("auto", "group algorithms' advantage scale: auto | group (std of the group) | batch "
                                        "(std of the batch) | none (Dr. GRPO)",
                                choices=("auto", "group", "batch", "none"))
    clip_low: float = option(-1.0, "lower clip range eps_low; -1 = the algorithm's (0.2; gspo 3e-4; cispo none)",
                             unset=-1)
    clip_high: float = option(-1.0, "upper clip range eps_high (> clip_low: DAPO's clip-higher); -1 = the "
                                    "algorithm's (= clip_low; gspo 4e-4; cispo 0.28)", unset=-1)
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards are all equal and refill the batch")
    tis_cap: float = option(0.0, "truncated importance sampling for a sampler that is not the learner (vLLM, another "
                                 "precision): each token's policy loss times min(pi_old / pi_sampler, tis_cap) "
                                 "(Yao et al. 2025; 2 is usual); 0 = off (the built-in engine samples from the "
                                 "learner itself)")
    max_refills: int = option(4, "dynamic sampling: extra rollout rounds per step before training on fewer groups "
                                 f"(at most {MAX_REFILLS})", maximum=MAX_REFILLS)
    overlong: str = option("none", "truncated completions (no end-of-turn): none | mask (no loss) | shape (DAPO's "
                                   "soft penalty over the last overlong_buffer tokens, -overlong_penalty if cut)",
                           choices=("none", "mask", "shape"))
    overlong_buffer: int = option(16, "shape: tokens before the budget where the length penalty starts")
    overlong_penalty: float = option(1.0, "shape: the largest length penalty")
    gamma: float = option(1.0, "ppo: discount", maximum=1)
    lam: float = option(0.95, "ppo: GAE lambda", maximum=1)
    value_model: str = option("", "ppo: the critic's initial weights: empty = the policy's with a new head; a "
                                  "directory = its backbone, and its 1-output head when it has one (a reward model)")
    value_lr: float = option(-1.0, "ppo: critic learning rate; -1 = lr", unset=-1)
    value_clip: float = option(0.2, "ppo: value clipping range; 0 = off")
    whiten_advantages: bool = option(True, "ppo: normalise advantages over the batch's tokens")
    step_reward: str = option("", "dense process rewards from a process RM (prm:DIR): each step (line) of a "
                                  "completion is scored on its last sampled token; ppo: the change in the PRM's "
                                  "P(correct) since the previous step, a per-token reward into GAE; the other "
                                  "algorithms: DeepSeekMath's process advantages, added to the outcome advantages")
    step_reward_weight: float = option(1.0, "weight of the dense process rewards / advantages")
    step_split: str = option("lines", "what a step is for --step_reward: lines | sentences (the tiny world's replies "
                                      "are one line of sentences)", choices=tuple(STEP_PATTERNS))
    ref_model: str = option("", "frozen reference for the KL; empty = the starting policy")
    track_kl: bool = option(False, "at beta 0, load the reference anyway to report policy/kl (over-optimization "
                                   "curves: reward against KL)")
    eval_prompts: int = option(200, help="held-out prompts evaluated (greedy) every eval_every steps and at the end")
    generation_batch_size: int = option(512, "sequences per generation batch (built-in engine)", minimum=1)
    rollout_engine: str = option("hf", "hf (built-in, the policy itself) | vllm (colocated on the GPU, the policy's "
                                       "weights pushed after every step; use with --tis_cap, e.g. 2)",
                                 choices=("hf", "vllm"))
    vllm_gpu_memory_utilization: float = option(0.3, "share of the GPU vLLM may take (the trainer needs the rest)",
                                                above=0, maximum=1)
    vllm_sleep: bool = option(False, "put vLLM to sleep (KV cache freed, weights offloaded) while the trainer trains")
    vllm_timeout_s: float = option(900.0, "a vLLM call (start-up, generation, weight update) running longer stops the "
                                          "run with every thread's stack instead of hanging; 0 = no limit")
    data: str = option("", "prompt rows (`prompt` or `messages`, plus the reward's columns, e.g. `answer`); empty = "
                           "the tiny world's rl_train.jsonl")
    eval_data: str = option("", "held-out prompt rows; empty = the tiny world's rl_heldout.jsonl when data is empty")
    model: str = option("", "local policy model directory to start from (an SFT model; required)")
    batch_size: int = option(8, "prompts per rollout batch, over all processes (each gives group_size "
                                "completions)", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (the denominators are the whole step's)", minimum=1)
    max_steps: int = option(100, "rollout steps (each: generate, score, ppo_epochs x num_minibatches updates)",
                            minimum=1)
    epochs: float = option(1.0, "not used by rl: a run is max_steps rollout steps (prompts cycle through the data "
                                "in seeded epochs)", above=0)
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    log_every: int = 1
    save_every: int = 50
    out: str = "runs/rl"


def resolve(config: RLConfig) -> RLConfig:
    """The algorithm's defaults in place of every auto / -1 option (so config.yaml records what ran), and checks."""
    algo = Algo(config.algo)
    defaults = ALGO_DEFAULTS[algo]
    changes: dict[str, Any] = {}
    for name in ("kl_in", "loss_aggregation"):
        if getattr(config, name) == "auto":
            changes[name] = defaults[name]
    for name in ("beta", "clip_low", "clip_high", "ppo_epochs"):
        if getattr(config, name) == -1:
            changes[name] = defaults[name]
    if config.clip_high == -1 and algo not in (Algo.gspo, Algo.cispo):
        changes["clip_high"] = changes.get("clip_low", config.clip_low)
    if config.scale_rewards == "auto":
        changes["scale_rewards"] = "none" if algo == Algo.dr_grpo else "group"
    if config.value_lr == -1:
        changes["value_lr"] = config.lr
    config = dataclasses.replace(config, **changes)
    if config.kl_estimator == "auto":
        config.kl_estimator = "k1" if config.kl_in == "reward" else "k3"
    if algo == Algo.gspo and config.loss_aggregation != "sequence_mean":
        raise ValueError("gspo: the sequence-level ratio needs --loss_aggregation=sequence_mean")
    if config.group_size < (2 if algo in GROUP_ALGOS + (Algo.rloo,) else 1):
        raise ValueError(f"{algo}: group baselines need --group_size >= 2, got {config.group_size}")
    if config.num_minibatches > config.batch_size:
        raise ValueError(f"--num_minibatches ({config.num_minibatches}) cannot exceed --batch_size "
                         f"({config.batch_size}): minibatches split the batch by prompt")
    if config.target_kl > 0 and config.beta == 0:
        raise ValueError("--target_kl adapts beta multiplicatively: it needs a starting --beta > 0")
    if algo == Algo.gspo and config.step_reward:
        raise ValueError("gspo has one ratio and one advantage per sequence: dense --step_reward needs a token-level "
                         "algorithm")
    return config


def _applied_mean(total: float, applied: float, skipped: float) -> float:
    """Mean of a metric over the updates applied in a step; nan when every update was skipped, 0 when none ran."""
    return total / applied if applied else (math.nan if skipped else 0.0)


class AdaptiveKL:
    """Ziegler et al. (2019)'s controller: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) after
    each batch of n sequences whose mean KL was KL. ``target`` 0: beta stays fixed. Saved with the checkpoint (it has
    the scheduler's state_dict interface) so that a resumed run continues with the same beta."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0 and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


@dataclass
class Sample:
    """One completion of a rollout, with everything its updates need. Per-token lists run over ``token_ids``
    (the completion's sampled tokens, end-of-turn included when it stopped)."""

    group: int  # index of its prompt in the batch
    prompt_ids: list[int]
    token_ids: list[int]
    sampler_logps: list[float]  # log pi(token) under softmax(logits / T) as the sampler computed it
    text: str
    truncated: bool
    reward: float  # NaN: the reward could not score it (dropped)
    trained: bool = True  # False: dropped (no reward) or masked (truncated under --overlong=mask)
    score: float = math.nan  # the reward before any shaping (dynamic sampling filters on it)
    old_logps: torch.Tensor | None = None  # (L,) log pi_old by the trainer's forward (when an update needs it first)
    ref_logps: torch.Tensor | None = None  # (L,)
    values: torch.Tensor | None = None  # (L,) V(s_t) before each token (ppo)
    advantages: torch.Tensor | None = None  # (L,)
    returns: torch.Tensor | None = None  # (L,) (ppo)
    kl: torch.Tensor | None = None  # (L,) per-token KL estimate to the reference (reward placement)
    extra: dict = field(default_factory=dict)

    def example(self) -> Example:
        return Example(self.prompt_ids + self.token_ids, [0] * len(self.prompt_ids) + [1] * len(self.token_ids))

    def filler(self) -> "Sample":
        """A copy with zeros for everything an update reads: the sample a rank with nothing to train on in an
        update runs with weight 0, so that it still takes part in the update's collective gradient reduction."""
        zeros = torch.zeros(len(self.token_ids))
        return dataclasses.replace(self, reward=0.0, trained=True, score=0.0, old_logps=zeros, ref_logps=zeros,
                                   values=zeros, advantages=zeros, returns=zeros, kl=zeros, extra={})


def overlong_penalty(length: int, truncated: bool, budget: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13): 0 up to ``budget - buffer`` tokens, then falling
    linearly to ``-penalty`` at the budget; a completion cut at the budget (no end-of-turn) gets ``-penalty``."""
    if truncated:
        return -penalty
    start = budget - buffer
    if buffer <= 0 or length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)


def token_rewards(score: float, kl: torch.Tensor | None, beta: float, length: int) -> torch.Tensor:
    """PPO's per-token rewards (L,) of one completion (Ouyang et al. 2022; Stiennon et al. 2020): -beta kl_t on every
    token (when the KL is in the reward) and the score on the last sampled token, which is the end-of-turn token when
    the completion stopped, so the reward is credited to the action that ended the reply. NaN score: no score."""
    rewards = -beta * kl.clone() if kl is not None else torch.zeros(length)
    if not math.isnan(score):
        rewards[-1] += score
    return rewards


def step_end_tokens(tokenizer, content_ids: list[int], split: str = "lines") -> tuple[list[str], list[int]]:
    """The steps of a completion (lines or sentences of its text) and, for each, the index of the sampled token that
    completes it: the first token whose decoded prefix covers the step's last character."""
    text = tokenizer.decode(content_ids, skip_special_tokens=True)
    spans = [(m.group().strip(), m.end() - 1) for m in STEP_PATTERNS[split].finditer(text)]
    decoded: dict[int, int] = {}

    def covered(k: int) -> int:  # characters decoded from the first k + 1 tokens (grows with k)
        if k not in decoded:
            decoded[k] = len(tokenizer.decode(content_ids[: k + 1], skip_special_tokens=True))
        return decoded[k]

    ends = []
    for _, char in spans:  # binary search: O(log L) decodes per step, not one per token
        low, high = 0, len(content_ids) - 1
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if covered(middle) <= char else (low, middle)
        ends.append(low)
    return [step for step, _ in spans], ends


ENTROPY_CHUNK = 2048  # rows of (n, V) logits at a time: a 150k vocabulary's fp32 softmax stays ~1 GiB


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (n,) of softmax(logits / T) per row of logits (n, V), in float32."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, algo: Algo, scale: str) -> torch.Tensor:
    """(P, G) rewards (NaN = missing) -> (P, G) sequence advantages of the non-PPO algorithms."""
    match algo:
        case Algo.reinforce:  # the batch-mean baseline (Williams 1992 with a constant baseline)
            scored = ~torch.isnan(rewards)
            baseline = rewards[scored].mean() if scored.any() else torch.tensor(0.0)
            return torch.where(scored, rewards - baseline, torch.zeros_like(rewards))
        case Algo.rloo:
            return adv.rloo(rewards)
    centred = adv.grpo(rewards, normalize_std=scale == "group")
    if scale == "batch":  # TRL's scale_rewards="batch": the group-centred rewards over the std of the whole batch
        scored = ~torch.isnan(rewards)
        std = rewards[scored].std() if int(scored.sum()) > 1 else torch.tensor(0.0)
        centred = centred / (std + adv.GRPO_STD_EPS)
    return centred


def padded(values: list[torch.Tensor], pad: float = 0.0) -> torch.Tensor:
    """Ragged per-sequence tensors -> (B, T_max), right-padded with ``pad``."""
    return torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)


def shared_prompt_batch(samples: list[Sample]) -> tuple[dict, list[Sample]]:
    """Samples grouped by prompt -> one shared-prompt row (each prompt once) with the scored completion tokens, and
    the samples in the row's order (the order of the scored tokens)."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    ordered = [s for members in groups.values() for s in members]
    examples = [[s.example() for s in members] for members in groups.values()]
    return add_scored_tokens(collate_shared_prefix(examples), examples), ordered


def split_tokens(flat: torch.Tensor, samples: list[Sample]) -> list[torch.Tensor]:
    """Flat per-token values (n,) of a :func:`shared_prompt_batch` -> one tensor per sample."""
    return list(torch.split(flat, [len(s.token_ids) for s in samples]))


def _default_world_paths(config: RLConfig) -> RLConfig:
    if config.data:
        return config
    from posttrain.stages import world as build

    paths = build.ensure_world(base_model=False)
    config.data = str(paths.data / "rl_train.jsonl")
    config.eval_data = config.eval_data or str(paths.data / "rl_heldout.jsonl")
    return config


def reward_columns(extras: list[dict]) -> dict[str, list]:
    """The rows' other columns (``answer``, ``tests``, ...) as the reward contract takes them: one list per column,
    None where a row lacks it."""
    return {key: [extra.get(key) for extra in extras] for key in {key for extra in extras for key in extra}}


def _world_rollout_metrics(prompts: list[list[dict]], texts: list[str]) -> dict[str, float]:
    """rollout/gold_reward and rollout/request_rate when every prompt is a tiny-world question (else nothing)."""
    from posttrain.world.requests import follows_request
    from posttrain.world.tasks import solve

    if not prompts or any(solve(p[-1]["content"]) is None for p in prompts):
        return {}
    from posttrain.world.gold import gold_reward

    follows = [follows_request(p, t) for p, t in zip(prompts, texts)]
    asked = [f for f in follows if f is not None]
    metrics = {"rollout/gold_reward": sum(gold_reward(p, t) for p, t in zip(prompts, texts)) / len(texts)}
    if asked:
        metrics["rollout/request_rate"] = sum(asked) / len(asked)
    return metrics


def rollout_engine(config: RLConfig, model, tokenizer, device):
    """The engine that samples the rollouts: the built-in one on the policy itself, or vLLM colocated on this
    process's GPU, started from the starting model and kept in sync by :func:`sync_weights`."""
    if config.rollout_engine == "hf":
        return HFEngine(model, tokenizer, batch_size=config.generation_batch_size)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: weight updates
    # under accelerate launch every rank runs its own engine on its own GPU, inside the launcher's process group
    launched = {"distributed_executor_backend": "external_launcher"} if run_world_size() > 1 else {}
    return VLLMEngine(config.model, chat_template=config.chat_template, rollout=True, timeout_s=config.vllm_timeout_s,
                      gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                      enable_sleep_mode=config.vllm_sleep, seed=config.seed, dtype="bfloat16", **launched)


def train_rl(config: RLConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Run online RL; returns the final policy's directory (``out/model``).

    ``on_step_end(step, info)`` gets ``info = {"samples": the first rollout round's [Sample, ...],
    "trained_samples": those of the groups trained on (after dynamic sampling), "trained_tokens": tokens in the loss,
    "tokens": generated + trained, "rollout_metrics": {...}}`` after every step (tests and benchmarks hook in here).
    """
    if not config.model:
        raise ValueError("posttrain rl needs --model: the policy to start from (an SFT model directory)")
    config = resolve(_default_world_paths(config))
    algo = Algo(config.algo)
    device = resolve_device(config.device)
    run = Run(config, "rl", on_step_end=on_step_end, global_batch=("batch_size", config.batch_size))
    if run.complete:
        return run.final_dir

    from posttrain.rewards import reward_from_spec

    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    rows = load_prompt_rows(config.data, columns=config.columns or None, skip_invalid=config.skip_invalid)
    eval_rows = load_prompt_rows(config.eval_data, columns=config.columns or None, skip_invalid=config.skip_invalid,
                                 limit=config.eval_prompts) if config.eval_data else []
    prompt_ids = [render_prompt(tokenizer, messages) for messages, _ in rows]
    reward = reward_from_spec(config.reward, device=str(device))

    process_reward = None
    if config.step_reward:
        process_reward = reward_from_spec(config.step_reward, device=str(device))
        if not hasattr(process_reward, "step_rewards"):
            raise ValueError(f"--step_reward={config.step_reward!r} is not a process reward model (prm:DIR)")

    model = load_causal_lm(config.model, device=device, quantization=quantization_config(config))
    prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing, compile=config.compile)
    model = lora_from_config(model, config, config.model)  # LoRA adapters (peft) when --lora_r > 0
    optimizer, scheduler = optimizer_and_scheduler(model, config, config.max_steps * config.ppo_epochs
                                                   * config.num_minibatches)
    modules, optimizers, schedulers = {"model": model}, {"model": optimizer}, {"model": scheduler}
    kl_control = AdaptiveKL(config.beta, config.target_kl, config.kl_horizon)
    schedulers["kl"] = kl_control
    reference, reference_off = None, torch.no_grad  # reference_off: the context its log-probs are computed under
    if config.beta > 0 or config.target_kl > 0 or config.track_kl:  # no reference model when beta = 0
        if config.lora_r and not config.ref_model:  # the policy with its adapters disabled: no second copy
            reference, reference_off = model, reference_context(model)
        else:
            reference = load_causal_lm(config.ref_model or config.model, device=device).eval().requires_grad_(False)
            use_segment_attention(reference)  # shared-prompt rows
    critic = critic_optimizer = critic_scheduler = None
    if algo == Algo.ppo:
        critic = load_value_model(config.value_model or config.model, tokenizer=tokenizer, device=device,
                                  quantization=quantization_config(config))
        prepare_for_training(critic, gradient_checkpointing=config.gradient_checkpointing,
                             compile=config.compile)
        critic = lora_from_config(critic, config, config.value_model or config.model)
        critic_optimizer = build_optimizer(critic, config.value_lr, config.weight_decay)
        critic_scheduler = build_scheduler(critic_optimizer, warmup_steps=config.warmup_steps,
                                           total_steps=config.max_steps * config.ppo_epochs * config.num_minibatches,
                                           schedule=config.lr_schedule)
        modules["critic"], optimizers["critic"], schedulers["critic"] = critic, critic_optimizer, critic_scheduler
    # pi_old by the trainer's own forward, at the training precision (verl's recomputed old_log_prob; the sampler's
    # fp32 KV-cache log-probs differ from a bf16 forward by ~1e-2, beyond GSPO's 3e-4 clip), whenever the first
    # update is not the first use: several passes, or a KL to place in the reward first. One on-policy pass takes
    # pi_old = the current log-probs, detached (TRL's num_iterations = 1). The sampler's log-probs give the mismatch.
    recompute_old = (config.ppo_epochs > 1 or config.num_minibatches > 1 or reference is not None
                     or config.tis_cap > 0)  # TIS weighs the trainer's pi_old against the sampler's
    # Several processes (accelerate launch): each rank rolls out its share of the step's prompts, whole groups, so
    # group baselines are computed where the group lives; gradients are reduced by DDP / FSDP (plumbing/distributed)
    procs = run.procs
    if procs.kind == "fsdp":  # generation makes an uneven number of forwards per rank; FSDP's gathers need them even
        raise ConfigError("posttrain rl runs data-parallel with DDP (accelerate launch --multi_gpu), not FSDP: the "
                          "rollouts' generation runs a different number of forwards on each rank")
    forward, optimizers["model"] = procs.prepare(model, optimizer)
    optimizer = optimizers["model"]
    critic_forward = None
    if critic is not None:  # the LM head of the value model's backbone gets no gradient
        critic_forward, optimizers["critic"] = procs.prepare(critic, critic_optimizer, unused_parameters=True)
        critic_optimizer = optimizers["critic"]
    run.start(config.max_steps, modules=modules, optimizers=optimizers, schedulers=schedulers, tokenizer=tokenizer)
    engine = rollout_engine(config, model, tokenizer, device)
    prompt_order = batch_indices(len(rows), config.batch_size, config.seed, shuffle=config.shuffle,
                                 start_batch=run.start_step)
    clip_low = None if config.clip_low < 0 else config.clip_low
    aggregation = Reduction(config.loss_aggregation)

    def rollout_seed(step: int, refill: int) -> int:
        """The sampling seed of rollout round ``refill`` of ``step``: distinct for every (seed, step, round, rank)."""
        seed = (config.seed * 1_000_003 + step) * (MAX_REFILLS + 1) + refill
        return seed if procs.world == 1 else seed * procs.world + procs.rank

    def rollout(indices: list[int], seed: int) -> list[list[Sample]]:
        """``group_size`` scored samples for each prompt of ``indices`` (steps 1 and 2 of the module docstring)."""
        params = SamplingParams(n=config.group_size, max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, top_p=config.top_p, seed=seed, logprobs=True,
                                scaled_logprobs=True)
        with procs.gathered(forward):
            completions = engine.generate([rows[i][0] for i in indices], params)
        flat_prompts = [rows[i][0] for i in indices for _ in range(config.group_size)]
        columns = reward_columns([rows[i][1] for i in indices for _ in range(config.group_size)])
        texts = [c.text for group in completions for c in group]
        scores = reward(flat_prompts, texts, **columns)
        step_scores: list = [None] * len(texts)
        if process_reward is not None:  # dense: the PRM's P(correct) at the end of every step
            located = [step_end_tokens(tokenizer, c.content_ids, config.step_split)
                       for group in completions for c in group]
            scored = process_reward.step_rewards(flat_prompts, texts, [steps for steps, _ in located])
            step_scores = [None if sc is None else (sc, ends) for sc, (_, ends) in zip(scored, located)]
        groups, k = [], 0
        for g, (i, group) in enumerate(zip(indices, completions)):
            samples = []
            for c in group:
                score = math.nan if scores[k] is None else float(scores[k])
                truncated = c.finish_reason != "stop"
                shaped = score
                if config.overlong == "shape" and not math.isnan(score):
                    shaped += overlong_penalty(len(c.token_ids), truncated, config.max_new_tokens,
                                               config.overlong_buffer, config.overlong_penalty)
                samples.append(Sample(g, prompt_ids[i], list(c.token_ids), list(c.logprobs), c.text, truncated,
                                      shaped, trained=not math.isnan(score)
                                      and not (truncated and config.overlong == "mask"), score=score))
                if step_scores[k] is not None:
                    samples[-1].extra["steps"] = step_scores[k]  # ([P(correct) per step], [its last token])
                k += 1
            groups.append(samples)
        return groups

    @torch.no_grad()
    def reference_and_values(samples: list[Sample], sums: dict[str, float]) -> None:
        """Step 3: the policy's (when ``recompute_old``), the reference's log-probs and the critic's values of every
        sampled token (no gradient), at the training precision."""
        for chunk in micro_batches(list(range(len(samples))), config.grad_accum):
            batch, ordered = shared_prompt_batch([samples[i] for i in chunk])
            if recompute_old:
                with autocast(device, config.precision):
                    flat = token_logps(model, batch, temperature=config.temperature)
                for s, values in zip(ordered, split_tokens(flat, ordered)):
                    s.old_logps = values.cpu()
                    sums["mismatch"] += float((s.old_logps - torch.tensor(s.sampler_logps)).abs().sum())
                    sums["mismatch_tokens"] += len(s.token_ids)
            if reference is not None:
                with autocast(device, config.precision), reference_off():
                    flat = token_logps(reference, batch, temperature=config.temperature)
                for s, values in zip(ordered, split_tokens(flat, ordered)):
                    s.ref_logps = values.cpu()
            if critic is not None:
                critic.eval()
                with autocast(device, config.precision):
                    flat = token_values(critic, batch)
                critic.train()
                for s, values in zip(ordered, split_tokens(flat.float(), ordered)):
                    s.values = values.cpu()

    def assign_advantages(groups: list[list[Sample]]) -> dict[str, float]:
        """Step 4: the KL placement and the advantages; returns the KL metrics."""
        samples = [s for group in groups for s in group]
        beta = kl_control.beta
        kl_sums = []
        for s in samples:
            old = s.old_logps if s.old_logps is not None else torch.tensor(s.sampler_logps)
            if s.ref_logps is not None:
                s.kl = kl_penalty(old, s.ref_logps, config.kl_estimator)
                kl_sums.append(float(kl_penalty(old, s.ref_logps, KLEstimator.k1).sum()))
        kl_in_reward = config.kl_in == "reward" and reference is not None
        if algo == Algo.ppo:
            for s in samples:
                s.extra["token_rewards"] = token_rewards(s.reward, s.kl if kl_in_reward else None, beta,
                                                         len(s.token_ids))
                if "steps" in s.extra:  # the change in P(correct) at each step's last token (they sum to the last)
                    scores, ends = s.extra["steps"]
                    changes = torch.diff(torch.tensor(scores), prepend=torch.zeros(1))
                    s.extra["token_rewards"].index_add_(0, torch.tensor(ends), config.step_reward_weight * changes)
            trained = [s for s in samples if s.trained]
            if trained:
                rewards_bt = padded([s.extra["token_rewards"] for s in trained])
                values_bt = padded([s.values for s in trained])
                mask = padded([torch.ones(len(s.token_ids)) for s in trained])
                advantages, returns = adv.gae(rewards_bt, values_bt, mask, gamma=config.gamma, lam=config.lam)
            if config.whiten_advantages and procs.world > 1:  # over every rank's tokens: every rank reduces
                values = advantages[mask.bool()].double() if trained else torch.zeros(0, dtype=torch.float64)
                total, squares, count = procs.sum(float(values.sum()), float((values ** 2).sum()),
                                                  float(values.numel()))
                if trained:
                    mean = total / count
                    std = ((squares - count * mean ** 2) / (count - 1)) ** 0.5 if count > 1 else 1.0
                    advantages = torch.where(mask.bool(), (advantages - mean) / (std + 1e-8), advantages)
            elif config.whiten_advantages and trained:
                on = mask.bool()
                mean, std = advantages[on].mean(), advantages[on].std() if int(on.sum()) > 1 else 1.0
                advantages = torch.where(on, (advantages - mean) / (std + 1e-8), advantages)
            if trained:
                for row, s in enumerate(trained):
                    s.advantages = advantages[row, : len(s.token_ids)]
                    s.returns = returns[row, : len(s.token_ids)]
        elif groups or procs.world > 1:
            sequence_rewards = []
            for group in groups:
                row = []
                for s in group:
                    penalty = beta * float(s.kl.sum()) if kl_in_reward else 0.0
                    row.append(s.reward - penalty if s.trained else math.nan)
                sequence_rewards.append(row)
            if procs.world > 1:  # batch-wide baselines (reinforce, --scale_rewards=batch) see every rank's groups
                parts = procs.gather(sequence_rewards)
                everyone = [row for part in parts for row in part]
                first = sum(len(part) for part in parts[: procs.rank])
                table = group_advantages(torch.tensor(everyone, dtype=torch.float64), algo, config.scale_rewards)[
                    first : first + len(groups)] if everyone else []
            else:
                table = group_advantages(torch.tensor(sequence_rewards, dtype=torch.float64), algo,
                                         config.scale_rewards)
            for group, values in zip(groups, table):
                for s, a in zip(group, values):
                    s.advantages = torch.full((len(s.token_ids),), float(a))
                dense = [s for s in group if s.trained and "steps" in s.extra]
                if process_reward is not None and dense:
                    process = adv.process_advantages([torch.tensor(s.extra["steps"][0]) for s in dense],
                                                     [torch.tensor(s.extra["steps"][1]) for s in dense],
                                                     [len(s.token_ids) for s in dense])
                    for s, a in zip(dense, process):
                        s.advantages = s.advantages + config.step_reward_weight * a
        kl_total, kl_count = procs.sum(sum(kl_sums), float(len(kl_sums)))  # over every rank's samples
        mean_kl = kl_total / kl_count if kl_count else 0.0
        return {"policy/kl": mean_kl, "policy/beta": beta}

    def update(minibatch: list[Sample], sums: dict[str, float], filler: Sample) -> None:
        """Step 5 for one minibatch (this rank's part of it): its micro-batches' losses share the minibatch's
        denominators, counted over every rank. Every rank takes part in every update (the gradient reduction is
        collective): one with nothing to train on runs ``filler`` through a zero loss (its gradients are zeros)."""
        trained = [s for s in minibatch if s.trained]
        tokens, sequences = procs.sum(float(sum(len(s.token_ids) for s in trained)), float(len(trained)))
        if not sequences:
            return
        normalizer = {Reduction.token_mean: tokens, Reduction.sequence_mean: sequences,
                      Reduction.fixed_length: sequences * config.max_new_tokens}[aggregation]
        weight = 1.0 if trained else 0.0
        trained = trained or [filler.filler()]
        update_loss = value_total = 0.0  # this update's, summed over its micro-batches (a non-finite one skips it)
        chunks = micro_batches(list(range(len(trained))), config.grad_accum)
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1  # the update's gradients are reduced over the ranks with its last chunk
            with procs.accumulating(forward, last), procs.accumulating(critic_forward, last):
                batch, ordered = shared_prompt_batch([trained[i] for i in chunk])
                with autocast(device, config.precision):
                    logits, targets = forward(trained_token_logits, batch)
                if not weight:  # the filler: a zero gradient through every parameter the forward used, nothing else
                    procs.backward(logits.float().sum() * 0.0)
                    if critic is not None:
                        with autocast(device, config.precision):
                            procs.backward(critic_forward(token_values, batch).sum() * 0.0)
                    continue
                logps = padded(split_tokens(logps_of(logits, targets, config.temperature), ordered))  # (B, T)
                mask = padded([torch.ones(len(s.token_ids)) for s in ordered]).to(logps.device)
                if recompute_old:
                    old = padded([s.old_logps for s in ordered]).to(logps.device)
                else:  # one on-policy pass: pi_old is the policy as it is now, at this very forward's precision
                    old = logps.detach()
                    sampled = padded([torch.tensor(s.sampler_logps) for s in ordered]).to(logps.device)
                    sums["mismatch"] += float(((old - sampled).abs() * mask).sum())
                    sums["mismatch_tokens"] += float(mask.sum())
                advantages = padded([s.advantages.float() for s in ordered]).to(logps.device)
                if algo == Algo.gspo:
                    per_token, metrics = gspo_surrogate(logps, old, advantages[:, 0], mask, clip_low=config.clip_low,
                                                        clip_high=config.clip_high)
                    clipfrac = float((metrics["clipfrac"] * mask.sum(-1)).sum())  # a clipped sequence clips its tokens
                elif algo == Algo.cispo:
                    per_token, metrics = cispo_surrogate(logps, old, advantages, clip_high=config.clip_high,
                                                         clip_low=clip_low)
                    clipfrac = float((metrics["clipfrac"] * mask).sum())
                else:
                    per_token, metrics = clipped_surrogate(logps, old, advantages, clip_low=config.clip_low,
                                                           clip_high=config.clip_high)
                    clipfrac = float((metrics["clipfrac"] * mask).sum())
                if config.tis_cap > 0:  # the sampler is not the learner: loss x min(pi_old / pi_sampler, cap)
                    sampled = padded([torch.tensor(s.sampler_logps) for s in ordered]).to(logps.device)
                    weights = truncated_is_weights(old, sampled, config.tis_cap)
                    per_token = per_token * weights
                    sums["tis_weight"] += float((weights * mask).sum())
                    sums["tis_capped"] += float(((weights >= config.tis_cap) * mask).sum())
                if config.kl_in == "loss" and reference is not None and kl_control.beta > 0:
                    ref = padded([s.ref_logps for s in ordered]).to(logps.device)
                    per_token = per_token + kl_control.beta * kl_penalty(logps, ref, config.kl_estimator)
                loss = reduce_per_token(per_token, mask, aggregation, normalizer=normalizer)
                procs.backward(loss)
                with torch.no_grad():
                    sums["entropy"] += sum(float(token_entropy(part, config.temperature).sum())
                                           for part in logits.detach().split(ENTROPY_CHUNK))
                    update_loss += float(loss)
                    sums["clipfrac"] += clipfrac
                    sums["approx_kl"] += float((kl_penalty(old, logps, KLEstimator.k3) * mask).sum())
                    sums["ratio_max"] = max(sums["ratio_max"], float(((logps - old).exp() * mask).max()))
                    sums["tokens"] += float(mask.sum())
                if critic is not None:
                    with autocast(device, config.precision):
                        values = padded(split_tokens(critic_forward(token_values, batch), ordered))
                    old_values = padded([s.values for s in ordered]).to(values.device)
                    returns = padded([s.returns for s in ordered]).to(values.device)
                    value_loss = reduce_per_token(
                        clipped_value_loss(values, old_values, returns, clip=config.value_clip or None), mask,
                        Reduction.token_mean, normalizer=tokens)
                    procs.backward(value_loss)
                    value_total += float(value_loss.detach())
        update_loss, value_total = procs.sum(update_loss, value_total)  # each rank's share of the update's mean
        # A non-finite update is skipped by optimizer_step (its norm comes back non-finite): counted, not averaged.
        grad_norm, sums["lr"] = optimizer_step(model, optimizer, scheduler, config.max_grad_norm, loss=update_loss)
        if math.isfinite(grad_norm):
            sums["grad_norm"] += grad_norm
            sums["loss"] += update_loss
            sums["updates"] += 1
        else:
            sums["skipped_updates"] += 1
        if critic is not None:
            value_norm, _ = optimizer_step(critic, critic_optimizer, critic_scheduler, config.max_grad_norm,
                                           loss=value_total)
            if math.isfinite(value_norm):
                sums["value_loss"] += value_total
                sums["value_updates"] += 1
            else:
                sums["value_skipped_updates"] += 1

    def evaluate() -> dict[str, float]:
        """Greedy replies to the held-out prompts: mean reward (and the tiny world's gold metrics); each rank
        answers every world-th prompt."""
        if not eval_rows:
            return {}
        mine = eval_rows[procs.rank :: procs.world]
        prompts = [messages for messages, _ in mine]
        if config.rollout_engine == "vllm":  # the policy as trained so far, also after this step's updates
            if config.vllm_sleep:
                engine.wake_up()
            sync_weights(engine, model)
        replies = [c[0] for c in engine.generate(prompts, SamplingParams(n=1, max_new_tokens=config.max_new_tokens,
                                                                         temperature=0.0))]
        if config.rollout_engine == "vllm" and config.vllm_sleep:
            engine.sleep()
        columns = reward_columns([extra for _, extra in mine])
        texts = [c.text for c in replies]
        scored = reward(prompts, texts, **columns)
        if procs.world > 1:
            parts = procs.gather((prompts, texts, scored))
            prompts, texts, scored = ([v for part in parts for v in part[i]] for i in range(3))
        scores = [s for s in scored if s is not None]
        metrics = {"eval/reward": sum(scores) / len(scores) if scores else math.nan}
        world = _world_rollout_metrics(prompts, texts)
        metrics.update({k.replace("rollout/", "eval/"): v for k, v in world.items()})
        return metrics

    with run:
        for step in run.steps():
            started = time.perf_counter()
            sync_seconds = 0.0
            if config.rollout_engine == "vllm":  # the engine samples from the policy as it is now (also on resume)
                if config.vllm_sleep:
                    engine.wake_up()
                sync_weights(engine, model)
                sync_seconds = time.perf_counter() - started
            indices = procs.shard(next(prompt_order))  # this rank's prompts of the step's batch
            groups = rollout(indices, seed=rollout_seed(step, 0))
            generated = sum(len(s.token_ids) for g in groups for s in g)
            dropped = sum(1 for g in groups for s in g if math.isnan(s.reward))
            rollout_rewards = [s.reward for g in groups for s in g if not math.isnan(s.reward)]
            rollout_samples = [s for g in groups for s in g]
            filtered = 0
            if config.dynamic_sampling:  # DAPO: keep groups whose rewards differ; refill from fresh prompts
                def informative(group: list[Sample]) -> bool:  # on the reward before shaping, as verl's DAPO
                    return len({s.score for s in group if s.trained}) > 1

                generator = torch.Generator().manual_seed(rollout_seed(step, 0) if procs.world > 1
                                                          else config.seed * 1_000_003 + step)
                kept = [g for g in groups if informative(g)]
                filtered = len(groups) - len(kept)
                for refill in range(1, config.max_refills + 1):
                    if len(kept) >= len(indices):  # each rank fills its share of the batch
                        break
                    extra = torch.randint(len(rows), (len(indices),), generator=generator).tolist()
                    more = rollout(extra, seed=rollout_seed(step, refill))
                    generated += sum(len(s.token_ids) for g in more for s in g)
                    kept += [g for g in more if informative(g)]
                groups = kept[: len(indices)]
                for g, group in enumerate(groups):
                    for s in group:
                        s.group = g
            if config.rollout_engine == "vllm" and config.vllm_sleep:  # the trainer gets the GPU memory back
                engine.sleep()
            generation_seconds = time.perf_counter() - started
            samples = [s for g in groups for s in g]
            sums = dict.fromkeys(("loss", "clipfrac", "approx_kl", "entropy", "tokens", "value_loss", "grad_norm",
                                  "updates", "skipped_updates", "value_updates", "value_skipped_updates",
                                  "ratio_max", "lr", "mismatch", "mismatch_tokens", "tis_weight", "tis_capped"), 0.0)
            if samples:
                reference_and_values(samples, sums)
            kl_metrics = assign_advantages(groups)

            training_started = time.perf_counter()
            shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 7919)
            for epoch in range(config.ppo_epochs):
                order = torch.randperm(len(groups), generator=shuffle).tolist() if config.ppo_epochs > 1 else \
                    list(range(len(groups)))
                parts = micro_batches(order, config.num_minibatches) if order else []
                # as many updates on every rank (each is a collective gradient reduction), some maybe empty here
                for part in parts + [[]] * (config.num_minibatches - len(parts)):
                    update([s for g in part for s in groups[g]], sums, filler=rollout_samples[0])
            training_seconds = time.perf_counter() - training_started

            # Every metric is over all ranks' samples: sums reduced, the rollouts' small lists gathered.
            for key in ("clipfrac", "approx_kl", "entropy", "tokens", "mismatch", "mismatch_tokens", "tis_weight",
                        "tis_capped"):
                sums[key] = procs.sum(sums[key])
            sums["ratio_max"] = procs.max(sums["ratio_max"])
            stats = {"rewards": rollout_rewards, "lengths": [len(s.token_ids) for s in rollout_samples],
                       "truncated": [s.truncated for s in rollout_samples], "texts": [s.text for s in rollout_samples],
                       "prompts": [rows[i][0] for i in indices for _ in range(config.group_size)],
                       "counts": [dropped, len(groups), filtered, generated, len(samples)]}
            if procs.world > 1:
                parts = procs.gather(stats)
                stats = {k: [v for part in parts for v in part[k]] for k in stats if k != "counts"}
                stats["counts"] = [sum(part["counts"][i] for part in parts) for i in range(5)]
            rollout_rewards, lengths = stats["rewards"], stats["lengths"]
            dropped, trained_groups, filtered, generated, trained_samples = stats["counts"]
            kl_control.update(kl_metrics["policy/kl"], trained_samples)
            mean_reward = sum(rollout_rewards) / len(rollout_rewards) if rollout_rewards else math.nan
            spread = sum((r - mean_reward) ** 2 for r in rollout_rewards)
            std_reward = (spread / max(len(rollout_rewards) - 1, 1)) ** 0.5
            n_tokens = max(sums["tokens"], 1.0)
            metrics = {
                "rollout/reward_mean": mean_reward, "rollout/reward_std": std_reward,
                "rollout/mean_length": sum(lengths) / len(lengths),
                "rollout/truncated_rate": sum(stats["truncated"]) / len(lengths),
                "rollout/dropped": dropped,
                "rollout/groups_trained": trained_groups, "rollout/groups_filtered": filtered,
                "rollout/generation_tokens_per_s": generated / max(generation_seconds - sync_seconds, 1e-9),
                **_world_rollout_metrics(stats["prompts"], stats["texts"]),
                **kl_metrics,
                "policy/clipfrac": sums["clipfrac"] / n_tokens, "policy/approx_kl": sums["approx_kl"] / n_tokens,
                "policy/entropy": sums["entropy"] / n_tokens, "policy/ratio_max": sums["ratio_max"],
                "rollout/logprob_mismatch": sums["mismatch"] / max(sums["mismatch_tokens"], 1.0),
                # every update of the step skipped: nan, a bad step for the harness; no update at all: 0
                "train/loss": _applied_mean(sums["loss"], sums["updates"], sums["skipped_updates"]),
                "train/grad_norm": _applied_mean(sums["grad_norm"], sums["updates"], sums["skipped_updates"]),
                "train/skipped_updates": sums["skipped_updates"], "train/lr": sums["lr"],
                "train/training_tokens_per_s": sums["tokens"] / max(training_seconds, 1e-9),
            }
            if config.rollout_engine == "vllm":
                metrics["rollout/weight_sync_s"] = sync_seconds
            if config.tis_cap > 0:
                metrics["rollout/tis_weight_mean"] = sums["tis_weight"] / n_tokens
                metrics["rollout/tis_capped_frac"] = sums["tis_capped"] / n_tokens
            if critic is not None:
                values = torch.cat([s.values for s in samples if s.trained and s.returns is not None] or
                                   [torch.zeros(1)])
                returns = torch.cat([s.returns for s in samples if s.trained and s.returns is not None] or
                                    [torch.zeros(1)])
                if procs.world > 1:  # 1 - Var(returns - values) / Var(returns), over every rank's tokens
                    r, d = returns.double(), (returns - values).double()
                    n, r1, r2, d1, d2 = procs.sum(float(r.numel()), float(r.sum()), float((r ** 2).sum()),
                                                  float(d.sum()), float((d ** 2).sum()))
                    variance = (r2 - r1 * r1 / n) / (n - 1) if n > 1 else 0.0
                    residual = (d2 - d1 * d1 / n) / (n - 1) if n > 1 else 0.0
                else:
                    variance = float(returns.var()) if returns.numel() > 1 else 0.0
                    residual = float((returns - values).var()) if variance > 0 else 0.0
                metrics["value/loss"] = _applied_mean(sums["value_loss"], sums["value_updates"],
                                                      sums["value_skipped_updates"])
                metrics["value/skipped_updates"] = sums["value_skipped_updates"]
                metrics["value/explained_variance"] = 1.0 - residual / variance if variance > 0 else math.nan
            if eval_rows and run.eval_due(step):
                run.log_metrics(step, evaluate())
            run.end_step(step, metrics, tokens=generated + int(sums["tokens"]), samples=rollout_samples,
                         trained_samples=samples, trained_tokens=int(sums["tokens"]), rollout_metrics=metrics)

    final = evaluate()
    if final:
        run.log_metrics(run.step, final)
    model_dir = run.finish({"algo": algo.value, "eval": final})
    if reference is not None:  # the rollouts' rewards against the KL to the reference: over-optimization shows here
        plot_against(run.dir, "policy/kl", ["rollout/reward_mean", "rollout/gold_reward"], "reward_vs_kl")
    return model_dir
