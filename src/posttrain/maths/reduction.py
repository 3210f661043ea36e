"""Per-token losses and their reduction. Imports only torch.

One tested reduction with named modes (token-mean, sequence-mean, sum) serves every per-token loss; ``token_mean``
with a whole-step ``normalizer`` makes gradient accumulation exact (the sum of micro-batch losses equals the loss of
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
    sum = "sum"  # plain sum (caller normalizes, e.g. by a fixed length)


def reduce_per_token(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = Reduction.token_mean,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the positions where ``mask`` is true.

    ``normalizer`` overrides the denominator of ``token_mean`` (e.g. the number of trained tokens in the whole
    optimizer step when the step is split into micro-batches: then summing the micro-batch losses gives exactly the
    loss of the unsplit step, and so the same gradient).
    """
    mask = mask.to(per_token.dtype)
    match Reduction(mode):
        case Reduction.token_mean:
            denominator = mask.sum() if normalizer is None else normalizer
            return (per_token * mask).sum() / denominator
        case Reduction.sequence_mean:
            per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            return per_sequence.mean()
        case Reduction.sum:
            return (per_token * mask).sum()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood -log p(target) per position: logits (..., V), targets (...) -> (...).

    Computed in float32 at least (bf16 log-softmax loses ~2 digits). Targets equal to -100 give 0.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()
    nll = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(targets.shape)
