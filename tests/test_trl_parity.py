"""Parity of posttrain.maths with TRL's DPO and KTO losses on fixed float64 log-prob tensors (to 1e-6).

TRL is a benchmark-only dependency (the ``bench`` extra), so the comparison runs in two ways:

* always: posttrain's losses against TRL's outputs stored in ``tests/data/trl_parity.json`` (inputs and outputs, as
  float64 written with full precision), so CI checks parity without TRL installed;
* where TRL is installed: posttrain against TRL computed live, and the stored outputs against live TRL (a stale
  fixture fails there). Regenerate the fixture with ``python tests/test_trl_parity.py --regenerate`` (needs TRL).

TRL computes its losses inside the trainers' ``_compute_loss(model, inputs)``, so the live side calls that method on
a minimal stand-in for the trainer whose "model" returns prescribed per-token log-probs; everything between those
log-probs and the loss is TRL's own code.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain import losses

FIXTURE = Path(__file__).parent / "data" / "trl_parity.json"
DPO_CASES = [("sigmoid", "dpo", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.2), ("robust", "robust", 0.0)]
DPO_METRICS = (("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
               ("rewards/accuracy", "rewards/accuracies"), ("logps/chosen", "logps/chosen"))
DPO_BETA, KTO_BETA, KTO_DESIRABLE, KTO_UNDESIRABLE = 0.3, 0.2, 1.3, 0.8


# ---------------------------------------------------------------------------------------------------------------
# Fixed inputs (float64, seeded) and the posttrain side.


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


def dpo_inputs() -> dict[str, torch.Tensor]:
    """6 pairs of 12 tokens: rows 0-5 chosen, 6-11 rejected; reference sequence log-probs per pair."""
    generator = torch.Generator().manual_seed(7)
    pairs, length = 6, 12
    completion_mask, per_token = _random_completions(2 * pairs, length, generator)
    ref_chosen = -torch.rand(pairs, generator=generator, dtype=torch.float64) * 20
    ref_rejected = -torch.rand(pairs, generator=generator, dtype=torch.float64) * 20
    return {"completion_mask": completion_mask, "per_token": per_token, "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected}


def kto_inputs() -> dict[str, torch.Tensor]:
    """8 unpaired rows of 10 tokens with labels, their KL twins, and reference log-probs of both."""
    generator = torch.Generator().manual_seed(3)
    rows, length = 8, 10
    completion_mask, per_token = _random_completions(rows, length, generator)
    kl_mask, kl_per_token = _random_completions(rows, length, generator)
    ref_logps = per_token.sum(1) + torch.randn(rows, generator=generator, dtype=torch.float64)
    ref_kl_logps = kl_per_token.sum(1) - torch.rand(rows, generator=generator, dtype=torch.float64)
    return {"completion_mask": completion_mask, "per_token": per_token, "kl_mask": kl_mask,
            "kl_per_token": kl_per_token, "labels": torch.tensor([True, False, True, True, False, False, True, False]),
            "ref_logps": ref_logps, "ref_kl_logps": ref_kl_logps}


def ours_dpo(x: dict, loss_type: str, smoothing: float) -> tuple[float, dict[str, float]]:
    pairs = len(x["ref_chosen"])
    logps, lengths = x["per_token"].sum(1), x["completion_mask"].sum(1).double()
    loss, metrics = losses.dpo_loss(logps[:pairs], logps[pairs:], x["ref_chosen"], x["ref_rejected"], beta=DPO_BETA,
                                    loss_type=loss_type, label_smoothing=smoothing, chosen_lengths=lengths[:pairs],
                                    rejected_lengths=lengths[pairs:])
    return float(loss), {key: float(metrics[key]) for key, _ in DPO_METRICS}


def ours_kto(x: dict) -> tuple[float, float]:
    loss, metrics = losses.kto_loss(x["per_token"].sum(1), x["ref_logps"], x["labels"], x["kl_per_token"].sum(1),
                                    x["ref_kl_logps"], beta=KTO_BETA, desirable_weight=KTO_DESIRABLE,
                                    undesirable_weight=KTO_UNDESIRABLE)
    return float(loss), float(metrics["kl"])


# ---------------------------------------------------------------------------------------------------------------
# The TRL side (needs trl).


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


def _model_returning(per_token_logps: torch.Tensor):
    rows, width = per_token_logps.shape

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(rows, width),
                               mean_logits=torch.zeros(rows, width), is_top1=torch.zeros(rows, width, dtype=torch.bool))

    return model


def trl_dpo(x: dict, trl_type: str, smoothing: float) -> tuple[float, dict[str, float]]:
    """TRL's DPO loss and metrics (under posttrain's metric names) on the inputs ``x``."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rows, length = x["completion_mask"].shape
    inputs = {"input_ids": torch.ones(rows, length, dtype=torch.long),
              "attention_mask": torch.ones(rows, length, dtype=torch.long),
              "completion_mask": x["completion_mask"], "ref_chosen_logps": x["ref_chosen"],
              "ref_rejected_logps": x["ref_rejected"]}
    trainer = _trainer(beta=DPO_BETA, loss_types=[trl_type], label_smoothing=smoothing)
    loss = DPOTrainer._compute_loss(trainer, _model_returning(x["per_token"]), inputs, return_outputs=False)
    return float(loss), {ours: float(trainer._metrics["train"][theirs][-1]) for ours, theirs in DPO_METRICS}


def trl_kto(x: dict) -> tuple[float, float]:
    """TRL's KTO loss and KL estimate on the inputs ``x`` (skips if the stand-in trainer lacks something)."""
    from trl.trainer.kto_trainer import KTOTrainer

    rows, length = x["completion_mask"].shape
    inputs = {"input_ids": torch.ones(rows, length, dtype=torch.long), "attention_mask": torch.ones(rows, length),
              "completion_mask": x["completion_mask"], "label": x["labels"], "ref_logps": x["ref_logps"],
              "KL_input_ids": torch.ones(rows, length, dtype=torch.long), "KL_attention_mask": torch.ones(rows, length),
              "KL_completion_mask": x["kl_mask"], "ref_KL_logps": x["ref_kl_logps"]}

    def model(**kwargs):  # the KL forward is told apart by its input tensor
        table = x["kl_per_token"] if kwargs["input_ids"] is inputs["KL_input_ids"] else x["per_token"]
        return _model_returning(table)()

    trainer = _trainer(beta=KTO_BETA, loss_type="kto", calculate_KL=True, desirable_weight=KTO_DESIRABLE,
                       undesirable_weight=KTO_UNDESIRABLE)
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    try:
        loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    except (AttributeError, KeyError) as err:  # the stand-in lacks something this TRL version reads
        pytest.skip(f"TRL's KTOTrainer._compute_loss needs more of the trainer than the stand-in has: {err!r}")
    return float(loss), float(trainer._metrics["train"]["kl"][-1])


def _case_id(trl_type: str, smoothing: float) -> str:
    return f"{trl_type}-{smoothing}"


def _encode(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "values": v.tolist()} for k, v in tensors.items()}


def _decode(encoded: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])) for k, v in encoded.items()}


def regenerate(path: Path = FIXTURE) -> dict:
    """Compute TRL's outputs on the fixed inputs and write them, with the inputs, to ``path``."""
    import trl

    dpo, kto = dpo_inputs(), kto_inputs()
    data = {
        "trl_version": trl.__version__, "dpo_beta": DPO_BETA, "kto_beta": KTO_BETA,
        "kto_desirable_weight": KTO_DESIRABLE, "kto_undesirable_weight": KTO_UNDESIRABLE,
        "dpo_inputs": _encode(dpo), "kto_inputs": _encode(kto),
        "dpo": {_case_id(t, s): dict(zip(("loss", "metrics"), trl_dpo(dpo, t, s))) for t, _, s in DPO_CASES},
        "kto": dict(zip(("loss", "kl"), trl_kto(kto))),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(data))
    return data


def _dumps(data: dict) -> str:
    """JSON with one line per tensor or case (json writes floats with repr, so float64 round-trips exactly)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@pytest.fixture(scope="module")
def stored() -> dict:
    data = json.loads(FIXTURE.read_text())
    assert (data["dpo_beta"], data["kto_beta"]) == (DPO_BETA, KTO_BETA)
    assert (data["kto_desirable_weight"], data["kto_undesirable_weight"]) == (KTO_DESIRABLE, KTO_UNDESIRABLE)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Always: posttrain against TRL's stored outputs.


@pytest.mark.parametrize("trl_type,ours,smoothing", DPO_CASES)
def test_dpo_loss_types_match_stored_trl_values(stored, trl_type, ours, smoothing):
    expected = stored["dpo"][_case_id(trl_type, smoothing)]
    loss, metrics = ours_dpo(_decode(stored["dpo_inputs"]), ours, smoothing)
    assert abs(loss - expected["loss"]) < 1e-6, (loss, expected["loss"])
    for key, value in metrics.items():
        assert abs(value - expected["metrics"][key]) < 1e-6, (key, value, expected["metrics"][key])


def test_kto_loss_matches_stored_trl_values(stored):
    loss, kl = ours_kto(_decode(stored["kto_inputs"]))
    assert abs(loss - stored["kto"]["loss"]) < 1e-6, (loss, stored["kto"]["loss"])
    assert abs(kl - stored["kto"]["kl"]) < 1e-6, (kl, stored["kto"]["kl"])


def test_stored_inputs_are_the_seeded_inputs(stored):
    """The fixture's inputs are what the seeded generators give (so a live run compares the same numbers)."""
    for name, fresh in (("dpo_inputs", dpo_inputs()), ("kto_inputs", kto_inputs())):
        decoded = _decode(stored[name])
        assert decoded.keys() == fresh.keys()
        for key in fresh:
            assert decoded[key].dtype == fresh[key].dtype and torch.equal(decoded[key], fresh[key]), (name, key)


# ---------------------------------------------------------------------------------------------------------------
# Where TRL is installed: live TRL.


@pytest.mark.parametrize("trl_type,ours,smoothing", DPO_CASES)
def test_dpo_loss_types_match_live_trl(trl_type, ours, smoothing, stored):
    pytest.importorskip("trl")
    x = dpo_inputs()
    trl_loss, trl_metrics = trl_dpo(x, trl_type, smoothing)
    loss, metrics = ours_dpo(x, ours, smoothing)
    assert abs(loss - trl_loss) < 1e-6, (loss, trl_loss)
    for key in metrics:
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key
    expected = stored["dpo"][_case_id(trl_type, smoothing)]  # the fixture is still what TRL computes
    assert abs(trl_loss - expected["loss"]) < 1e-9, "stale fixture: python tests/test_trl_parity.py --regenerate"


def test_kto_loss_matches_live_trl(stored):
    pytest.importorskip("trl")
    x = kto_inputs()
    trl_loss, trl_kl = trl_kto(x)
    loss, kl = ours_kto(x)
    assert abs(loss - trl_loss) < 1e-6, (loss, trl_loss)
    assert abs(kl - trl_kl) < 1e-6
    assert abs(trl_loss - stored["kto"]["loss"]) < 1e-9, "stale fixture: python tests/test_trl_parity.py --regenerate"


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_trl_parity.py --regenerate  (rewrites tests/data/trl_parity.json; "
                 "needs trl)")
    written = regenerate()
    print(f"wrote {FIXTURE} (trl {written['trl_version']})")
