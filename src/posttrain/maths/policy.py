"""Policy-gradient losses and KL estimators, per token. Imports only torch.

Every function takes per-token tensors (B, T) of log-probabilities of the *sampled* tokens and returns a per-token
loss (B, T) with detached metrics; ``posttrain.maths.reduction.reduce_per_token`` reduces it over the response mask
(token_mean, sequence_mean or fixed_length, with the whole optimizer step's denominator).

KL estimators (Schulman, "Approximating KL divergence", 2020), for KL(pi || pi_ref) with samples y ~ pi and
log_ratio = log pi(y) - log pi_ref(y) (his r = pi_ref / pi = exp(-log_ratio)):

=====  ==============================  ==========================  =========================================
name   per-token value                 unbiased for the value?     as a loss term, differentiated (no score
                                                                   function): its expected gradient is
=====  ==============================  ==========================  =========================================
k1     log_ratio                       yes (can be negative)       0: E[grad log pi] = 0, so k1 in the loss
                                                                   does nothing on average; in the *reward*
                                                                   (REINFORCE-style, PPO/RLOO) it is the
                                                                   unbiased choice
k2     log_ratio^2 / 2                 no (biased, low variance;   the gradient of KL(pi || pi_ref): the
                                       >= 0)                       right one for a loss term
k3     exp(-log_ratio) - 1 + log_ratio yes, and >= 0 (low          the gradient of KL(pi_ref || pi), the
                                       variance)                   *forward* KL: biased for the reverse
                                                                   KL (GRPO's paper and TRL use k3 in the loss)
=====  ==============================  ==========================  =========================================

(The gradient column: d/dtheta of k2 = log_ratio * grad log pi, whose expectation under pi is grad KL(pi||pi_ref);
d/dtheta of k3 = (1 - pi_ref/pi) grad log pi, whose expectation is -sum pi_ref grad log pi = grad KL(pi_ref||pi).
Tang & Munos, "On a few pitfalls in KL divergence gradient estimation for RL", 2025.)
"""

from __future__ import annotations

from enum import StrEnum

import torch


class KLEstimator(StrEnum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = KLEstimator.k3) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs under the policy and the reference:
    (B, T), (B, T) -> (B, T). See the module docstring for which estimator suits a reward and which a loss."""
    log_ratio = logprobs - ref_logprobs
    match KLEstimator(estimator):
        case KLEstimator.k1:
            return log_ratio
        case KLEstimator.k2:
            return 0.5 * log_ratio.pow(2)
        case KLEstimator.k3:
            # exp(-x) - 1 + x, written with expm1 so that it is exactly 0 at x = 0 and accurate near it
            return torch.expm1(-log_ratio) + log_ratio


def _clip_objective(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                    clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss, -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), and where the
    clipped term was taken and differs (1.0: no gradient flows there; detached). Shapes broadcast."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).detach().to(loss.dtype)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7) per token, as a loss to minimise:
    -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), ratio = pi / pi_old.

    ``clip_high`` (default ``clip_low``) above ``clip_low`` is DAPO's clip-higher (Yu et al. 2025): low-probability
    tokens with A > 0 may rise further before the clip stops them. logprobs, old_logprobs (B, T); advantages (B, T)
    or (B, 1) -> loss (B, T), metrics per token (B, T), detached, for the caller to reduce over the mask:
    ``clipfrac`` (1 where the clipped term was taken and differs: no gradient flows there) and ``approx_kl``
    (ratio - 1 - log ratio, the k3 estimate of KL(pi_old || pi)).
    """
    clip_high = clip_low if clip_high is None else clip_high
    loss, clipfrac = _clip_objective(torch.exp(logprobs - old_logprobs), advantages, clip_low, clip_high)
    with torch.no_grad():
        approx_kl = kl_penalty(old_logprobs, logprobs.detach(), KLEstimator.k3)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def gspo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its tokens' ratios,
    s = exp(mean_t (log pi - log pi_old)) over the mask, clipped as PPO clips (the paper's ranges are ~1e-4).

    Every token of a sequence carries the sequence's clipped surrogate -min(s A, clip(s) A) (0 off the mask), so
    ``reduce_per_token(loss, mask, "sequence_mean")`` is the paper's objective, the mean over sequences.
    advantages (B,) or (B, 1); logprobs, old_logprobs, mask (B, T) -> loss (B, T), metrics ``clipfrac`` per
    sequence (B,).
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).clamp(min=1)
    log_s = ((logprobs - old_logprobs) * mask).sum(-1) / lengths  # (B,)
    per_sequence, clipfrac = _clip_objective(torch.exp(log_s), advantages.reshape(-1), clip_low, clip_high)  # (B,)
    return per_sequence.unsqueeze(-1) * mask, {"clipfrac": clipfrac}


def cispo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                    clip_high: float = 0.28, clip_low: float | None = None) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, detached importance weight, so every token keeps a
    gradient (PPO's clip drops the tokens it clips): -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) A log pi.

    ``clip_low=None``: no lower bound, as in the paper. (B, T) tensors, advantages (B, T) or (B, 1) -> loss
    (B, T), metrics ``clipfrac`` (1 on the tokens whose weight was clipped; (B, T)), detached.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, min=None if clip_low is None else 1.0 - clip_low, max=1.0 + clip_high)
    loss = -weight * advantages * logprobs
    return loss, {"clipfrac": (weight != ratio).to(loss.dtype)}


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for a sampler that is not the learner (Yao et al., "Your efficient RL framework
    secretly brings you off-policy RL training", 2025; verl's token-level rollout IS): per token
    min(pi_old(y) / pi_sampler(y), cap), detached. pi_old is the learner's own probability of the sampled token
    before the update, pi_sampler the rollout engine's (vLLM, another precision); each token's policy loss is
    multiplied by it, so the gradient is the learner's on-policy one up to the truncation, which bounds its variance.
    (B, T) -> (B, T)."""
    if cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip: float | None = 0.2) -> torch.Tensor:
    """PPO's value loss per token: 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = old_V + clip(V - old_V, +-clip)
    (as in OpenAI's baselines and OpenRLHF); ``clip=None``: 0.5 (V - R)^2. (B, T) tensors -> (B, T)."""
    squared = (values - returns).pow(2)
    if clip is None:
        return 0.5 * squared
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum(squared, (clipped - returns).pow(2))
