"""Per-token losses and their reduction. Imports only torch.

One tested reduction with named modes (token-mean, sequence-mean, fixed-length, sum) serves every per-token loss; a
whole-step ``normalizer`` makes gradient accumulation exact (the sum of micro-batch losses equals the loss of
the unsplit step).
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class Reduction(StrEnum):
    token_mean = "token_mean"  # sum over all trained tokens / number of trained tokens (in the whole step)
    sequence_mean = "sequence_mean"  # mean over sequences of each sequence's token mean
    fixed_length = "fixed_length"  # sum over all trained tokens / (sequences x a constant length): Dr. GRPO's
    sum = "sum"  # plain sum (caller normalizes)


def reduce_per_token(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = Reduction.token_mean,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the positions where ``mask`` is true.

    ``normalizer`` overrides the denominator, so that it can be the whole optimizer step's when the step is split
    into micro-batches (or processes): then summing the micro-batch losses gives exactly the loss of the unsplit
    step, and so the same gradient. It is, per mode: ``token_mean`` the number of trained tokens in the step
    (default: in this batch); ``sequence_mean`` the number of sequences in the step (default: B);
    ``fixed_length`` sequences in the step times the constant length, e.g. the generation budget (default: B * T,
    which is constant only if every batch is padded to the same T). Under ``token_mean`` and ``fixed_length`` every
    trained token weighs the same whatever the length of its sequence; under ``sequence_mean`` a token of a short
    sequence weighs more (GRPO's original length bias, Dr. GRPO, Liu et al. 2025).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    match Reduction(mode):
        case Reduction.token_mean:
            return masked.sum() / (mask.sum() if normalizer is None else normalizer)
        case Reduction.sequence_mean:
            per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1)
            return per_sequence.sum() / (per_sequence.numel() if normalizer is None else normalizer)
        case Reduction.fixed_length:
            return masked.sum() / (mask.numel() if normalizer is None else normalizer)
        case Reduction.sum:
            return masked.sum()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood -log p(target) per position: logits (..., V), targets (...) -> (...).

    Computed in float32 at least (bf16 log-softmax loses ~2 digits). Targets equal to -100 give 0.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()
    nll = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(targets.shape)
