"""Policy-gradient maths: advantages, KL estimators, surrogate losses and their reduction. Hand-derived values (the
arithmetic is in each docstring), naive float64 references, and the properties the RL issue names."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.advantages import gae, grpo, rloo
from posttrain.losses import (
    Reduction,
    cispo_surrogate,
    clipped_surrogate,
    clipped_value_loss,
    gspo_surrogate,
    kl_penalty,
    reduce_per_token,
    truncated_is_weights,
)
from posttrain.maths.advantages import GRPO_STD_EPS

NAN = float("nan")


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------
# group advantages


def test_rloo_hand_values():
    """Rewards [0.8, 0.3, 0.6, 0.5]; each baseline is the mean of the other three: (0.3 + 0.6 + 0.5) / 3 = 0.4667,
    (0.8 + 0.6 + 0.5) / 3 = 0.6333, (0.8 + 0.3 + 0.5) / 3 = 0.5333, (0.8 + 0.3 + 0.6) / 3 = 0.5667, so the advantages
    are +0.3333, -0.3333, +0.0667, -0.0667."""
    assert rloo(_t([0.8, 0.3, 0.6, 0.5]))[0].tolist() == pytest.approx([1 / 3, -1 / 3, 1 / 15, -1 / 15])


def test_grpo_hand_values():
    """Rewards [1, 0, 0, 0]: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5, so the
    advantages are 0.75 / (0.5 + 1e-4) = 1.49970 and -0.25 / 0.5001 = -0.49990; Dr. GRPO's are 0.75 and -0.25."""
    assert grpo(_t([1.0, 0, 0, 0]))[0].tolist() == pytest.approx([0.75 / 0.5001] + [-0.25 / 0.5001] * 3, abs=1e-12)
    assert grpo(_t([1.0, 0, 0, 0]), normalize_std=False)[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def _reference(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """Naive float64 loops over groups, skipping NaN."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for p, row in enumerate(rewards.tolist()):
        scored = [j for j, r in enumerate(row) if not math.isnan(r)]
        if len(scored) < 2:
            continue
        values = [row[j] for j in scored]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for j in scored:
            if kind == "rloo":
                out[p, j] = row[j] - (sum(values) - row[j]) / (len(values) - 1)
            elif kind == "grpo":
                out[p, j] = (row[j] - mean) / (std + GRPO_STD_EPS)
            else:
                out[p, j] = row[j] - mean
    return out


def test_advantages_match_a_float64_reference_with_missing_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 5, generator=g, dtype=torch.float64)
    rewards[1, 2] = NAN
    rewards[3, :4] = NAN  # one scored completion left: no baseline
    for kind, advantages in (("rloo", rloo(rewards)), ("grpo", grpo(rewards)),
                             ("dr_grpo", grpo(rewards, normalize_std=False))):
        torch.testing.assert_close(advantages, _reference(rewards, kind), rtol=0, atol=1e-12)
        assert torch.isfinite(advantages).all() and (advantages[3] == 0).all()


def test_groups_of_two():
    """Rewards [1, 0]: RLOO 1 - 0 = 1 and 0 - 1 = -1; GRPO mean 0.5, sample std sqrt(2 * 0.25 / 1) = 0.7071, so
    +-0.5 / 0.7072; Dr. GRPO +-0.5. Two groups side by side ([0.3] * 3 with a missing reward, and
    [1.0, 0.1, 0.3, 0.9]) do not mix."""
    assert rloo(_t([1.0, 0.0]))[0].tolist() == [1.0, -1.0]
    half = 0.5 / (math.sqrt(0.5) + GRPO_STD_EPS)
    assert grpo(_t([1.0, 0.0]))[0].tolist() == pytest.approx([half, -half], abs=1e-12)
    assert grpo(_t([1.0, 0.0]), normalize_std=False)[0].tolist() == [0.5, -0.5]
    both = _t([0.3, 0.3, 0.3, NAN], [1.0, 0.1, 0.3, 0.9])  # 0.3 - 1.0 three times does not average back exactly
    for fn in (rloo, grpo):
        out = fn(both)
        assert (out[0] == 0).all()
        torch.testing.assert_close(out[1:], fn(both[1:]), rtol=0, atol=1e-12)


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1():
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(rloo(rewards), 6 / 5 * grpo(rewards, normalize_std=False), rtol=0, atol=1e-12)


def test_equal_rewards_give_exactly_zero():
    """Also beside a missing reward (and beside another group: test_groups_of_two): 0.7 + 0.7 + 0.7 is
    2.0999999999999996, so only the shift by the group's own largest reward makes these exactly 0."""
    for rewards in (_t([0.7] * 4), _t([0.0] * 8), _t([1.0, 1.0, NAN]), _t([0.7, 0.7, 0.7, NAN])):
        for advantages in (rloo(rewards), grpo(rewards), grpo(rewards, normalize_std=False)):
            assert torch.isfinite(advantages).all() and (advantages == 0).all()


def test_a_missing_reward_leaves_the_others_advantages_unchanged():
    with_missing, without = _t([0.8, NAN, 0.6, 0.5]), _t([0.8, 0.6, 0.5])
    for fn in (rloo, grpo, lambda r: grpo(r, normalize_std=False)):
        got = fn(with_missing)[0]
        assert got[1] == 0
        torch.testing.assert_close(got[[0, 2, 3]], fn(without)[0], rtol=0, atol=1e-12)


def test_seven_against_one_stays_bounded():
    """[1] * 7 + [0]: mean 0.875, sample std sqrt(8 * 0.875 * 0.125 / 7) = sqrt(1/8) = 0.35355; the lone 0 gets
    -0.875 / 0.35365 = -2.474, the largest |z| a sample std allows with 8 values ((G - 1) / sqrt(G) = 2.4749)."""
    advantages = grpo(_t([1.0] * 7 + [0.0]))[0]
    assert advantages[-1].item() == pytest.approx(-0.875 / (math.sqrt(1 / 8) + GRPO_STD_EPS), abs=1e-12)
    assert advantages[:-1].tolist() == pytest.approx([0.125 / (math.sqrt(1 / 8) + GRPO_STD_EPS)] * 7, abs=1e-12)
    assert advantages.abs().max() <= 7 / math.sqrt(8)


# --------------------------------------------------------------------------
# GAE


def test_gae_hand_values():
    """Rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lambda 0.95; the value after the last token is 0:
    delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]; A_2 = 0.3, A_1 = 0.1 + 0.95 * 0.3 = 0.385,
    A_0 = 0.1 + 0.95 * 0.385 = 0.46575; returns = A + V = [0.96575, 0.985, 1.0]. With lambda 1 the returns are the
    Monte Carlo return, 1.0 everywhere."""
    rewards, values, mask = _t([0, 0, 1.0]), _t([0.5, 0.6, 0.7]), _t([1, 1, 1.0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    assert gae(rewards, values, mask, gamma=1.0, lam=1.0)[1][0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert gae(rewards, values, mask)[0][0].tolist() == pytest.approx([0.46575, 0.385, 0.3])  # defaults 1.0, 0.95


def test_gae_loop_equals_the_vectorised_form_with_padding():
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's span, in float64, for spans padded left, right and both."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 8, generator=g, dtype=torch.float64)
    values = torch.randn(3, 8, generator=g, dtype=torch.float64)
    spans = [(0, 5), (3, 8), (2, 6)]
    mask = torch.zeros(3, 8, dtype=torch.float64)
    for row, (start, end) in enumerate(spans):
        mask[row, start:end] = 1
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.zeros_like(advantages)
    for row, (start, end) in enumerate(spans):
        v = torch.cat([values[row, start:end], torch.zeros(1, dtype=torch.float64)])
        delta = rewards[row, start:end] + gamma * v[1:] - v[:-1]
        n = end - start
        powers = torch.tensor([[(gamma * lam) ** (j - i) if j >= i else 0.0 for j in range(n)] for i in range(n)],
                              dtype=torch.float64)
        expected[row, start:end] = powers @ delta
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_hand_values():
    """log_ratio = log pi - log pi_ref = ln 2: k1 = ln 2 = 0.693147, k2 = (ln 2)^2 / 2 = 0.240227,
    k3 = exp(-ln 2) - 1 + ln 2 = 0.5 - 1 + 0.693147 = 0.193147; at ratio 1 all three are exactly 0."""
    policy, ref = _t([math.log(0.5), math.log(0.3)]), _t([math.log(0.25), math.log(0.3)])
    assert kl_penalty(policy, ref, "k1")[0].tolist() == pytest.approx([math.log(2), 0.0], abs=1e-15)
    assert kl_penalty(policy, ref, "k2")[0].tolist() == pytest.approx([math.log(2) ** 2 / 2, 0.0], abs=1e-15)
    assert kl_penalty(policy, ref, "k3")[0].tolist() == pytest.approx([0.5 - 1 + math.log(2), 0.0], abs=1e-15)
    assert (kl_penalty(policy, ref, "k3")[0, 1] == 0).all()
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    zero = torch.zeros_like(x)
    assert (kl_penalty(x, zero, "k3") >= 0).all() and (kl_penalty(x, zero, "k2") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(x, x, "k4")


def _categorical(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    return theta, torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)


def test_kl_estimators_expected_gradients_are_the_documented_ones():
    """On a categorical policy, weighting each outcome by pi (detached) gives the estimators' exact expected
    gradients: k1's is 0 (sum pi grad log pi = grad sum pi = 0), k2's is grad KL(pi || pi_ref), k3's is
    grad KL(pi_ref || pi) (the module docstring's table)."""
    theta, ref = _categorical(3)

    def expected_grad(estimator):
        logp = theta.log_softmax(-1)
        loss = (logp.exp().detach() * kl_penalty(logp, ref, estimator)).sum()
        return torch.autograd.grad(loss, theta)[0]

    logp = theta.log_softmax(-1)
    reverse = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)[0]
    forward = torch.autograd.grad((ref.exp() * (ref - theta.log_softmax(-1))).sum(), theta)[0]
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k2"), reverse, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), forward, rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_a_kl_loss_step_with_zero_advantage_lowers_the_exact_kl(estimator):
    """Advantage 0 and beta = 0.1: the surrogate contributes nothing, and one SGD step on beta * KL estimate over
    4096 sampled tokens moves the policy towards the reference (a flipped sign would move it away)."""
    theta, ref = _categorical(4)
    exact_kl = lambda: (theta.softmax(-1) * (theta.log_softmax(-1) - ref)).sum().item()  # noqa: E731
    before = exact_kl()
    tokens = torch.multinomial(theta.detach().softmax(-1), 4096, replacement=True,
                               generator=torch.Generator().manual_seed(5))
    logp = theta.log_softmax(-1)[tokens].unsqueeze(0)  # (1, 4096)
    surrogate, _ = clipped_surrogate(logp, logp.detach(), torch.zeros_like(logp))
    per_token = surrogate + 0.1 * kl_penalty(logp, ref[tokens].unsqueeze(0), estimator)
    reduce_per_token(per_token, torch.ones_like(per_token)).backward()
    with torch.no_grad():
        theta -= 1.0 * theta.grad
    assert exact_kl() < before - 1e-3


# --------------------------------------------------------------------------
# surrogate losses


@pytest.mark.parametrize("advantage, ratio, loss, grad, clipped", [
    # A > 0: below the range the ratio may rise (gradient), inside too, above it the clip stops it
    (1.0, 0.5, -0.5, -0.5, 0.0), (1.0, 1.1, -1.1, -1.1, 0.0), (1.0, 1.5, -1.2, 0.0, 1.0),
    # A < 0: below the range the clip stops it, inside and above the gradient pushes the ratio down
    (-1.0, 0.5, 0.8, 0.0, 1.0), (-1.0, 1.1, 1.1, 1.1, 0.0), (-1.0, 1.5, 1.5, 1.5, 0.0),
])
def test_ppo_clipping_cases(advantage, ratio, loss, grad, clipped):
    """-min(r A, clip(r, 0.8, 1.2) A) and its gradient in log pi: d(-r A)/d log pi = -r A where the unclipped term
    is taken, 0 where the clipped one is (e.g. A = 1, r = 1.5: -min(1.5, 1.2) = -1.2, no gradient)."""
    old = math.log(0.4)  # pi_old(token) = 0.4, pi = 0.4 * ratio
    logp = torch.tensor([[old + math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out, metrics = clipped_surrogate(logp, torch.tensor([[old]], dtype=torch.float64),
                                     torch.tensor([[advantage]], dtype=torch.float64))  # default clip 0.2
    out.sum().backward()
    assert out.item() == pytest.approx(loss) and logp.grad.item() == pytest.approx(grad)
    assert metrics["clipfrac"].item() == clipped and metrics["clipfrac"].dtype == torch.float64
    assert metrics["approx_kl"].item() == pytest.approx(ratio - 1 - math.log(ratio))


def test_clip_higher_has_two_bounds():
    """clip_low 0.2, clip_high 0.28: A > 0 passes r = 1.25 and clips at 1.28 (r = 1.3 -> -1.28); A < 0 clips at
    0.8 (r = 0.79 -> 0.8) and passes r = 0.81."""
    ratios = torch.tensor([[1.25, 1.3, 0.79, 0.81]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, metrics = clipped_surrogate(ratios.log(), torch.zeros_like(ratios), advantages, clip_low=0.2, clip_high=0.28)
    assert loss[0].tolist() == pytest.approx([-1.25, -1.28, 0.8, 0.81])
    assert metrics["clipfrac"][0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_gspo_uses_the_geometric_mean_ratio_of_each_sequence():
    """Old log-probs -1 everywhere. Sequence 1: token log-ratios 0.1, 0.3, 0.2 (a fourth token padded),
    s = exp(0.2) = 1.2214, A = 2, clip (1 - 0.3, 1 + 0.3) leaves it: loss -2.4428 on each of its tokens. Sequence 2:
    log-ratios 0.5, 0.5, s = 1.6487, A = 2: clipped to -2 * 1.3 = -2.6. Sequence 3: the same ratio, A = -1:
    -min(-1.6487, -1.3) = 1.6487. Sequence 4: log-ratios -0.5, -0.5, s = 0.6065, A = -1: clipped below,
    -min(-0.6065, -0.7) = 0.7. Sequence 5, one token, log-ratio 0.2, A = 1: -1.2214. The sequence-mean reduction is
    their mean."""
    ratios = torch.tensor([[0.1, 0.3, 0.2, 9.0], [0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [-0.5, -0.5, 0, 0],
                           [0.2, 0, 0, 0]], dtype=torch.float64)
    old = -torch.ones(5, 4, dtype=torch.float64)
    new = (old + ratios).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    loss, metrics = gspo_surrogate(new, old, torch.tensor([2.0, 2.0, -1.0, -1.0, 1.0], dtype=torch.float64), mask,
                                   clip_low=0.3, clip_high=0.3)
    expected = [-2 * math.exp(0.2), -2.6, math.exp(0.5), 0.7, -math.exp(0.2)]
    assert loss[:, 0].tolist() == pytest.approx(expected) and loss[:4, 1].tolist() == pytest.approx(expected[:4])
    assert loss[0, 3] == 0 and loss[1, 2] == 0 and loss[4, 1] == 0
    assert metrics["clipfrac"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0] and metrics["clipfrac"].dtype == torch.float64
    reduced = reduce_per_token(loss, mask, "sequence_mean")
    assert reduced.item() == pytest.approx(sum(expected) / 5)
    (5 * reduced).backward()
    # d(-A s)/d log pi_t = -A s / n for each of the n tokens; the clipped sequences have no gradient
    assert new.grad[0].tolist() == pytest.approx([-2 * math.exp(0.2) / 3] * 3 + [0.0])
    assert new.grad[1].tolist() == pytest.approx([0.0] * 4) and new.grad[3].tolist() == pytest.approx([0.0] * 4)


def test_default_clip_ranges():
    """PPO 0.2 both ways; GSPO 3e-4 below and 4e-4 above (s = exp(+-0.01) clips to 1.0004 and 0.9997); CISPO's
    weight at most 1.28; the value loss's clip 0.2 (V 1.0 against old 0.5 and R 0: the clipped 0.7 is nearer, so
    0.5 * 1.0)."""
    one = torch.ones(1, 1, dtype=torch.float64)
    assert clipped_surrogate(one * math.log(1.5), 0 * one, one)[0].item() == pytest.approx(-1.2)
    assert clipped_surrogate(one * math.log(0.5), 0 * one, -one)[0].item() == pytest.approx(0.8)
    assert gspo_surrogate(one * 0.01, 0 * one, one, one)[0].item() == pytest.approx(-1.0004)
    assert gspo_surrogate(one * -0.01, 0 * one, -one, one)[0].item() == pytest.approx(0.9997)
    logp = (one * math.log(1.5)).requires_grad_(True)
    cispo_surrogate(logp, 0 * one, one)[0].sum().backward()
    assert logp.grad.item() == pytest.approx(-1.28)
    assert clipped_value_loss(one, one * 0.5, one * 0.0).item() == pytest.approx(0.5)
    assert clipped_value_loss(one * 0.8, one * 0.5, one).item() == pytest.approx(0.045)


def test_cispo_keeps_the_gradient_where_ppo_clips():
    """Old log-prob -1. r = 1.5, A = 2: PPO clips (no gradient); CISPO's weight is clip(1.5, max=1.28) = 1.28,
    detached, so the loss is -1.28 * 2 * log pi and its gradient in log pi is -2.56. r = 0.5 is left alone (no lower
    bound): gradient -1.0; with clip_low 0.2 its weight is 0.8: gradient -1.6."""
    old = -torch.ones(1, 2, dtype=torch.float64)
    logp = (old + torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64)).requires_grad_(True)
    two = 2 * torch.ones(1, 1, dtype=torch.float64)
    loss, metrics = cispo_surrogate(logp, old, two, clip_high=0.28)
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.56, -1.0])
    assert loss[0].tolist() == pytest.approx([-2.56 * logp[0, 0].item(), -1.0 * logp[0, 1].item()])
    assert metrics["clipfrac"][0].tolist() == [1.0, 0.0] and metrics["clipfrac"].dtype == torch.float64
    logp.grad = None
    loss, metrics = cispo_surrogate(logp, old, two, clip_high=0.28, clip_low=0.2)
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.56, -1.6]) and metrics["clipfrac"][0].tolist() == [1.0, 1.0]


def test_clipped_value_loss_hand_values():
    """0.5 max((V - R)^2, (old + clip(V - old, +-0.2) - R)^2): V 1.0, old 0.5, R 0 -> max(1, 0.49) / 2 = 0.5;
    V 0.6, old 0.5, R 1 -> inside the clip, 0.16 / 2 = 0.08; V 0.2, old 0.5, R 1 -> max(0.64, 0.49) / 2 = 0.32;
    V 0.8, old 0.5, R 1 -> the clipped value 0.7 is further: max(0.04, 0.09) / 2 = 0.045; V 0.2, old 0.5, R 0 ->
    clipped 0.3: max(0.04, 0.09) / 2 = 0.045; V 0.55, old 0.5, R 0 -> inside: 0.3025 / 2 = 0.15125."""
    values, old = _t([1.0, 0.6, 0.2, 0.8, 0.2, 0.55]), _t([0.5] * 6)
    returns = _t([0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert clipped_value_loss(values, old, returns, clip=0.2)[0].tolist() == pytest.approx(
        [0.5, 0.08, 0.32, 0.045, 0.045, 0.15125])
    assert clipped_value_loss(values, old, returns, clip=None)[0].tolist() == pytest.approx(
        [0.5, 0.08, 0.32, 0.02, 0.02, 0.15125])


# --------------------------------------------------------------------------
# reduction


def _two_completions():
    """Lengths 4 and 7 (padded to 7), the same advantage 1, log-probs as leaves."""
    logp = torch.zeros(2, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.float64)
    mask[0, :4], mask[1, :7] = 1, 1
    return logp, mask


@pytest.mark.parametrize("mode, equal", [("token_mean", True), ("fixed_length", True), ("sequence_mean", False)])
def test_equal_advantages_give_equal_token_gradients_except_under_sequence_mean(mode, equal):
    """Under token_mean (denominator 11 tokens) and fixed_length (2 x 7) each trained token's gradient is the same;
    under sequence_mean a token of the 4-token completion gets 1/4 / 2 and one of the 7-token completion 1/7 / 2.
    The losses: -11/11 = -1, -11/14 and -(1 + 1) / 2 = -1."""
    logp, mask = _two_completions()
    loss, _ = clipped_surrogate(logp, logp.detach(), torch.ones(2, 1, dtype=torch.float64))
    reduced = reduce_per_token(loss, mask, mode)
    assert reduced.item() == pytest.approx({"token_mean": -1.0, "fixed_length": -11 / 14, "sequence_mean": -1.0}[mode])
    reduced.backward()
    short, long = logp.grad[0, :4], logp.grad[1, :7]
    assert (logp.grad[0, 4:] == 0).all()
    if equal:
        assert torch.allclose(short, short[0]) and torch.allclose(long, short[0])
        assert short[0].item() == pytest.approx({"token_mean": -1 / 11, "fixed_length": -1 / 14}[mode])
    else:
        assert short[0].item() == pytest.approx(-1 / 8) and long[0].item() == pytest.approx(-1 / 14)


@pytest.mark.parametrize("mode", [m.value for m in Reduction if m != Reduction.sum])
def test_four_micro_batches_give_the_loss_and_gradient_of_one_step(mode):
    """Eight completions of random lengths, as one batch or as four micro-batches of two whose losses are summed with
    the whole step's denominator (tokens, sequences, or sequences x 7): the same loss and gradient."""
    g = torch.Generator().manual_seed(6)
    old = torch.randn(8, 7, generator=g, dtype=torch.float64)
    start = old + 0.1 * torch.randn(8, 7, generator=g, dtype=torch.float64)
    advantages = torch.randn(8, 1, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 8, (8,), generator=g)
    mask = (torch.arange(7) < lengths.unsqueeze(1)).to(torch.float64)
    normalizer = {"token_mean": mask.sum(), "sequence_mean": 8, "fixed_length": 8 * 7}[mode]

    def run(chunks):
        logp = start.clone().requires_grad_(True)
        total = 0.0
        for rows in torch.arange(8).chunk(chunks):
            loss, _ = clipped_surrogate(logp[rows], old[rows], advantages[rows], clip_low=0.2, clip_high=0.28)
            part = reduce_per_token(loss, mask[rows], mode, normalizer=normalizer)
            part.backward()
            total += part.item()
        return total, logp.grad

    whole, micro = run(1), run(4)
    assert micro[0] == pytest.approx(whole[0], abs=1e-12)
    torch.testing.assert_close(micro[1], whole[1], rtol=0, atol=1e-12)
    # and the unsplit default denominators are the same ones
    logp = start.clone()
    loss, _ = clipped_surrogate(logp, old, advantages, clip_low=0.2, clip_high=0.28)
    assert reduce_per_token(loss, mask, mode).item() == pytest.approx(whole[0], abs=1e-12)


def test_process_advantages_hand_values():
    """Group steps [0.2, 0.8] (ending at tokens 1 and 3 of 4) and [0.5] (token 2 of 3): mean 0.5, sample std
    sqrt((0.09 + 0.09 + 0) / 2) = 0.3, normalised [-1, +1] and [0] (times 0.3 / (0.3 + 1e-4)); token t sums the steps
    ending at or after it: A -> [-1 + 1, -1 + 1, 1, 1] = [0, 0, 1, 1], B -> [0, 0, 0]."""
    from posttrain.advantages import process_advantages

    a, b = process_advantages([torch.tensor([0.2, 0.8]), torch.tensor([0.5])],
                              [torch.tensor([1, 3]), torch.tensor([2])], [4, 3])
    scale = 0.3 / (0.3 + 1e-4)
    assert torch.allclose(a, torch.tensor([0.0, 0.0, 1.0, 1.0]) * scale, atol=1e-6)
    assert torch.allclose(b, torch.zeros(3), atol=1e-6)
    # steps [1.0] and [0.0]: +/- 1 / sqrt(2) on every token up to the step's end, 0 after it
    c, d = process_advantages([torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([0]), torch.tensor([1])],
                              [2, 2])
    z = 0.5 / (2 ** -0.5 + 1e-4)
    assert torch.allclose(c, torch.tensor([z, 0.0])) and torch.allclose(d, torch.tensor([-z, -z]))
    assert [t.tolist() for t in process_advantages([torch.tensor([0.7])], [torch.tensor([0])], [3])] == [[0.0] * 3]


def test_process_advantages_keep_the_dtype_and_handle_no_steps():
    """float64 step scores give float64 advantages; a group with no scored step gives zeros of each length."""
    from posttrain.advantages import process_advantages

    a, b = process_advantages([torch.tensor([0.2, 0.8], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)],
                              [torch.tensor([0, 1]), torch.tensor([0])], [2, 1])
    assert a.dtype == b.dtype == torch.float64
    assert [t.tolist() for t in process_advantages([], [], [3, 1])] == [[0.0] * 3, [0.0]]
    assert all(t.dtype == torch.float32 for t in process_advantages([], [], [2]))


def test_truncated_is_weights_hand_values():
    """pi_old / pi_sampler for three tokens: 0.5 / 0.25 = 2, 0.2 / 0.4 = 0.5, 0.3 / 0.3 = 1; truncated at 1.5 the
    first is 1.5 and the others stay. Detached (a weight, not a path for the gradient); a cap <= 0 is refused."""
    old = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3)]], requires_grad=True)
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    weights = truncated_is_weights(old, sampler, cap=1.5)
    assert weights[0].tolist() == pytest.approx([1.5, 0.5, 1.0], abs=1e-6)
    assert not weights.requires_grad
    assert truncated_is_weights(old, sampler, cap=3.0)[0].tolist() == pytest.approx([2.0, 0.5, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, sampler, cap=0.0)
