"""Direct-alignment losses (RLHF book, direct alignment chapter). Imports only torch.

Inputs are per-sequence log-probabilities: the sum over a completion's tokens of log pi(y_t | x, y_<t), shape (B,).
Length-normalised variants also take token counts (B,). Every loss returns ``(loss, metrics)`` with detached metrics.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

# completion's tokens of log pi(y_t | x, y_<t), shape (B,). Length-normalised variants also take token counts (B,).


class DPOLoss(StrEnum):
    dpo = "dpo"  # Rafailov et al. 2023
    cdpo = "cdpo"  # conservative DPO: labels flipped with probability label_smoothing
    robust = "robust"  # robust DPO (Chowdhury et al. 2024): unbiased under label noise eps
    ipo = "ipo"  # Azar et al. 2023: squared loss on the log-ratio difference
    dpo_nll = "dpo_nll"  # DPO + alpha * length-normalised NLL of the chosen answer (RPO, Pang et al. 2024)
    simpo = "simpo"  # Meng et al. 2024: reference-free, length-normalised, target margin gamma
    orpo = "orpo"  # Hong et al. 2024: reference-free, NLL + alpha * odds-ratio term
    kto = "kto"  # Ethayarajh et al. 2024: unpaired desirable / undesirable examples (see kto_loss)

    @property
    def needs_reference(self) -> bool:
        return self not in (DPOLoss.simpo, DPOLoss.orpo)

    @property
    def length_normalised(self) -> bool:
        return self in (DPOLoss.simpo, DPOLoss.orpo)


DEFAULT_ALPHA = {DPOLoss.dpo_nll: 1.0, DPOLoss.orpo: 0.1}
"""Weight of the extra term when ``alpha`` is not given: RPO's alpha = 1, ORPO's lambda = 0.1."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gamma: float = 0.5,
    alpha: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise direct-alignment losses, averaged over the batch. All tensors (B,).

    With the log-ratios rho_c = log pi(y_c|x) - log pi_ref(y_c|x), rho_r likewise, and h = beta (rho_c - rho_r):

      dpo      -log sigma(h)
      cdpo     -(1 - eps) log sigma(h) - eps log sigma(-h)                      (eps = label_smoothing)
      robust   (-(1 - eps) log sigma(h) + eps log sigma(-h)) / (1 - 2 eps)
      ipo      (rho_c - rho_r - 1 / (2 beta))^2; with lengths given, rho_c / |y_c| - rho_r / |y_r| (the
               per-token form the IPO authors used and TRL implements)
      dpo_nll  -log sigma(h) + alpha * (-log pi(y_c|x) / |y_c|)
      simpo    -log sigma(beta (log pi(y_c|x)/|y_c| - log pi(y_r|x)/|y_r|) - gamma)            (no reference)
      orpo     -log pi(y_c|x)/|y_c| - alpha log sigma(log odds(y_c) - log odds(y_r)),
               odds(y) = p / (1 - p) with p = exp(log pi(y|x) / |y|)                          (no reference)

    Reference-free types ignore (and accept None for) the reference tensors; dpo_nll, simpo and orpo need the
    lengths. Metrics (detached): implicit rewards beta * rho (beta * length-normalised log-prob for the
    reference-free types) as rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, and the policy's
    logps/chosen, logps/rejected (both falling = likelihood displacement).
    """
    kind = DPOLoss(loss_type)
    if kind == DPOLoss.kto:
        raise ValueError("kto is unpaired: use kto_loss(policy_logps, ref_logps, desirable, ...)")
    if kind.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={kind.value} needs the reference log-probs")
    if (kind.length_normalised or kind == DPOLoss.dpo_nll) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={kind.value} needs chosen_lengths and rejected_lengths")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    weight = DEFAULT_ALPHA.get(kind, 0.0) if alpha is None else alpha

    if kind.needs_reference:
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        h = chosen_reward - rejected_reward
    else:
        chosen_avg = policy_chosen_logps / chosen_lengths
        rejected_avg = policy_rejected_logps / rejected_lengths
        chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg

    match kind:
        case DPOLoss.dpo:
            losses = -F.logsigmoid(h)
        case DPOLoss.cdpo:
            losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
        case DPOLoss.robust:
            losses = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
                1 - 2 * label_smoothing)
        case DPOLoss.ipo:
            if chosen_lengths is not None and rejected_lengths is not None:
                chosen_ratio, rejected_ratio = chosen_ratio / chosen_lengths, rejected_ratio / rejected_lengths
            losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
        case DPOLoss.dpo_nll:
            losses = -F.logsigmoid(h) + weight * (-policy_chosen_logps / chosen_lengths)
        case DPOLoss.simpo:
            losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
        case DPOLoss.orpo:
            # log odds(y) = log p - log(1 - p), p = exp(avg log-prob); log1p(-exp(x)) is exact for x < 0
            log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg))
                                                      - torch.log1p(-torch.exp(rejected_avg)))
            losses = -chosen_avg - weight * F.logsigmoid(log_odds)
    loss = losses.mean()
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return loss, {
        "loss": loss.detach(),
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
        "rewards/margin": (chosen_reward - rejected_reward).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on unpaired examples, averaged over the batch. All tensors (B,); ``desirable`` is bool.

    r = log pi(y|x) - log pi_ref(y|x); the reference point z0 = max(0, mean(kl_policy_logps - kl_ref_logps)) is
    the batch estimate of KL(pi || pi_ref) from completions paired with *other* prompts (mismatched pairs), detached;
    ``reference_point`` (a scalar tensor) replaces it when the batch is one micro-batch of a larger step whose z0 was
    computed over the whole step (so gradient accumulation gives the gradient of the whole step).
      desirable:   lambda_D * (1 - sigma(beta (r - z0)))
      undesirable: lambda_U * (1 - sigma(beta (z0 - r)))
    Metrics (detached): kl = z0; rewards/chosen and rewards/rejected = mean beta * r over the desirable and the
    undesirable examples, rewards/margin their difference, logps/chosen and logps/rejected the policy's mean
    log pi(y|x) over each (NaN when the batch has none of that kind).
    """
    if reference_point is None:
        z0 = kto_reference_point(kl_policy_logps, kl_ref_logps)
    else:
        z0 = reference_point.detach()
    ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    loss = losses.mean()
    rewards, logps = beta * ratio.detach(), policy_logps.detach()
    nan = rewards.new_tensor(float("nan"))  # a batch without desirable (or undesirable) examples has no mean

    def mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return values[mask].mean() if mask.any() else nan

    chosen, rejected = mean_over(rewards, desirable), mean_over(rewards, ~desirable)
    return loss, {
        "loss": loss.detach(),
        "kl": z0,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "logps/chosen": mean_over(logps, desirable),
        "logps/rejected": mean_over(logps, ~desirable),
    }


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over mismatched pairs (x, y'), detached."""
    return (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
