"""Reward-model losses (RLHF book, reward-modeling chapter). Rewards are scalar scores r(x, y). Imports only torch.

Every loss returns ``(loss, metrics)``: a scalar tensor to back-propagate and a dict of detached scalar tensors.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

from posttrain.maths.reduction import IGNORE_INDEX, Reduction, reduce_per_token, token_nll


class RMLoss(StrEnum):
    """The reward-model losses of ``posttrain rm``."""

    bt = "bt"  # Bradley-Terry on pairs
    margin = "margin"  # Bradley-Terry with a margin (Llama 2)
    kcomparisons = "kcomparisons"  # every pair of a K-wise ranking (InstructGPT)
    plackett_luce = "plackett_luce"  # K-wise ranking likelihood (Starling)
    orm = "orm"  # outcome RM: per-token BCE of correctness
    prm = "prm"  # process RM: 3-class CE at each step's end

    @property
    def is_scalar(self) -> bool:
        """One score per sequence (the BT family), rather than per token (orm, prm)."""
        return self not in (RMLoss.orm, RMLoss.prm)


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "accuracy": (chosen > rejected).float().mean(),
        "margin": (chosen - rejected).mean(),
        "chosen_mean": chosen.mean(),
        "rejected_mean": rejected.mean(),
    }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss, -log sigma(r_c - r_r - m), averaged over the batch of pairs.

    chosen_rewards, rejected_rewards: (B,). ``margin`` (B,) is Llama 2's margin m (None = 0): the model must
    separate pairs rated far apart by more than pairs rated close.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    loss = -F.logsigmoid(difference).mean()
    return loss, {"loss": loss.detach(), **_pair_metrics(chosen_rewards, rejected_rewards)}


def plackett_luce_loss(scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plackett-Luce negative log-likelihood of a full ranking, averaged over the batch (Starling's K-wise RM).

    scores: (B, K), ordered best-first. P(ranking) = prod_k exp(s_k) / sum_{j>=k} exp(s_j), so
    loss = -sum_{k<K-1} [s_k - logsumexp(s_k, ..., s_{K-1})]. For K = 2 this is -log sigma(s_0 - s_1), i.e. BT.
    """
    # logsumexp over each suffix s_k..s_{K-1}: flip, cumulative logsumexp, flip back.  (B, K)
    suffix_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    per_ranking = -(scores - suffix_lse)[:, :-1].sum(-1)  # the last term is log 1 = 0
    loss = per_ranking.mean()
    return loss, {"loss": loss.detach(), **_pair_metrics(scores[:, 0], scores[:, -1]),
                  "ranking_accuracy": (scores.detach()[:, :-1] > scores.detach()[:, 1:]).all(-1).float().mean()}


def kcomparisons_loss(scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's K-wise loss: the mean over all C(K, 2) pairs (i better than j, i < j) of -log sigma(s_i - s_j),
    averaged over the batch. scores: (B, K), best-first; each completion is scored once and reused in every pair."""
    k = scores.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=scores.device)  # all pairs i < j
    differences = scores[:, i] - scores[:, j]  # (B, C(K,2))
    loss = -F.logsigmoid(differences).mean()
    return loss, {"loss": loss.detach(), "accuracy": (differences.detach() > 0).float().mean(),
                  "margin": differences.detach().mean(), "chosen_mean": scores.detach()[:, 0].mean(),
                  "rejected_mean": scores.detach()[:, -1].mean()}


def orm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outcome RM: binary cross-entropy of per-token logits against the 0/1 correctness label of the completion,
    broadcast to every completion token (prompt and padding = -100, ignored); mean over the labelled tokens.

    logits: (B, T) (or (B, T, 1)); labels: (B, T) in {0, 1, -100}.
    """
    logits = logits.reshape(labels.shape)
    valid = labels != IGNORE_INDEX
    targets = labels.clamp(min=0).to(logits.dtype)
    per_token = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = reduce_per_token(per_token, valid, Reduction.token_mean)
    predictions = (logits.detach() > 0).long()
    accuracy = ((predictions == labels) & valid).sum() / valid.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "token_accuracy": accuracy.float()}


def prm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Process RM: 3-way cross-entropy (0 incorrect, 1 neutral, 2 correct) at step-boundary tokens only
    (every other position is -100); mean over the labelled steps.

    logits: (B, T, 3); labels: (B, T) in {0, 1, 2, -100}.
    """
    valid = labels != IGNORE_INDEX
    per_token = token_nll(logits, labels)  # 0 where ignored
    loss = reduce_per_token(per_token, valid, Reduction.token_mean)
    accuracy = ((logits.detach().argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "step_accuracy": accuracy.float()}
