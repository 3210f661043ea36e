"""Small statistics over plain lists of rewards (pure Python): means, correlations, win-rates, quantiles, and
confidence intervals for a win-rate (docs/evaluation.md has the formulas and why Wilson is the default)."""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Sequence


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean of a list of rewards; NaN for an empty one (nothing scored), so reports never divide by zero."""
    return sum(values) / len(values) if values else float("nan")


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (0 when either side is constant)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    vx = sum((x - mx) ** 2 for x in xs)
    vy = sum((y - my) ** 2 for y in ys)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else 0.0


def win_rate(rewards_a: Sequence[float], rewards_b: Sequence[float]) -> float:
    """Share of prompts where A's reward beats B's, ties counted half (AlpacaEval-style)."""
    if len(rewards_a) != len(rewards_b) or not rewards_a:
        raise ValueError("win_rate needs two equally long, non-empty reward lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards_a, rewards_b)) / len(rewards_a)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default, Hyndman-Fan type 7):
    position h = (n - 1) q in the sorted values, x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])."""
    if not values or not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile needs values and 0 <= q <= 1, got {len(values)} values and q={q}")
    xs = sorted(values)
    h = (len(xs) - 1) * q
    low = math.floor(h)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (h - low) * (xs[high] - xs[low])


def win_scores(rewards_a: Sequence[Sequence[float | None]],
               rewards_b: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per prompt, the mean over its paired samples j of 1 (A's reward above B's), 0.5 (equal) or 0 (below);
    pairs where either side is None (unscored) are left out, and a prompt with no scored pair gives None.
    ``rewards_a[i][j]`` and ``rewards_b[i][j]``: sample j of prompt i from policy A and from policy B."""
    if len(rewards_a) != len(rewards_b):
        raise ValueError(f"{len(rewards_a)} prompts for A but {len(rewards_b)} for B")
    scores: list[float | None] = []
    for row_a, row_b in zip(rewards_a, rewards_b):
        pairs = [(a, b) for a, b in zip(row_a, row_b, strict=True) if a is not None and b is not None]
        outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]
        scores.append(sum(outcomes) / len(outcomes) if outcomes else None)
    return scores


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def normal_interval(scores: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """mean +- z * s / sqrt(n), s the sample standard deviation (n - 1 denominator) of the per-prompt scores: the
    central-limit interval of a mean. Not clipped to [0, 1]; zero width when every score is equal; NaN for n < 2."""
    z = _z(confidence)
    n = len(scores)
    if n < 2:
        return float("nan"), float("nan")
    mean = sum(scores) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    return mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion p = successes / n (successes may be fractional: ties count half):
    (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n). Always inside [0, 1], and not empty at p = 0 or 1."""
    z = _z(confidence)
    if n < 1 or not 0.0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(scores: Sequence[float], confidence: float = 0.95, *, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean: ``resamples`` resamples of the n per-prompt scores with replacement (a
    local ``random.Random(seed)``: reproducible, the global RNG untouched), and the (1 - confidence)/2 and
    (1 + confidence)/2 quantiles (:func:`quantile`) of their means. Paired: a score already compares both policies
    on one prompt, so resampling prompts keeps each pair together."""
    _z(confidence)
    if not scores or resamples < 1:
        raise ValueError(f"bootstrap needs scores and resamples >= 1, got {len(scores)} scores, {resamples}")
    rng = random.Random(seed)
    n = len(scores)
    means = [sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    return quantile(means, (1 - confidence) / 2), quantile(means, (1 + confidence) / 2)
