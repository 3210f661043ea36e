"""The likelihood loss of pretraining and instruction tuning. Imports only torch."""

from __future__ import annotations

import torch

from posttrain.maths.reduction import IGNORE_INDEX, Reduction, reduce_per_token, token_nll


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, num_tokens: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of next-token prediction over trained tokens (instruction tuning / pretraining).

    loss = -(1/N) sum_t log p_theta(y_t | y_<t), over the N positions whose target is not -100.

    logits: (..., V) predictions for each target; targets: (...) token ids or -100. ``num_tokens`` is N when this
    call sees only part of the optimizer step (gradient accumulation); default: the trained tokens seen here.
    """
    trained = targets != IGNORE_INDEX
    nll = token_nll(logits, targets)
    loss = reduce_per_token(nll, trained, Reduction.token_mean, normalizer=num_tokens)
    count = trained.sum()
    metrics = {
        "loss": loss.detach(),
        "nll_sum": (nll * trained).sum().detach(),
        "tokens": count.detach(),
    }
    return loss, metrics
