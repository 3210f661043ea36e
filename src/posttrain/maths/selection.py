"""Selection rules and inference-time-scaling metrics over a reward matrix (pure Python, no torch).

R is the reward matrix of M prompts x N completions (RLHF book, rejection sampling): ``R[i][j]`` is the reward of
completion j of prompt i; ``None`` means "could not score" and is never selected. Ties are broken towards the lower
index (the earlier completion, the earlier prompt), so every rule is deterministic.

* :func:`select_top_per_prompt` — the book's first rule: the best completion of each prompt.
* :func:`select_top_k` — the book's second rule: the K best (prompt, completion) pairs over the whole matrix.
* :func:`best_worst_pairs` — on-policy preference pairs (best vs worst completion of each prompt), as in Tülu 3.
* :func:`verifier_plus_standardized` — one reward from a verifier and a reward model: correct (0/1) plus the RM's
  score in units of its standard deviation, for best-vs-worst pairs that weigh both.
* :func:`ordered_pairs` — every strictly ordered pair of a prompt's completions, distinct texts, up to K per prompt
  (more pairs from the same samples; Iterative RPO pairs correct with incorrect answers this way).
* :func:`pass_at_k` — the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).
* :func:`majority_vote` / :func:`maj_at_k` — self-consistency voting over final answers (the first k samples).
* :func:`maj_at_k_unbiased` — the expected maj@k over every k-subset of n >= k samples (ties split evenly).
* :func:`best_of_n_kl` — the analytic KL of best-of-n sampling from the base policy, log n - (n-1)/n.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

from posttrain.maths.stats import mean_or_nan  # noqa: F401  (also importable from here, its first home)

Matrix = Sequence[Sequence[float | None]]


def _value(x: float | None) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def select_top_per_prompt(R: Matrix) -> list[int]:
    """0-indexed best completion of each prompt (the first one on ties); -1 for a row with nothing scored.

    Book example: R = [[.7,.3,.5,.2],[.4,.8,.6,.5],[.9,.3,.4,.7],[.2,.5,.8,.6],[.5,.4,.3,.6]] -> [0, 1, 0, 2, 3].
    """
    picks = []
    for row in R:
        values = [_value(x) for x in row]
        best = max(range(len(values)), key=lambda j: (values[j], -j), default=-1)
        picks.append(best if best >= 0 and values[best] > -math.inf else -1)
    return picks


def select_top_k(R: Matrix, k: int) -> list[int]:
    """0-indexed flat (row-major, ``i * N + j``) indices of the ``k`` highest rewards, best first.

    Equal rewards keep row-major order. Unscored entries are never selected, so fewer than ``k`` may come back.
    Book example (R above, k = 5) -> [8, 5, 14, 0, 11].
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat = [(_value(x), i * len(row) + j) for i, row in enumerate(R) for j, x in enumerate(row)]
    if len({len(row) for row in R}) > 1:
        raise ValueError("every prompt needs the same number of completions for flat indices")
    ranked = sorted((item for item in flat if item[0] > -math.inf), key=lambda item: (-item[0], item[1]))
    return [index for _, index in ranked[:k]]


def best_worst_pairs(R: Matrix, *, keys: Sequence[Sequence[Hashable]] | None = None) -> list[tuple[int, int, int]]:
    """``(prompt, best, worst)`` per prompt whose best reward is strictly above its worst (ties: lowest index).

    ``keys`` (M x N, e.g. the completion texts): the worst is taken among the completions whose key differs from the
    best's (the same text sampled twice can score slightly differently in two batches; it is no pair with itself).
    """
    pairs = []
    for i, row in enumerate(R):
        scored = [(float(x), j) for j, x in enumerate(row) if _value(x) > -math.inf]
        if len(scored) < 2:
            continue
        best = min(scored, key=lambda item: (-item[0], item[1]))
        if keys is not None:
            scored = [item for item in scored if keys[i][item[1]] != keys[i][best[1]]]
            if not scored:
                continue
        worst = min(scored, key=lambda item: (item[0], item[1]))
        if best[0] > worst[0]:
            pairs.append((i, best[1], worst[1]))
    return pairs


def verifier_plus_standardized(R: Matrix, correct: Sequence[Sequence[bool | None]]) -> list[list[float | None]]:
    """``correct[i][j] + R[i][j] / sd(R)``: a verifier's verdict (1 right, 0 wrong) plus a reward model's score in
    units of its standard deviation over every scored completion, so one right answer weighs as much as one standard
    deviation of the RM's judgement. The verifier checks what the RM cannot (the arithmetic); the RM ranks what the
    verifier cannot (style, the request), between right answers and between wrong ones alike.

    ``None`` where either is None (unscored, unverifiable): never selected. The shift of R (its mean) does not matter
    to a per-prompt rule, so only its scale is fixed. Fewer than two scored entries, or all equal: sd is taken as 1.
    """
    scored = [float(x) for row in R for x in row if _value(x) > -math.inf]
    mean = sum(scored) / len(scored) if scored else 0.0
    var = sum((x - mean) ** 2 for x in scored) / len(scored) if scored else 0.0
    sd = math.sqrt(var) if var > 0 else 1.0
    return [[None if _value(x) == -math.inf or c is None else float(bool(c)) + float(x) / sd
             for x, c in zip(row, flags, strict=True)] for row, flags in zip(R, correct, strict=True)]


def ordered_pairs(R: Matrix, max_per_prompt: int, *, keys: Sequence[Sequence[Hashable]] | None = None,
                  seed: int = 0) -> list[tuple[int, int, int]]:
    """``(prompt, better, worse)`` for pairs of a prompt's completions with strictly different rewards, at most
    ``max_per_prompt`` per prompt (0 = all), drawn uniformly (seeded) from that prompt's candidates.

    ``keys`` (M x N, e.g. the completion texts) drops repeats: a (better, worse) pair of keys already taken for that
    prompt is skipped, so eight samples that are four copies of two answers give one pair, not sixteen; and a pair of
    equal keys is never made (the same text can score slightly differently in two batches). Pairs come
    out in prompt order; within a prompt in the random draw's order.
    """
    import random

    if max_per_prompt < 0:
        raise ValueError(f"max_per_prompt must be >= 0, got {max_per_prompt}")
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(R):
        values = [_value(x) for x in row]
        candidates, seen = [], set()
        for a in range(len(row)):
            for b in range(len(row)):
                if values[b] > -math.inf and values[a] > values[b]:
                    key = (keys[i][a], keys[i][b]) if keys is not None else (a, b)
                    if key not in seen and key[0] != key[1]:  # equal keys: one text scored twice (float noise)
                        seen.add(key)
                        candidates.append((i, a, b))
        rng.shuffle(candidates)
        pairs.extend(candidates[:max_per_prompt] if max_per_prompt else candidates)
    return pairs


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) to stay exact in floating point."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most common non-None answer. Tie rule: among equally common answers, the one that appears first.
    None if no answer was given."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def maj_at_k(answers: Sequence[Hashable | None], truth: Hashable, k: int) -> float:
    """1.0 if the majority vote over the first ``k`` sampled answers equals ``truth`` (samples are i.i.d., so the
    first k are a random draw of k), else 0.0. Ties follow :func:`majority_vote`."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must be in 1..{len(answers)}, got {k}")
    return float(majority_vote(answers[:k]) == truth)


def maj_at_k_unbiased(answers: Sequence[Hashable | None], truth: Hashable | None, k: int) -> float:
    """The expected maj@k when k of the n = len(answers) samples are drawn without replacement, every k-subset
    equally likely: the analogue for majority voting of pass@k's unbiased estimator (it uses all n samples, not
    the first k). Within a subset the most common non-None answer wins; a tie between t answers that include
    ``truth`` counts 1/t (a uniformly random tie-break); no answer at all counts 0.

    Exact, by counting instead of enumerating C(n, k) subsets: with c_g the count of answer g (c_t of ``truth``,
    c_0 of None), the subsets where the truth gets j votes, every other answer fewer than j except r that tie at
    j, number C(c_t, j) * [x^(k-j) y^r] prod_{g != t} (sum_{i<j} C(c_g, i) x^i + C(c_g, j) x^j y)
    * sum_i C(c_0, i) x^i; maj@k = sum_{j>=1, r} that count / (r + 1) / C(n, k).
    """
    from fractions import Fraction

    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    counts = Counter(a for a in answers if a is not None)
    c_true = counts.pop(truth, 0) if truth is not None else 0
    c_none = sum(a is None for a in answers)
    total = Fraction(0)
    for j in range(1, min(c_true, k) + 1):
        # poly[d][r]: ways to fill d more slots with r other answers tied at j votes (and none above j)
        poly = [[math.comb(c_none, d)] if d <= c_none else [0] for d in range(k - j + 1)]
        for c in counts.values():
            grown = [[0] * (len(poly[0]) + 1) for _ in range(k - j + 1)]
            for d, row in enumerate(poly):
                for r, ways in enumerate(row):
                    if not ways:
                        continue
                    for i in range(0, min(c, j, k - j - d) + 1):
                        grown[d + i][r + (i == j)] += ways * math.comb(c, i)
            poly = grown
        total += math.comb(c_true, j) * sum(Fraction(ways, r + 1) for r, ways in enumerate(poly[k - j]))
    return float(total / math.comb(n, k))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) = log n - (n - 1) / n (an upper bound for discrete policies; Beirami et al.)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``, with ``limit`` itself last if it is not a power of two."""
    ns = []
    n = 1
    while n < limit:
        ns.append(n)
        n *= 2
    return ns + [limit]
