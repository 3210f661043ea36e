"""Advantages for policy-gradient RL. Imports only torch.

Group baselines take rewards shaped (num_prompts, G): row p holds the rewards of the G completions sampled for
prompt p. A missing reward (a reward function that returned None, stored as NaN) drops that completion: it gets
advantage 0 (the caller also masks it out of the loss and counts it), and the baseline of its group is computed
from the others alone, so one unscorable completion never poisons its group. A group with fewer than two scored
completions has no baseline and gives 0 everywhere.

GAE takes per-token tensors (B, T) for value-based PPO.
"""

from __future__ import annotations

import torch

GRPO_STD_EPS = 1e-4
"""Added to the group's standard deviation before dividing (TRL's GRPOTrainer uses 1e-4 too): a group of equal rewards
gives exactly 0, not 0/0."""


def _scored(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards minus their group's largest scored reward, NaN set to 0; mask of scored entries; scored count per
    group (P, 1)). The shift changes no advantage but makes a group of equal rewards exactly 0 (without it,
    (0.7 + 0.7 + 0.7 + 0.7) / 4 - 0.7 is 1.1e-16)."""
    scored = ~torch.isnan(rewards)
    top = torch.where(scored, rewards, torch.full_like(rewards, -torch.inf)).amax(-1, keepdim=True)
    shifted = rewards - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.where(scored, shifted, torch.zeros_like(rewards)), scored, scored.sum(-1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j.

    rewards (P, G) with NaN for a missing reward -> advantages (P, G). Equal to G/(G-1) * (r_i - mean_j r_j), the
    Dr. GRPO advantage scaled up (with G the number of scored completions of the group).
    """
    r, scored, n = _scored(rewards)
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return torch.where(scored & (n > 1), r - others, torch.zeros_like(r))


def grpo(rewards: torch.Tensor, normalize_std: bool = True, eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): (r_i - mean) / (std + eps) over each group's scored
    completions, std the sample (n - 1) standard deviation as ``torch.std`` and TRL compute it.

    ``normalize_std=False`` is Dr. GRPO's advantage (Liu et al. 2025), r_i - mean: dividing by the std weights
    groups that are nearly all right or all wrong up, a difficulty bias. rewards (P, G), NaN = missing -> (P, G).
    """
    r, scored, n = _scored(rewards)
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(scored, r - mean, torch.zeros_like(r))
    if normalize_std:
        std = (centred.pow(2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return torch.where(n > 1, centred, torch.zeros_like(centred))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's response tokens.

    rewards, values, mask: (B, T); mask is 1 on the response tokens (one contiguous span per row, padding on either
    side). The episode ends at the last response token: the value after it is 0. With
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns), both
    (B, T) and 0 outside the mask; returns = advantages + values (the value head's regression target).
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]  # 0 on padding: the next real token starts afresh
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def process_advantages(step_scores: list[torch.Tensor], step_ends: list[torch.Tensor],
                       lengths: list[int]) -> list[torch.Tensor]:
    """GRPO with process supervision (Shao et al. 2024, DeepSeekMath §4.1.3) for ONE group of completions.

    Completion i has steps scored ``step_scores[i]`` (S_i,) (e.g. a PRM's P(correct)) ending at the token indices
    ``step_ends[i]`` (S_i,) of its ``lengths[i]`` tokens. Every step score of the group is normalised with the
    group's mean and std over all its steps, r~ = (r - mean) / (std + eps); token t's advantage is the sum of r~ over
    the steps of its completion that end at or after t (tokens after the last step get 0). Returns (L_i,) per
    completion. A group with fewer than two step scores gives zeros.
    """
    dtype = step_scores[0].dtype if step_scores else torch.float32
    flat = torch.cat(step_scores) if step_scores else torch.zeros(0)
    out = [torch.zeros(length, dtype=dtype) for length in lengths]
    if flat.numel() < 2:
        return out
    mean, std = flat.mean(), flat.std()
    for advantages, scores, ends in zip(out, step_scores, step_ends):
        placed = advantages.index_add(0, ends.long(), (scores - mean) / (std + GRPO_STD_EPS))
        advantages.copy_(placed.flip(0).cumsum(0).flip(0))  # suffix sums: the steps ending at or after t
    return out
