"""Small statistics over plain lists of rewards (pure Python): means, correlations, win-rates."""

from __future__ import annotations

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
