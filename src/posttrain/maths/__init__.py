"""Pure maths: losses by family, their reduction, selection rules and small statistics.

Every module here imports only torch (or nothing at all) and takes tensors, lists and plain scalars: no config objects,
no models, no files. ``posttrain.losses`` (the losses' first home) is this package.

  reduction.py   IGNORE_INDEX, Reduction, reduce_per_token, token_nll
  sft.py         sft_loss (pretraining and instruction tuning)
  reward.py      RMLoss, bradley_terry_loss (+ margin), kcomparisons_loss, plackett_luce_loss, orm_loss, prm_loss
  direct.py      DPOLoss, dpo_loss (dpo, cdpo, robust, ipo, dpo_nll, simpo, orpo), kto_loss
  policy.py      KLEstimator, kl_penalty (k1, k2, k3), clipped_surrogate (PPO, clip-higher), gspo_surrogate,
                 cispo_surrogate, clipped_value_loss, truncated_is_weights
  advantages.py  rloo, grpo (and Dr. GRPO), gae  (``posttrain.advantages``)
  selection.py   selection rules over a reward matrix, pass@k, maj@k, best-of-n KL  (``posttrain.sampling``)
  stats.py       mean_or_nan, pearson, win_rate
"""

from posttrain.maths.direct import DEFAULT_ALPHA, DPOLoss, dpo_loss, kto_loss
from posttrain.maths.policy import (
    KLEstimator,
    cispo_surrogate,
    clipped_surrogate,
    clipped_value_loss,
    gspo_surrogate,
    kl_penalty,
    truncated_is_weights,
)
from posttrain.maths.reduction import IGNORE_INDEX, Reduction, reduce_per_token, token_nll
from posttrain.maths.reward import RMLoss, bradley_terry_loss, kcomparisons_loss, orm_loss, plackett_luce_loss, prm_loss
from posttrain.maths.sft import sft_loss

__all__ = [
    "DEFAULT_ALPHA", "DPOLoss", "IGNORE_INDEX", "KLEstimator", "RMLoss", "Reduction", "bradley_terry_loss",
    "cispo_surrogate", "clipped_surrogate", "clipped_value_loss", "dpo_loss", "gspo_surrogate", "kcomparisons_loss",
    "kl_penalty", "kto_loss", "orm_loss", "plackett_luce_loss", "prm_loss", "reduce_per_token", "sft_loss",
    "token_nll", "truncated_is_weights",
]
