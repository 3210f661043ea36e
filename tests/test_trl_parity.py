"""Parity of posttrain.maths with TRL's DPO and KTO losses on random log-prob tensors (to 1e-6).

TRL is a benchmark-only dependency: these tests run only where it is installed (``pip install trl``; the benchmark
environment has it) and are skipped otherwise. TRL computes its losses inside the trainers'
``_compute_loss(model, inputs)``, so each test calls that method on a minimal stand-in for the trainer whose "model"
returns prescribed per-token log-probs; everything between those log-probs and the loss is TRL's own code.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain import losses

trl = pytest.importorskip("trl")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


def _trainer(**attributes) -> SimpleNamespace:
    """What ``_compute_loss`` reads from ``self``: hyper-parameters, an identity accelerator, metric buffers."""
    defaults = dict(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                    ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                    loss_weights=[1.0], label_smoothing=0.0, _total_train_tokens=0, _tp_size=1,
                    _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    return SimpleNamespace(**{**defaults, **attributes})


def _random_completions(rows: int, length: int, generator: torch.Generator):
    """(completion_mask (rows, length) with a prompt of 2-4 tokens and a completion of >= 1 token, per-token
    log-probs (rows, length - 1) that are 0 outside the completion, as TRL's fused head returns them)."""
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        start = int(torch.randint(2, 5, (1,), generator=generator))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=generator))
        completion_mask[r, start:end] = 1
    per_token = -torch.rand(rows, length - 1, generator=generator, dtype=torch.float64) * 3
    return completion_mask, per_token * completion_mask[:, 1:]


def _model_returning(per_token_logps: torch.Tensor):
    rows, width = per_token_logps.shape

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(rows, width),
                               mean_logits=torch.zeros(rows, width), is_top1=torch.zeros(rows, width, dtype=torch.bool))

    return model


@pytest.mark.parametrize("trl_type,ours,smoothing", [("sigmoid", "dpo", 0.0), ("ipo", "ipo", 0.0),
                                                     ("robust", "robust", 0.2), ("robust", "robust", 0.0)])
def test_dpo_loss_types_match_trl(trl_type, ours, smoothing):
    from trl.trainer.dpo_trainer import DPOTrainer

    generator = torch.Generator().manual_seed(7)
    pairs, length, beta = 6, 12, 0.3
    completion_mask, per_token = _random_completions(2 * pairs, length, generator)  # rows: chosen..., rejected...
    ref_chosen = -torch.rand(pairs, generator=generator, dtype=torch.float64) * 20
    ref_rejected = -torch.rand(pairs, generator=generator, dtype=torch.float64) * 20
    inputs = {"input_ids": torch.ones(2 * pairs, length, dtype=torch.long),
              "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    trainer = _trainer(beta=beta, loss_types=[trl_type], label_smoothing=smoothing)
    trl_loss = DPOTrainer._compute_loss(trainer, _model_returning(per_token), inputs, return_outputs=False)

    logps, lengths = per_token.sum(1), completion_mask.sum(1).double()
    our_loss, metrics = losses.dpo_loss(logps[:pairs], logps[pairs:], ref_chosen, ref_rejected, beta=beta,
                                        loss_type=ours, label_smoothing=smoothing, chosen_lengths=lengths[:pairs],
                                        rejected_lengths=lengths[pairs:])
    assert abs(float(our_loss) - float(trl_loss)) < 1e-6, (float(our_loss), float(trl_loss))
    for ours_key, trl_key in (("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
                              ("rewards/accuracy", "rewards/accuracies"), ("logps/chosen", "logps/chosen")):
        assert abs(float(metrics[ours_key]) - trainer._metrics["train"][trl_key][-1]) < 1e-6, ours_key


def test_kto_loss_matches_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    generator = torch.Generator().manual_seed(3)
    rows, length, beta = 8, 10, 0.2
    completion_mask, per_token = _random_completions(rows, length, generator)
    kl_mask, kl_per_token = _random_completions(rows, length, generator)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    ref_logps = per_token.sum(1) + torch.randn(rows, generator=generator, dtype=torch.float64)
    ref_kl_logps = kl_per_token.sum(1) - torch.rand(rows, generator=generator, dtype=torch.float64)
    inputs = {"input_ids": torch.ones(rows, length, dtype=torch.long), "attention_mask": torch.ones(rows, length),
              "completion_mask": completion_mask, "label": labels, "ref_logps": ref_logps,
              "KL_input_ids": torch.ones(rows, length, dtype=torch.long), "KL_attention_mask": torch.ones(rows, length),
              "KL_completion_mask": kl_mask, "ref_KL_logps": ref_kl_logps}

    def model(**kwargs):  # the KL forward is told apart by its input tensor
        table = kl_per_token if kwargs["input_ids"] is inputs["KL_input_ids"] else per_token
        return _model_returning(table)()

    trainer = _trainer(beta=beta, loss_type="kto", calculate_KL=True, desirable_weight=1.3, undesirable_weight=0.8)
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    try:
        trl_loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    except (AttributeError, KeyError) as err:  # the stand-in lacks something this TRL version reads
        pytest.skip(f"TRL's KTOTrainer._compute_loss needs more of the trainer than the stand-in has: {err!r}")
    our_loss, metrics = losses.kto_loss(per_token.sum(1), ref_logps, labels, kl_per_token.sum(1), ref_kl_logps,
                                        beta=beta, desirable_weight=1.3, undesirable_weight=0.8)
    assert abs(float(our_loss) - float(trl_loss)) < 1e-6, (float(our_loss), float(trl_loss))
    assert abs(float(metrics["kl"]) - trainer._metrics["train"]["kl"][-1]) < 1e-6
