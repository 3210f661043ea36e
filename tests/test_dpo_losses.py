"""Direct-alignment losses (posttrain.maths.dpo_loss / kto_loss): hand-derived values, a naive float64 reference,
and the properties the issue asks for."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.maths import DPOLoss, dpo_loss, kto_loss


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# one pair: log pi(c) = -1, log pi(r) = -2, reference -1.5 for both; |y_c| = 4, |y_r| = 2
PAIR = dict(policy_chosen_logps=_t(-1.0), policy_rejected_logps=_t(-2.0), ref_chosen_logps=_t(-1.5),
            ref_rejected_logps=_t(-1.5), chosen_lengths=_t(4.0), rejected_lengths=_t(2.0))


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    # rho_c = 0.5, rho_r = -0.5; beta = 0.5 -> h = 0.5; -log sigma(0.5) = log(1 + e^-0.5) = 0.474077
    ("dpo", dict(beta=0.5), 0.474077),
    # eps = 0.1: 0.9 * 0.474077 + 0.1 * -log sigma(-0.5) (= 0.974077) = 0.524077
    ("cdpo", dict(beta=0.5, label_smoothing=0.1), 0.524077),
    # (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411577
    ("robust", dict(beta=0.5, label_smoothing=0.1), 0.411577),
    # (rho_c - rho_r - 1/(2 beta))^2 = (1 - 2)^2 = 1 with beta = 0.25
    ("ipo", dict(beta=0.25), 1.0),
    # DPO 0.474077 + alpha (1) * -log pi(c) / |y_c| (= 1/4) = 0.724077
    ("dpo_nll", dict(beta=0.5, alpha=1.0), 0.724077),
    # avg log-probs -0.5 and -1.0; beta 2: 2 * (0.5) - gamma 0.5 = 0.5; -log sigma(0.5) = 0.474077
    ("simpo", dict(beta=2.0, gamma=0.5), 0.474077),
    # avg -0.25 / -1.0: log odds_c = -0.25 - log(1 - e^-0.25) = 1.258692, log odds_r = -1 - log(1 - e^-1) = -0.541325;
    # -log sigma(1.800016) = 0.152975; loss = 0.25 + 0.1 * 0.152975 = 0.265298
    ("orpo", dict(beta=0.1, alpha=0.1), 0.265298),
])
def test_hand_derived_values(loss_type, kwargs, expected):
    pair = dict(PAIR)
    if loss_type == "simpo":
        pair["policy_chosen_logps"], pair["chosen_lengths"] = _t(-2.0), _t(4.0)  # avg -0.5
        pair["policy_rejected_logps"], pair["rejected_lengths"] = _t(-2.0), _t(2.0)  # avg -1.0
    if loss_type == "orpo":
        pair["policy_chosen_logps"], pair["chosen_lengths"] = _t(-1.0), _t(4.0)  # avg -0.25
        pair["policy_rejected_logps"], pair["rejected_lengths"] = _t(-2.0), _t(2.0)  # avg -1.0
    if loss_type == "ipo":  # the sequence-level form of the formula: no lengths
        pair["chosen_lengths"] = pair["rejected_lengths"] = None
    loss, _ = dpo_loss(**pair, loss_type=loss_type, **kwargs)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_ipo_per_token_form():
    """With lengths 4 and 2: rho_c / 4 - rho_r / 2 = 0.125 + 0.25 = 0.375; beta 0.5 -> (0.375 - 1)^2 = 0.390625."""
    loss, _ = dpo_loss(**PAIR, beta=0.5, loss_type="ipo")
    assert float(loss) == pytest.approx(0.390625, abs=1e-12)


def _naive(loss_type: str, pc, pr, rc, rr, lc, lr, beta, eps, gamma, alpha) -> float:
    """Straight from the papers, one pair at a time, in float64 Python."""
    total = 0.0
    for i in range(len(pc)):
        h = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        if loss_type == "dpo":
            value = -_log_sigmoid(h)
        elif loss_type == "cdpo":
            value = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
        elif loss_type == "robust":
            value = (-(1 - eps) * _log_sigmoid(h) + eps * _log_sigmoid(-h)) / (1 - 2 * eps)
        elif loss_type == "ipo":  # per-token form when lengths are given
            value = ((pc[i] - rc[i]) / lc[i] - (pr[i] - rr[i]) / lr[i] - 1 / (2 * beta)) ** 2
        elif loss_type == "dpo_nll":
            value = -_log_sigmoid(h) - alpha * pc[i] / lc[i]
        elif loss_type == "simpo":
            value = -_log_sigmoid(beta * pc[i] / lc[i] - beta * pr[i] / lr[i] - gamma)
        else:  # orpo
            p_c, p_r = math.exp(pc[i] / lc[i]), math.exp(pr[i] / lr[i])
            odds_ratio = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
            value = -pc[i] / lc[i] - alpha * _log_sigmoid(odds_ratio)
        total += value
    return total / len(pc)


@pytest.mark.parametrize("loss_type", ["dpo", "cdpo", "robust", "ipo", "dpo_nll", "simpo", "orpo"])
def test_matches_naive_float64_reference(loss_type):
    generator = torch.Generator().manual_seed(0)
    b = 64
    lengths_c = torch.randint(1, 40, (b,), generator=generator).double()
    lengths_r = torch.randint(1, 40, (b,), generator=generator).double()
    pc = -torch.rand(b, generator=generator, dtype=torch.float64) * lengths_c * 2 - 1e-3
    pr = -torch.rand(b, generator=generator, dtype=torch.float64) * lengths_r * 2 - 1e-3
    rc = pc + torch.randn(b, generator=generator, dtype=torch.float64)
    rr = pr + torch.randn(b, generator=generator, dtype=torch.float64)
    beta, eps, gamma, alpha = 0.3, 0.2, 0.7, 0.4
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lengths_c,
                       rejected_lengths=lengths_r, gamma=gamma, alpha=alpha)
    expected = _naive(loss_type, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), lengths_c.tolist(),
                      lengths_r.tolist(), beta, eps if loss_type in ("cdpo", "robust") else 0.0, gamma, alpha)
    assert float(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "cdpo", "robust", "ipo", "dpo_nll", "simpo", "orpo"])
def test_preferring_the_chosen_answer_lowers_the_loss(loss_type):
    """Raising log pi(y_c|x) (or lowering log pi(y_r|x)) lowers the loss; the gradient pushes that way too. (IPO's
    squared loss has a target margin 1/(2 beta): this holds below it, so IPO uses beta 0.1, target 5.)"""
    base = dict(PAIR, policy_chosen_logps=_t(-6.0), policy_rejected_logps=_t(-6.0))
    kwargs = dict(beta=0.1 if loss_type == "ipo" else 0.5, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0)
    worse, _ = dpo_loss(**base, **kwargs)
    better, _ = dpo_loss(**dict(base, policy_chosen_logps=_t(-5.0)), **kwargs)
    assert float(better) < float(worse)
    chosen = _t(-6.0).requires_grad_()
    rejected = _t(-6.0).requires_grad_()
    loss, _ = dpo_loss(**dict(base, policy_chosen_logps=chosen, policy_rejected_logps=rejected), **kwargs)
    loss.backward()
    assert chosen.grad < 0 and rejected.grad > 0


def test_metrics_are_detached_and_report_implicit_rewards():
    chosen = _t(-1.0, -3.0).requires_grad_()
    rejected = _t(-2.0, -1.0).requires_grad_()
    _, metrics = dpo_loss(chosen, rejected, _t(-1.5, -2.0), _t(-1.5, -2.0), beta=0.5)
    assert all(not v.requires_grad for v in metrics.values())
    # implicit rewards beta * (log pi - log pi_ref): chosen [0.25, -0.5], rejected [-0.25, 0.5]
    assert float(metrics["rewards/chosen"]) == pytest.approx(-0.125)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.125)
    assert float(metrics["rewards/accuracy"]) == 0.5
    assert float(metrics["rewards/margin"]) == pytest.approx(-0.25)
    assert float(metrics["logps/chosen"]) == pytest.approx(-2.0)
    assert float(metrics["logps/rejected"]) == pytest.approx(-1.5)


def test_reference_free_types_never_need_a_reference():
    assert [t.value for t in DPOLoss if not t.needs_reference] == ["simpo", "orpo"]
    for loss_type in ("simpo", "orpo"):
        loss, _ = dpo_loss(_t(-2.0), _t(-3.0), None, None, beta=0.5, loss_type=loss_type, chosen_lengths=_t(4.0),
                           rejected_lengths=_t(3.0))
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(_t(-2.0), _t(-3.0), None, None, beta=0.5, loss_type="dpo")
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(_t(-2.0), _t(-3.0), None, None, beta=0.5, loss_type="simpo")
    with pytest.raises(ValueError, match="kto_loss"):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), _t(-3.0), beta=0.5, loss_type="kto")
    with pytest.raises(ValueError):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), _t(-3.0), beta=0.5, loss_type="cdpo", label_smoothing=0.5)


def test_cdpo_with_no_smoothing_is_dpo():
    args = (PAIR["policy_chosen_logps"], PAIR["policy_rejected_logps"], PAIR["ref_chosen_logps"],
            PAIR["ref_rejected_logps"])
    dpo, _ = dpo_loss(*args, beta=0.3)
    for loss_type in ("cdpo", "robust"):
        same, _ = dpo_loss(*args, beta=0.3, loss_type=loss_type, label_smoothing=0.0)
        assert float(same) == pytest.approx(float(dpo), abs=1e-15)


def test_kto_hand_values():
    """beta = 1; desirable r = 1.0, undesirable r = -0.5; mismatched pairs give z0 = mean(0.3, 0.1) = 0.2.
    desirable: 1 - sigma(0.8) = 0.310026; undesirable: 1 - sigma(0.2 + 0.5) = 0.331812; mean 0.320919."""
    loss, metrics = kto_loss(_t(-1.0, -2.5), _t(-2.0, -2.0), torch.tensor([True, False]), _t(-1.0, -3.0),
                             _t(-1.3, -3.1), beta=1.0)
    assert float(loss) == pytest.approx(0.320919, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.2)
    assert float(metrics["rewards/chosen"]) == pytest.approx(1.0) and float(metrics["rewards/rejected"]) == -0.5
    assert float(metrics["rewards/margin"]) == pytest.approx(1.5) and float(metrics["logps/rejected"]) == -2.5
    # the KL baseline is clamped at 0 and carries no gradient
    policy_kl = _t(-5.0, -5.0).requires_grad_()
    policy = _t(-1.0).requires_grad_()
    loss, metrics = kto_loss(policy, _t(-1.0), torch.tensor([True]), policy_kl, _t(-1.0, -1.0), beta=1.0)
    assert float(metrics["kl"]) == 0.0 and float(loss.detach()) == pytest.approx(0.5)
    assert math.isnan(float(metrics["rewards/rejected"]))  # no undesirable example in the batch
    loss.backward()
    assert float(policy.grad) == pytest.approx(-0.25)  # d/dr (1 - sigma(r)) at r = 0
    assert policy_kl.grad is None or float(policy_kl.grad.abs().sum()) == 0.0


def test_kto_naive_reference():
    generator = torch.Generator().manual_seed(1)
    policy, ref = torch.randn(32, generator=generator, dtype=torch.float64), torch.randn(32, generator=generator,
                                                                                        dtype=torch.float64)
    desirable = torch.rand(32, generator=generator) > 0.4
    kl_p, kl_r = torch.randn(32, generator=generator, dtype=torch.float64), torch.randn(32, generator=generator,
                                                                                       dtype=torch.float64)
    beta, wd, wu = 0.7, 1.3, 0.8
    loss, _ = kto_loss(policy, ref, desirable, kl_p, kl_r, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    z0 = max(0.0, sum(a - b for a, b in zip(kl_p.tolist(), kl_r.tolist())) / 32)
    expected = 0.0
    for p, r, d in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected += wd * (1 - sig(beta * (p - r - z0))) if d else wu * (1 - sig(beta * (z0 - (p - r))))
    assert float(loss) == pytest.approx(expected / 32, rel=1e-12)


def test_simpo_default_target_margin_is_one_half():
    """gamma defaults to 0.5: the simpo case of test_hand_derived_values without passing gamma, 0.474077."""
    loss, _ = dpo_loss(_t(-2.0), _t(-2.0), None, None, beta=2.0, loss_type="simpo", chosen_lengths=_t(4.0),
                       rejected_lengths=_t(2.0))
    assert float(loss) == pytest.approx(0.474077, abs=1e-6)


def test_ipo_needs_both_lengths_for_the_per_token_form():
    """With only one length given, IPO uses the sequence-level form: (1 - 2)^2 = 1 at beta 0.25 (as in
    test_hand_derived_values), not the per-token one."""
    loss, _ = dpo_loss(**dict(PAIR, rejected_lengths=None), beta=0.25, loss_type="ipo")
    assert float(loss) == pytest.approx(1.0, abs=1e-12)


def test_metric_names_and_a_tie_is_not_accurate():
    """policy = reference: both implicit rewards 0, a tie, so rewards/accuracy 0; loss -log sigma(0) = log 2."""
    loss, metrics = dpo_loss(_t(-1.0), _t(-2.0), _t(-1.0), _t(-2.0), beta=0.5)
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                            "logps/chosen", "logps/rejected"}
    assert float(metrics["loss"]) == float(loss) == pytest.approx(math.log(2.0), abs=1e-12)
    assert float(metrics["rewards/accuracy"]) == 0.0


def test_dpo_errors_name_what_is_missing():
    """Each check fires when only one of the two tensors is missing, and says what is wrong."""
    with pytest.raises(ValueError, match=r"^loss_type=dpo needs the reference log-probs$"):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), None, beta=0.5)
    with pytest.raises(ValueError, match=r"^loss_type=dpo needs the reference log-probs$"):
        dpo_loss(_t(-2.0), _t(-3.0), None, _t(-3.0), beta=0.5)
    with pytest.raises(ValueError, match=r"^loss_type=simpo needs chosen_lengths and rejected_lengths$"):
        dpo_loss(_t(-2.0), _t(-3.0), None, None, beta=0.5, loss_type="simpo", chosen_lengths=_t(4.0))
    with pytest.raises(ValueError, match=r"^loss_type=dpo_nll needs chosen_lengths and rejected_lengths$"):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), _t(-3.0), beta=0.5, loss_type="dpo_nll", rejected_lengths=_t(3.0))
    unpaired = r"^kto is unpaired: use kto_loss\(policy_logps, ref_logps, desirable, \.\.\.\)$"
    with pytest.raises(ValueError, match=unpaired):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), _t(-3.0), beta=0.5, loss_type="kto")
    with pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 0\.5\), got 0\.5$"):
        dpo_loss(_t(-2.0), _t(-3.0), _t(-2.0), _t(-3.0), beta=0.5, loss_type="cdpo", label_smoothing=0.5)


def test_kto_given_reference_point():
    """A reference point computed over the whole step replaces the batch's own z0: the batch of test_kto_hand_values
    with z0 = 0.2 given (its own mismatched pairs would give z0 = 0) has the same loss, 0.320919; z0 carries no
    gradient. Metric names as documented."""
    reference_point = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    policy = _t(-1.0, -2.5).requires_grad_()
    loss, metrics = kto_loss(policy, _t(-2.0, -2.0), torch.tensor([True, False]), _t(-1.0, -1.0), _t(-1.0, -1.0),
                             beta=1.0, reference_point=reference_point)
    assert set(metrics) == {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                            "logps/rejected"}
    assert float(metrics["loss"]) == float(loss.detach()) == pytest.approx(0.320919, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.2) and float(metrics["logps/chosen"]) == -1.0
    loss.backward()
    assert reference_point.grad is None
    assert policy.grad is not None
