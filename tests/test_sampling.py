"""Selection rules and inference-time-scaling metrics (posttrain.maths.selection) against the book and brute force;
the small statistics of posttrain.maths.stats by hand and against the standard library."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from posttrain.maths.selection import (
    best_of_n_kl,
    best_worst_pairs,
    maj_at_k,
    majority_vote,
    ordered_pairs,
    pass_at_k,
    powers_of_two,
    select_top_k,
    select_top_per_prompt,
    verifier_plus_standardized,
)
from posttrain.maths.stats import mean_or_nan, pearson, win_rate

BOOK_R = [[.7, .3, .5, .2], [.4, .8, .6, .5], [.9, .3, .4, .7], [.2, .5, .8, .6], [.5, .4, .3, .6]]


def test_book_worked_example():
    """RLHF book, rejection sampling: per-prompt picks [1,2,1,3,4] (1-indexed), global top-5 [8,5,14,0,11]."""
    assert [j + 1 for j in select_top_per_prompt(BOOK_R)] == [1, 2, 1, 3, 4]
    assert select_top_k(BOOK_R, 5) == [8, 5, 14, 0, 11]


def test_ties_and_unscored_entries_are_deterministic():
    R = [[0.5, 0.5, None], [None, None, None], [0.1, float("nan"), 0.1]]
    assert select_top_per_prompt(R) == [0, -1, 0]
    assert select_top_k(R, 10) == [0, 1, 6, 8]  # ties in row-major order; None/NaN never selected
    assert select_top_k(R, 0) == []
    with pytest.raises(ValueError):
        select_top_k([[1.0], [1.0, 2.0]], 1)


def test_best_worst_pairs():
    assert best_worst_pairs(BOOK_R) == [(0, 0, 3), (1, 1, 0), (2, 0, 1), (3, 2, 0), (4, 3, 2)]
    assert best_worst_pairs([[0.3, 0.3], [None, 0.2], [0.1, 0.9, 0.1]]) == [(2, 1, 0)]  # no preference, one scored
    # one text scored 0.51 and 0.50 in two batches: the worst is the other text, and a row of one text gives no pair
    assert best_worst_pairs([[0.51, 0.8, 0.50], [0.6, 0.5]], keys=[["a", "b", "a"], ["c", "c"]]) == [(0, 1, 2)]
    assert best_worst_pairs([[0.9, 0.50, 0.2]], keys=[["a", "b", "a"]]) == [(0, 0, 1)]


def test_verifier_plus_standardized_by_hand_and_against_statistics():
    """correct + R / sd(R), sd over every scored entry (population sd): here the scores 2, 0, -2, 0 have sd sqrt(2)."""
    R = [[2.0, 0.0, None], [-2.0, 0.0]]
    correct = [[False, True, True], [True, None]]
    got = verifier_plus_standardized(R, correct)
    assert got[0][0] == pytest.approx(math.sqrt(2)) and got[0][1] == pytest.approx(1.0)
    assert got[1][0] == pytest.approx(1 - math.sqrt(2))
    assert got[0][2] is None and got[1][1] is None  # unscored or unverifiable: never selected
    # the RM's favourite wrong reply (1.41 sd above the mean) outranks a right one the RM rates average
    assert best_worst_pairs(got) == [(0, 0, 1)]
    rng = random.Random(0)
    R = [[rng.gauss(3, 2) for _ in range(5)] for _ in range(4)]
    correct = [[rng.random() < 0.5 for _ in range(5)] for _ in range(4)]
    sd = statistics.pstdev([x for row in R for x in row])
    reference = [[float(c) + x / sd for x, c in zip(row, flags)] for row, flags in zip(R, correct)]
    assert verifier_plus_standardized(R, correct) == [pytest.approx(row, rel=1e-12) for row in reference]
    assert verifier_plus_standardized([[0.5, 0.5]], [[True, False]]) == [[1.5, 0.5]]  # no spread: sd taken as 1
    with pytest.raises(ValueError):
        verifier_plus_standardized([[0.5, 0.5]], [[True]])  # a verdict missing


def test_verified_best_worst_rows_pairs_best_and_worst_and_skips_empty_replies():
    from posttrain.stages.bestofn import verified_best_worst_rows

    rows = [{"prompt": "p0", "completions": ["right, plain", "wrong, liked", "", "right, liked"]},
            {"prompt": "p1", "completions": ["only", "only"]}]
    R = [[0.0, 1.0, -9.0, 1.0], [0.5, 0.2]]
    correct = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0]]
    pairs = verified_best_worst_rows(rows, R, correct)
    assert len(pairs) == 1  # the empty reply is never the worst; p1's two samples are one text
    assert pairs[0]["chosen"][0]["content"] == "right, liked"
    # scores 0, 1, 1, 0.5, 0.2 (the empty reply unscored): sd = 0.408, so the wrong reply the RM likes (0 + 2.45)
    # beats the right one it does not (1 + 0): the worst is "right, plain"
    sd = statistics.pstdev([0.0, 1.0, 1.0, 0.5, 0.2])
    assert pairs[0]["rejected"][0]["content"] == "right, plain"
    assert (pairs[0]["reward_chosen"], pairs[0]["reward_rejected"]) == (pytest.approx(1 + 1 / sd), pytest.approx(1.0))


def test_ordered_pairs_all_capped_and_deduplicated():
    # row 0: 0.7 > 0.5 > 0.3 > 0.2 -> all 6 ordered pairs; row 1: ties give none; None is never paired
    every = ordered_pairs([[.7, .3, .5, .2], [.4, .4], [.9, None, .1]], 0)
    assert sorted(every) == [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 3), (0, 2, 1), (0, 2, 3), (2, 0, 2)]
    capped = ordered_pairs([[.7, .3, .5, .2]] * 3, 2, seed=1)
    assert len(capped) == 6 and all(len([p for p in capped if p[0] == i]) == 2 for i in range(3))
    assert set(capped) <= {(i, a, b) for i in range(3) for (_, a, b) in every if _ == 0}
    assert ordered_pairs([[.7, .3, .5, .2]] * 3, 2, seed=1) == capped  # seeded
    # four samples that are two copies of two answers: one distinct pair, not four
    assert ordered_pairs([[1.0, 1.0, 0.0, 0.0]], 0, keys=[["a", "a", "b", "b"]]) == [(0, 0, 2)]
    # one text scored 0.51 and 0.50 in two batches is never a pair with itself
    assert ordered_pairs([[0.51, 0.50, 0.2]], 0, keys=[["a", "a", "b"]]) == [(0, 0, 2)]
    with pytest.raises(ValueError):
        ordered_pairs([[1.0]], -1)


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values():
    """n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5. n=10, c=3, k=1: c/n = 0.3. Large n stays finite."""
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    assert 0.0 < pass_at_k(1000, 1, 10) == pytest.approx(0.01)
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote_tie_rule():
    """The most common answer wins; on a tie the answer that appears first wins; None answers do not vote."""
    assert majority_vote([3, 5, 5, 3, 7]) == 3  # 3 and 5 both twice; 3 came first
    assert majority_vote([None, 5, None, 4, 4]) == 4
    assert majority_vote([None, None]) is None
    assert maj_at_k([3, 5, 5, 3, 7], truth=5, k=3) == 1.0  # first three: 3, 5, 5
    assert maj_at_k([3, 5, 5, 3, 7], truth=5, k=4) == 0.0  # 3 and 5 tie, 3 first
    assert maj_at_k([3, 5, 5, 3, 7], truth=3, k=1) == 1.0
    with pytest.raises(ValueError):
        maj_at_k([1, 2], truth=1, k=3)


def test_majority_vote_matches_counting_on_random_lists():
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice([None, 1, 2, 3]) for _ in range(rng.randint(1, 9))]
        voted = majority_vote(answers)
        given = [a for a in answers if a is not None]
        if not given:
            assert voted is None
            continue
        top = max(given.count(a) for a in set(given))
        assert given.count(voted) == top
        assert answers.index(voted) == min(answers.index(a) for a in set(given) if given.count(a) == top)


def test_best_of_n_kl():
    """log n - (n-1)/n: 0 at n=1, log 2 - 1/2 at n=2, increasing and below log n."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    values = [best_of_n_kl(n) for n in range(1, 65)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert all(v <= math.log(n) for n, v in enumerate(values, start=1))
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_powers_of_two():
    assert powers_of_two(16) == [1, 2, 4, 8, 16]
    assert powers_of_two(12) == [1, 2, 4, 8, 12]
    assert powers_of_two(1) == [1]


def test_empty_rows_and_two_scored_completions():
    """A prompt without completions picks -1; a prompt with exactly two scored, different rewards gives its pair."""
    assert select_top_per_prompt([[], [0.2]]) == [-1, 0]
    assert best_worst_pairs([[0.1, 0.9], [0.4, None, 0.3]]) == [(0, 1, 0), (1, 0, 2)]


def test_ordered_pairs_default_seed_is_zero():
    """The default draw is the seed-0 draw (seed 1 draws another pair here)."""
    R = [[.7, .3, .5, .2]]
    assert ordered_pairs(R, 2) == ordered_pairs(R, 2, seed=0) == [(0, 2, 1), (0, 0, 3)]
    assert ordered_pairs(R, 2, seed=1) != ordered_pairs(R, 2)


def test_maj_at_k_over_every_sample():
    """k = len(answers) is allowed: [3, 5, 5, 3, 7] ties 3 and 5 twice each, 3 came first."""
    assert maj_at_k([3, 5, 5, 3, 7], truth=3, k=5) == 1.0
    assert maj_at_k([3, 5, 5, 3, 7], truth=5, k=5) == 0.0


def test_selection_errors_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"^k must be >= 0, got -1$"):
        select_top_k([[1.0]], -1)
    with pytest.raises(ValueError, match=r"^every prompt needs the same number of completions for flat indices$"):
        select_top_k([[1.0], [1.0, 2.0]], 1)
    with pytest.raises(ValueError, match=r"^max_per_prompt must be >= 0, got -1$"):
        ordered_pairs([[1.0]], -1)
    with pytest.raises(ValueError, match=r"^need 0 <= c <= n and 1 <= k <= n, got n=3, c=4, k=1$"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"^k must be in 1\.\.2, got 3$"):
        maj_at_k([1, 2], truth=1, k=3)
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0$"):
        best_of_n_kl(0)


def test_mean_or_nan():
    assert mean_or_nan([1.0, 2.0, 6.0]) == 3.0
    assert mean_or_nan([0.5]) == 0.5
    assert math.isnan(mean_or_nan([]))


def test_pearson_hand_derived():
    """xs (1, 2, 3, 4), ys (2, 4, 5, 9): deviations (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4);
    cov = 4.5 + 0.5 + 0 + 6 = 11, var_x = 5, var_y = 26, r = 11 / sqrt(130) = 0.9647638. Reversing ys negates the
    deviations of x against them: r = -0.9647638 for ys (9, 5, 4, 2). Scaling a side (variance 26 -> 0.26) leaves r
    unchanged. A constant side gives 0."""
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(0.9647638, abs=1e-7)
    assert pearson([1, 2, 3, 4], [9, 5, 4, 2]) == pytest.approx(-0.9647638, abs=1e-7)
    assert pearson([1, 2, 3, 4], [0.2, 0.4, 0.5, 0.9]) == pytest.approx(0.9647638, abs=1e-7)
    assert pearson([1, 2, 3, 4], [2.0, 2.0, 2.0, 2.0]) == 0.0
    assert pearson([7, 7, 7], [1, 2, 3]) == 0.0


def test_pearson_matches_the_standard_library_and_ignores_offsets():
    """Against statistics.correlation; shifting both sides by -+1e6 (rewards far from zero) changes r by < 1e-9 (the
    deviations from the means are formed before multiplying, so no large offset enters the sums)."""
    import statistics

    rng = random.Random(3)
    for n in (2, 3, 10, 50):
        xs = [rng.gauss(0, 1) for _ in range(n)]
        ys = [0.5 * x + rng.gauss(0, 1) for x in xs]
        expected = statistics.correlation(xs, ys)
        assert math.isclose(pearson(xs, ys), expected, rel_tol=1e-12, abs_tol=1e-12)
        assert pearson([x + 1e6 for x in xs], [y - 1e6 for y in ys]) == pytest.approx(expected, abs=1e-9)


def test_win_rate_hand_values_and_errors():
    """A beats B on prompt 1, ties on 2, loses on 3: (1 + 0.5 + 0) / 3 = 0.5; all ties: 0.5; all wins: 1."""
    assert win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.3]) == 0.5
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert win_rate([3.0, 2.0], [1.0, 1.0]) == 1.0
    assert win_rate([0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0]) == 0.25
    for a, b in (([1.0, 2.0], [1.0]), ([], [])):
        with pytest.raises(ValueError, match=r"^win_rate needs two equally long, non-empty reward lists$"):
            win_rate(a, b)
