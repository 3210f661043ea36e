"""Reward-model losses: hand-derived values (arithmetic in the docstrings), naive float64 references, properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from posttrain.maths import bradley_terry_loss, kcomparisons_loss, orm_loss, plackett_luce_loss, prm_loss


def log1pexp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_derived():
    """pairs (r_c, r_r) = (2, 0) and (0, 1):
    -log sigma(2) = log(1 + e^-2) = 0.1269280;  -log sigma(-1) = log(1 + e^1) = 1.3132617;  mean = 0.7200948.
    With margins (1, 0): -log sigma(2 - 1) = 0.3132617, so mean = (0.3132617 + 1.3132617) / 2 = 0.8132617."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.7200948, abs=1e-6)
    assert metrics["accuracy"].item() == 0.5 and metrics["margin"].item() == pytest.approx(0.5)
    assert metrics["chosen_mean"].item() == 1.0 and metrics["rejected_mean"].item() == 0.5
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.8132617, abs=1e-6)


def test_plackett_luce_hand_derived():
    """scores best-first (3, 1, 0): log P = [3 - log(e^3 + e + 1)] + [1 - log(e + 1)]
    = (3 - 3.1698459) + (1 - 1.3132617) = -0.4831076, so loss = 0.4831076."""
    loss, _ = plackett_luce_loss(torch.tensor([[3.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.4831076, abs=1e-6)


def test_kcomparisons_hand_derived():
    """scores (3, 1, 0): pairs 3-1, 3-0, 1-0 -> log(1+e^-2) + log(1+e^-3) + log(1+e^-1)
    = 0.1269280 + 0.0485874 + 0.3132617 = 0.4887771; mean over C(3,2) = 3 pairs: 0.1629257."""
    loss, metrics = kcomparisons_loss(torch.tensor([[3.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.1629257, abs=1e-6)
    assert metrics["accuracy"].item() == 1.0


def naive_pl_float64(scores: list[list[float]]) -> float:
    total = 0.0
    for row in scores:
        for k in range(len(row) - 1):
            total -= row[k] - math.log(sum(math.exp(s) for s in row[k:]))
    return total / len(scores)


def naive_kcomparisons_float64(scores: list[list[float]]) -> float:
    per_prompt = []
    for row in scores:
        pairs = list(itertools.combinations(range(len(row)), 2))
        per_prompt.append(sum(log1pexp(-(row[i] - row[j])) for i, j in pairs) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kwise_losses_match_float64_reference(k):
    scores = torch.randn(7, k, generator=torch.Generator().manual_seed(k)) * 2
    pl, _ = plackett_luce_loss(scores)
    kc, _ = kcomparisons_loss(scores)
    assert pl.item() == pytest.approx(naive_pl_float64(scores.tolist()), abs=1e-5)
    assert kc.item() == pytest.approx(naive_kcomparisons_float64(scores.tolist()), abs=1e-5)


def test_plackett_luce_k2_equals_bradley_terry():
    scores = torch.randn(9, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    pl, _ = plackett_luce_loss(scores)
    bt, _ = bradley_terry_loss(scores[:, 0], scores[:, 1])
    assert pl.item() == pytest.approx(bt.item(), abs=1e-12)


def test_kcomparisons_equals_mean_of_pairwise_bt():
    """Each prompt's C(K,2) pairs through BT, averaged, equal the K-wise loss computed from one score per
    completion (so each completion needs one forward, not one per pair)."""
    scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pair_losses = [bradley_terry_loss(scores[:, i], scores[:, j])[0] for i, j in itertools.combinations(range(4), 2)]
    kc, _ = kcomparisons_loss(scores)
    assert kc.item() == pytest.approx(torch.stack(pair_losses).mean().item(), abs=1e-12)


def test_bt_gradient_direction_and_detached_metrics():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected
    assert all(not v.requires_grad for v in metrics.values())
    # the better-separated pair has the lower loss
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))[0] < bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))[0]


def test_orm_loss_hand_derived():
    """token logits (0, 2, 9) with labels (1, 0, -100): BCE(0, 1) = log 2 = 0.6931472;
    BCE(2, 0) = log(1 + e^2) = 2.1269280; the third is ignored. Mean = 1.4100376."""
    loss, metrics = orm_loss(torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1, 0, -100]]))
    assert loss.item() == pytest.approx(1.4100376, abs=1e-6)
    assert metrics["token_accuracy"].item() == 0.0  # 0 -> predicts 0 (label 1), 2 -> predicts 1 (label 0)


def test_orm_loss_float64_reference():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (3, 6), generator=generator)
    labels[:, :2] = -100
    expected = []
    for x, y in zip(logits.flatten().tolist(), labels.flatten().tolist()):
        if y != -100:
            expected.append(log1pexp(x) - y * x)  # BCE with logits, written out
    loss, _ = orm_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-10)


def test_prm_loss_hand_derived():
    """two step boundaries: logits (0, 0, 0) with class 2 -> log 3 = 1.0986123; logits (ln 2, 0, 0) with class 0
    -> -log(2 / 4) = log 2 = 0.6931472; other positions ignored. Mean = 0.8958797."""
    logits = torch.zeros(1, 4, 3)
    logits[0, 3, 0] = math.log(2.0)
    labels = torch.tensor([[-100, 2, -100, 0]])
    loss, metrics = prm_loss(logits, labels)
    assert loss.item() == pytest.approx(0.8958797, abs=1e-6)
    assert metrics["step_accuracy"].item() == 0.5  # argmax of (0,0,0) is class 0 (wrong), of (ln2,0,0) is 0 (right)


def test_prm_loss_float64_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[-100, 0, -100, 2, 1], [1, -100, -100, -100, 2]])
    expected = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist()):
        for z, y in zip(row_logits, row_labels):
            if y != -100:
                expected.append(math.log(sum(math.exp(v) for v in z)) - z[y])
    loss, _ = prm_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-10)


def test_bradley_terry_ties_count_as_wrong_and_metric_names():
    """pairs (1, 1) and (2, 0): -log sigma(0) = log 2 = 0.6931472, -log sigma(2) = 0.1269280, mean 0.4100376; the tie is
    not a correct ranking, so accuracy = 1/2."""
    loss, metrics = bradley_terry_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert set(metrics) == {"loss", "accuracy", "margin", "chosen_mean", "rejected_mean"}
    assert metrics["loss"].item() == loss.item() == pytest.approx(0.4100376, abs=1e-6)
    assert metrics["accuracy"].item() == 0.5


def test_bradley_terry_margin_keeps_the_reward_dtype():
    """float64 margins (as a data loader may give them) leave a float32 loss float32; values as in
    test_bradley_terry_hand_derived: 0.8132617."""
    loss, _ = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]),
                                 margin=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.8132617, abs=1e-6)


# Four rankings best-first: correctly ordered; best first but the rest swapped; a tie at the top; reversed.
RANKINGS = [[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [2.0, 2.0, 1.0], [0.0, 1.0, 3.0]]


def test_plackett_luce_metrics_hand_derived():
    """RANKINGS: only the first is strictly ordered (ranking_accuracy 1/4; a tie is not an order); best above worst in
    the first three (accuracy 3/4); best mean (3 + 3 + 2 + 0)/4 = 2, worst mean (0 + 1 + 1 + 3)/4 = 1.25, margin
    0.75. The loss is the float64 reference's."""
    loss, metrics = plackett_luce_loss(torch.tensor(RANKINGS, dtype=torch.float64))
    assert set(metrics) == {"loss", "accuracy", "margin", "chosen_mean", "rejected_mean", "ranking_accuracy"}
    assert metrics["loss"].item() == loss.item() == pytest.approx(naive_pl_float64(RANKINGS), abs=1e-12)
    assert metrics["ranking_accuracy"].item() == 0.25
    assert metrics["accuracy"].item() == 0.75
    assert metrics["chosen_mean"].item() == 2.0 and metrics["rejected_mean"].item() == 1.25
    assert metrics["margin"].item() == 0.75


def test_kcomparisons_metrics_hand_derived():
    """RANKINGS, pairs (0,1), (0,2), (1,2): differences (2, 3, 1), (3, 2, -1), (0, 1, 1), (-1, -3, -2); positive in
    3 + 2 + 2 + 0 = 7 of 12 (a zero difference is not a win); margin = (6 + 4 + 2 - 6) / 12 = 0.5; best mean 2, worst
    mean 1.25 (the first and the last column)."""
    loss, metrics = kcomparisons_loss(torch.tensor(RANKINGS, dtype=torch.float64))
    assert set(metrics) == {"loss", "accuracy", "margin", "chosen_mean", "rejected_mean"}
    assert metrics["loss"].item() == loss.item() == pytest.approx(naive_kcomparisons_float64(RANKINGS), abs=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(7 / 12, abs=1e-7)
    assert metrics["margin"].item() == 0.5
    assert metrics["chosen_mean"].item() == 2.0 and metrics["rejected_mean"].item() == 1.25


def test_orm_token_accuracy_hand_derived():
    """logits (0.5, -1, 2, 9), labels (1, 1, 0, -100): predictions (logit > 0) 1, 0, 1: one of three right, 1/3.
    BCE: log(1 + e^-0.5) = 0.4740770, log(1 + e) = 1.3132617, log(1 + e^2) = 2.1269280; mean 1.3047556.
    One labelled token (logit 2, label 1): accuracy 1, loss log(1 + e^-2) = 0.1269280."""
    loss, metrics = orm_loss(torch.tensor([[0.5, -1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0, -100]]))
    assert set(metrics) == {"loss", "token_accuracy"}
    assert metrics["loss"].item() == loss.item() == pytest.approx(1.3047556, abs=1e-6)
    assert metrics["token_accuracy"].item() == pytest.approx(1 / 3, abs=1e-7)
    loss, metrics = orm_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1, -100]]))
    assert metrics["token_accuracy"].item() == 1.0
    assert loss.item() == pytest.approx(0.1269280, abs=1e-6)


def test_prm_step_accuracy_hand_derived():
    """Steps with logits (0, 0, 1) class 2 (right), (1, 0, 0) class 1 (argmax 0: wrong), (0, 2, 0) class 1 (right):
    accuracy 2/3. Losses log(e + 2) - 1 = 0.5514447, log(e + 2) = 1.5514447, log(e^2 + 2) - 2 = 0.2395448; mean
    0.7808114. One labelled step, right: accuracy 1."""
    logits = torch.tensor([[[5.0, 5.0, 5.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    loss, metrics = prm_loss(logits, torch.tensor([[-100, 2, 1, 1]]))
    assert set(metrics) == {"loss", "step_accuracy"}
    assert metrics["loss"].item() == loss.item() == pytest.approx(0.7808114, abs=1e-6)
    assert metrics["step_accuracy"].item() == pytest.approx(2 / 3, abs=1e-7)
    _, metrics = prm_loss(torch.tensor([[[0.0, 0.0, 1.0], [3.0, 0.0, 0.0]]]), torch.tensor([[2, -100]]))
    assert metrics["step_accuracy"].item() == 1.0
