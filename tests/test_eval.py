"""`posttrain eval`: pass@k, maj@k, the win-rate and its intervals, length statistics and n-gram decontamination by
hand-derived values (the arithmetic in each docstring) and brute-force enumeration; the command end to end on a
tiny model, its numbers checked against the samples it writes."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from posttrain.cli import main
from posttrain.data.decontam import contamination, eval_grams, ngrams, row_strings, words
from posttrain.data.io import DataError, read_rows
from posttrain.data.prompts import prompt_messages
from posttrain.maths.selection import maj_at_k_unbiased, pass_at_k
from posttrain.maths.stats import bootstrap_interval, normal_interval, quantile, wilson_interval, win_scores
from posttrain.stages.eval import (
    answer_groups,
    length_stats,
    maj_at_ks,
    parse_ks,
    pass_at_ks,
    win_rate_report,
    _same_answer,
)

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


# ---------------------------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_unbiased_hand_values():
    """Chen et al.'s 1 - C(n-c, k) / C(n, k):
    n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7;  n=6, c=1, k=3: 1 - C(5,3)/C(6,3) = 1 - 10/20 = 0.5;
    n=5, c=2, k=4: n - c = 3 < 4, every 4-subset holds a correct sample: 1."""
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    assert pass_at_k(6, 1, 3) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(5, 2, 4) == 1.0


def test_pass_at_ks_averages_prompts():
    """Prompt 0: 1 of 4 correct; prompt 1: 2 of 4.
    pass@1 = (1/4 + 2/4) / 2 = 0.375.
    pass@2: prompt 0: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; prompt 1: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6;
    mean (0.5 + 5/6) / 2 = 2/3."""
    correct = [[True, False, False, False], [True, True, False, False]]
    result = pass_at_ks(correct, [1, 2])
    assert result["1"] == pytest.approx(0.375, abs=1e-12)
    assert result["2"] == pytest.approx(2 / 3, abs=1e-12)


def test_parse_ks():
    """Sorted and unique; empty = powers of two up to n; out of 1..n is an error naming --k."""
    assert parse_ks("16, 1,4,4", 16) == [1, 4, 16]
    assert parse_ks("", 8) == [1, 2, 4, 8]
    for bad in ("0", "1,17", "a,b"):
        with pytest.raises(ValueError, match="--k"):
            parse_ks(bad, 16)


# ---------------------------------------------------------------------------------------------------------------
# maj@k


def _brute_maj(answers, truth, k) -> float:
    """float64 reference: every k-subset, most common non-None answer; a t-way tie with the truth gives 1/t."""
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(answers)), k))
    for subset in subsets:
        counts = Counter(answers[i] for i in subset if answers[i] is not None)
        if truth is None or not counts:
            continue
        top = max(counts.values())
        leaders = [a for a, c in counts.items() if c == top]
        if truth in leaders:
            total += Fraction(1, len(leaders))
    return float(total / len(subsets))


def test_maj_at_k_unbiased_hand_values():
    """[A, A, B, C], truth A. k=1: 2/4 = 0.5. k=2: the 6 pairs are {A,A} win, {A,B} x2 and {A,C} x2 ties of two
    (1/2 each), {B,C} lost: (1 + 4 * 1/2) / 6 = 0.5. k=4: A has 2 votes against 1 and 1: 1.
    [A, B, B, None], truth A. k=2: {A,B} x2 ties (1/2 each), {A,None} win, {B,B} and {B,None} x2 lost: 2/6 = 1/3.
    k=3: {A,B,B} lost, {A,B,None} x2 ties (1/2 each), {B,B,None} lost: 1/4. No correct answer: 0.
    [A, A, B, B], k=4: a two-way tie, 1/2 (the first-k rule would give A)."""
    assert maj_at_k_unbiased(["A", "A", "B", "C"], "A", 1) == pytest.approx(0.5, abs=1e-12)
    assert maj_at_k_unbiased(["A", "A", "B", "C"], "A", 2) == pytest.approx(0.5, abs=1e-12)
    assert maj_at_k_unbiased(["A", "A", "B", "C"], "A", 4) == 1.0
    assert maj_at_k_unbiased(["A", "B", "B", None], "A", 2) == pytest.approx(1 / 3, abs=1e-12)
    assert maj_at_k_unbiased(["A", "B", "B", None], "A", 3) == pytest.approx(0.25, abs=1e-12)
    assert maj_at_k_unbiased(["A", "B", "B", None], None, 3) == 0.0
    assert maj_at_k_unbiased(["A", "A", "B", "B"], "A", 4) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="k must be in 1..2"):
        maj_at_k_unbiased(["A", "B"], "A", 3)


def test_maj_at_k_unbiased_equals_enumeration():
    """Random answer lists (with unanswered samples) against the subset-by-subset reference."""
    rng = random.Random(0)
    for _ in range(150):
        answers = [rng.choice([None, 1, 1, 2, 3]) for _ in range(rng.randint(1, 8))]
        truth = rng.choice([1, 2, 4])
        for k in range(1, len(answers) + 1):
            assert maj_at_k_unbiased(answers, truth, k) == pytest.approx(_brute_maj(answers, truth, k), abs=1e-12)


def test_maj_at_ks_averages_prompts():
    """Prompt 0: groups [0, 0, 1, 2], truth 0: maj@1 = 0.5, maj@2 = 0.5 (above). Prompt 1: [0, 1, None, None],
    truth None (no sample right): 0. Means: 0.25 and 0.25."""
    result = maj_at_ks([[0, 0, 1, 2], [0, 1, None, None]], [0, None], [1, 2])
    assert result == {"1": pytest.approx(0.25, abs=1e-12), "2": pytest.approx(0.25, abs=1e-12)}
    # first k: prompt 0 votes [0] right, [0, 0] right; prompt 1 votes [0] wrong, [0, 1] tie -> 0, wrong: 0.5, 0.5;
    # a prompt where nothing was answered and no answer is right never counts as right
    assert maj_at_ks([[0, 0, 1, 2], [0, 1, None, None]], [0, None], [1, 2], first_k=True) == {"1": 0.5, "2": 0.5}
    assert maj_at_ks([[None, None]], [None], [2], first_k=True) == {"2": 0.0}


def test_answer_groups_vote_together_when_math_verify_says_equal():
    """0.5, 1/2 and \\frac{1}{2} are one value (the verifier's comparison); 3 another; None does not vote. With a
    case-insensitive `same`, "X" joins "x" (the first member represents the group)."""
    assert answer_groups(["0.5", None, "1/2", "\\frac{1}{2}", "3", "3"], _same_answer) == [0, None, 0, 0, 1, 1]
    assert answer_groups(["x", "y", "X"], lambda a, b: a.lower() == b.lower()) == [0, 1, 0]
    assert answer_groups(["7", "7"], lambda a, b: False) == [0, 0]  # identical strings always vote together


# ---------------------------------------------------------------------------------------------------------------
# Win-rate and its intervals

TEN = [1.0] * 6 + [0.5] * 2 + [0.0] * 2  # 6 wins, 2 ties, 2 losses


def test_win_scores_per_prompt():
    """Prompt 0: pairs (0.9 vs 0.1) win, (0.2 vs 0.2) tie: (1 + 0.5) / 2 = 0.75. Prompt 1: (None vs 1) skipped,
    (0 vs 1) loss: 0. Prompt 2: nothing scored: None."""
    assert win_scores([[0.9, 0.2], [None, 0.0], [None, 1.0]],
                      [[0.1, 0.2], [1.0, 1.0], [2.0, None]]) == [0.75, 0.0, None]
    with pytest.raises(ValueError):
        win_scores([[1.0]], [])


def test_normal_interval_ten_prompts():
    """Mean (6 + 2 * 0.5) / 10 = 0.7. Squared deviations: 6 * 0.3^2 + 2 * 0.2^2 + 2 * 0.7^2 = 0.54 + 0.08 + 0.98
    = 1.6; sample variance 1.6 / 9; standard error sqrt(1.6 / 90) = 0.4 / 3 = 0.13333.
    95 %: 0.7 -+ 1.959964 * 0.13333 = 0.7 -+ 0.261329 -> [0.438671, 0.961329]."""
    low, high = normal_interval(TEN, 0.95)
    assert low == pytest.approx(0.7 - Z95 * 0.4 / 3, abs=1e-12) and low == pytest.approx(0.438671, abs=1e-6)
    assert high == pytest.approx(0.961329, abs=1e-6)
    assert normal_interval([0.5] * 4) == (0.5, 0.5)  # no spread, no width
    assert all(math.isnan(x) for x in normal_interval([1.0]))


def test_wilson_interval_ten_prompts():
    """p = 7/10, n = 10, z^2 = 3.841459: centre (0.7 + 3.841459/20) / (1 + 0.3841459) = 0.892073 / 1.384146
    = 0.644493; half-width 1.959964 / 1.384146 * sqrt(0.021 + 3.841459/400) = 1.416010 * sqrt(0.030604)
    = 1.416010 * 0.174939 = 0.247715 -> [0.396778, 0.892209]. At p = 1 (10 of 10): centre (1 + 0.192073) / 1.384146
    = 0.861234, half-width 1.416010 * sqrt(0.009604) = 1.416010 * 0.097998 = 0.138766 -> [0.722467, 1]: not
    empty, unlike the normal interval."""
    low, high = wilson_interval(7.0, 10, 0.95)
    assert (low, high) == (pytest.approx(0.396778, abs=2e-6), pytest.approx(0.892209, abs=2e-6))
    low, high = wilson_interval(10.0, 10, 0.95)
    assert (low, high) == (pytest.approx(0.722467, abs=2e-6), pytest.approx(1.0, abs=1e-12))
    with pytest.raises(ValueError):
        wilson_interval(11.0, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1.0, 10, 1.0)


def test_bootstrap_interval_follows_the_binomial():
    """Scores [0, 0, 1, 1, 1]: a resample's mean is S/5 with S ~ Binomial(5, 0.6). P(S = 0) = 0.4^5 = 0.0102 and
    P(S <= 1) = 0.0102 + 5 * 0.6 * 0.4^4 = 0.0870, so the 2.5 % quantile is 1/5 = 0.2; P(S = 5) = 0.6^5 = 0.078 >
    0.025, so the 97.5 % quantile is 1. With 4000 resamples the empirical shares sit far from the 0.025 cut-offs
    (about 41 of 4000 at S = 0, the cut at 100), so the interval is [0.2, 1.0] for any seed; a fixed seed repeats."""
    assert bootstrap_interval([0, 0, 1, 1, 1], 0.95, resamples=4000, seed=0) == (0.2, 1.0)
    assert bootstrap_interval([0, 0, 1, 1, 1], 0.95, resamples=4000, seed=7) == (0.2, 1.0)
    assert bootstrap_interval(TEN, resamples=300, seed=3) == bootstrap_interval(TEN, resamples=300, seed=3)
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_quantile_linear_interpolation():
    """[4, 1, 3, 2] sorted [1, 2, 3, 4]: q=0.9 at h = 3 * 0.9 = 2.7 -> 3 + 0.7 * (4 - 3) = 3.7; q=0.5 -> 2.5;
    q=0 and 1 the extremes."""
    assert quantile([4, 1, 3, 2], 0.9) == pytest.approx(3.7, abs=1e-12)
    assert quantile([4, 1, 3, 2], 0.5) == 2.5
    assert (quantile([4, 1, 3, 2], 0.0), quantile([4, 1, 3, 2], 1.0)) == (1, 4)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_win_rate_report():
    """The ten prompts plus one unscored: win-rate 0.7 over 10, 6 won / 2 tied / 2 lost; `ci` the chosen interval."""
    report = win_rate_report(TEN + [None], 0.95, 500, 0, "normal")
    assert report["win_rate"] == pytest.approx(0.7) and report["prompts"] == 10 and report["unscored_prompts"] == 1
    assert (report["prompts_won"], report["prompts_tied"], report["prompts_lost"]) == (6, 2, 2)
    assert [report["ci"]["low"], report["ci"]["high"]] == report["intervals"]["normal"]
    assert report["intervals"]["wilson"] == list(wilson_interval(7.0, 10, 0.95))
    assert win_rate_report([None], 0.95, 10, 0, "wilson")["prompts"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Length statistics


def test_length_stats():
    """Tokens [3, 5, 10, 2]: mean 5, median (3 + 5)/2 = 4, p90 at h = 2.7 of [2, 3, 5, 10]: 5 + 0.7 * 5 = 8.5.
    Words [2, 0, 3, 1]: mean 1.5, median 1.5, p90 at h = 2.7 of [0, 1, 2, 3]: 2.7. 3 of 4 stopped, 1 truncated."""
    rows = [{"lengths": [3, 5], "completions": ["a b", ""], "finish_reasons": ["stop", "length"]},
            {"lengths": [10, 2], "completions": ["x y z", "w"], "finish_reasons": ["stop", "stop"]}]
    stats = length_stats(rows)
    assert stats["tokens"] == {"mean": 5.0, "median": 4.0, "p90": pytest.approx(8.5)}
    assert stats["words"] == {"mean": 1.5, "median": 1.5, "p90": pytest.approx(2.7)}
    assert (stats["stop_rate"], stats["truncation_rate"]) == (0.75, 0.25)


# ---------------------------------------------------------------------------------------------------------------
# Decontamination


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TRAIN = [{"messages": [{"role": "user", "content": "The quick brown fox jumps"},
                       {"role": "assistant", "content": "over the lazy dog"}]},
         {"text": "Alpha beta, gamma delta!"}]
EVAL = [{"prompt": "the QUICK brown cat"},                        # line 1: "the quick brown" is shared
        {"prompt": "jumps over the"},                             # line 2: only across two training fields
        {"prompt": "beta gamma"},                                 # line 3: 2 < 3 words, found whole
        {"prompt": "gamma beta"},                                 # line 4: 2 words, not contiguous in training
        {"messages": [{"role": "system", "content": "the quick brown"}, {"role": "user", "content": "nothing here"},
                      {"role": "assistant", "content": "over the lazy dog"}]},     # line 5: system, answer ignored
        {"messages": [{"role": "user", "content": "alpha beta gamma"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "what now then"}]}]              # line 6: an earlier user turn


def _eval_rows(path):
    return [(row, prompt_messages(row)) for row in read_rows(path)]


def test_words_and_ngrams():
    """Lowercase word tokens, punctuation dropped; n-grams joined by a space; none when shorter than n."""
    assert words("Hello, World! It's 3.5") == ["hello", "world", "it", "s", "3", "5"]
    assert ngrams(["a", "b", "c", "d"], 3) == {"a b c", "b c d"}
    assert ngrams(["a", "b"], 3) == set()
    assert list(row_strings({"messages": [{"role": "user", "content": "x"}], "n": 3, "t": ["y"]})) == ["x", "y"]
    assert eval_grams([{"role": "user", "content": "one two"}, {"role": "user", "content": "a b c d"}], 3) == {
        "one two", "a b c", "b c d"}


def test_contamination_hand_built(tmp_path):
    """n = 3. Training 3-grams (each field alone): "the quick brown", "quick brown fox", "brown fox jumps",
    "over the lazy", "the lazy dog", "alpha beta gamma", "beta gamma delta". Line 1's 3-grams "the quick brown"
    (shared) and "quick brown cat": contaminated, overlap 1/2. Line 2 "jumps over the" spans two fields: clean.
    Line 3 "beta gamma" (2 words) appears contiguously: contaminated; line 4 "gamma beta" does not. Line 5's only
    user turn "nothing here" is clean (system turn and answer are not compared). Line 6's first user turn is a
    training 3-gram: contaminated (overlap 1 of 2 grams: "alpha beta gamma" and "what now then")."""
    train = _jsonl(tmp_path / "train.jsonl", TRAIN)
    rows = _eval_rows(_jsonl(tmp_path / "eval.jsonl", EVAL))
    report, flags = contamination(rows, str(train), n=3)
    assert flags == [True, False, True, False, False, True]
    assert (report["contaminated"], report["rows"], report["train_rows"]) == (3, 6, 2)
    assert report["rate"] == 0.5 and report["contaminated_rows"] == ["line 1", "line 3", "line 6"]
    assert report["examples"][0] == {"row": f"{tmp_path / 'eval.jsonl'}, line 1", "overlap": 0.5,
                                     "ngrams": ["the quick brown"]}
    assert report["examples"][1]["ngrams"] == ["beta gamma"] and report["examples"][1]["overlap"] == 1.0
    # a share threshold: line 1 and line 6 share 1/2 of their grams, line 3 all of its one
    _, flags = contamination(rows, str(train), n=3, min_overlap=0.6)
    assert flags == [False, False, True, False, False, False]


def test_contamination_bad_training_rows_name_file_and_line(tmp_path):
    rows = _eval_rows(_jsonl(tmp_path / "eval.jsonl", EVAL[:1]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine words"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2"):
        contamination(rows, str(broken), n=3)
    empty = _jsonl(tmp_path / "empty.jsonl", [{"text": "fine words"}, {"text": "?!", "id": 3}])
    with pytest.raises(DataError, match=r"empty\.jsonl, line 2: no text to compare"):
        contamination(rows, str(empty), n=3)


def test_eval_command_contamination_only_filters(tmp_path, capsys):
    """No model: the contamination check alone; --decontaminate writes the 3 clean rows (lines 2, 4, 5) verbatim."""
    train = _jsonl(tmp_path / "train.jsonl", TRAIN)
    prompts = _jsonl(tmp_path / "eval.jsonl", EVAL)
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", f"--prompts={prompts}", f"--train_data={train}", "--ngram=3", "--decontaminate",
                 f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["contamination"]["contaminated"] == 3 and "pass_at_k" not in result
    clean = [json.loads(line) for line in (tmp_path / "res" / "eval.clean.jsonl").read_text().splitlines()]
    assert clean == [EVAL[1], EVAL[3], EVAL[4]]
    assert "contaminated (3-gram)  3 of 6 rows (50.0%)" in capsys.readouterr().out
    # refuses to overwrite; bad eval rows name file, line and field
    assert main(["eval", f"--prompts={prompts}", f"--train_data={train}", f"--out={out}"]) == 2
    assert "exists" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    assert main(["eval", f"--prompts={bad}", f"--train_data={train}", f"--out={tmp_path / 'b.json'}"]) == 2
    assert "bad.jsonl, line 2, field 'prompt': empty text" in capsys.readouterr().err


def test_eval_command_refuses_incomplete_options(tmp_path, capsys):
    prompts = _jsonl(tmp_path / "eval.jsonl", EVAL)
    assert main(["eval", f"--prompts={prompts}"]) == 2
    assert "--model=DIR" in capsys.readouterr().err
    assert main(["eval", f"--prompts={prompts}", "--model=m", "--baseline=b", f"--out={tmp_path / 'x.json'}"]) == 2
    assert "--judge_reward" in capsys.readouterr().err
    assert main(["eval", f"--prompts={prompts}", "--model=m", "--decontaminate"]) == 2
    assert "--train_data" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0
    usage = capsys.readouterr().out
    for key in ("--k=", "--reward=", "--threshold=", "--baseline=", "--judge_reward=", "--ci=", "--reference=",
                "--train_data=", "--ngram=", "--decontaminate=", "--out="):
        assert key in usage


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny model


def test_eval_command_end_to_end(tiny_model_dir, world, tmp_path):
    """A randomly initialised tiny model on 12 world prompts, n = 8. First run: its final answers (the verifier's
    extraction). Second run, same seed (same samples), with each prompt's `answer` set to its first plain-number
    answer, so some samples are right. Then every number must follow from the samples file: pass@k from the
    `correct` flags by Chen's formula (pass@1 = the mean correctness), maj@k by subset enumeration over the answer
    groups; the baseline and the reference are the model itself: every pair ties (win-rate 0.5) and the KL is 0."""
    lines = (world.data / "rl_heldout.jsonl").read_text().splitlines()[:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    common = [f"--model={tiny_model_dir}", "--n=8", "--k=1,2,8", "--max_new_tokens=24", "--device=cpu", "--seed=0"]
    assert main(["eval", *common, f"--prompts={prompts}", f"--out={tmp_path / 'first.json'}"]) == 0
    first = [json.loads(line) for line in (tmp_path / "first.samples.jsonl").read_text().splitlines()]
    answered = [next((a for a in r["answers"] if a is not None and re.fullmatch(r"\d+", a)), None) for r in first]
    assert sum(a is not None for a in answered) >= 3  # enough answers for the checks below to bite
    rows = [dict(json.loads(line), answer=a if a is not None else "123456789") for line, a in zip(lines, answered)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "second.json"
    assert main(["eval", *common, f"--prompts={prompts}", f"--out={out}", f"--baseline={tiny_model_dir}",
                 "--judge_reward=gold", f"--reference={tiny_model_dir}"]) == 0
    result = json.loads(out.read_text())
    assert {"settings", "pass_at_k", "maj_at_k", "win_rate", "kl", "length", "correctness"} <= set(result)
    assert result["settings"]["n"] == 8 and result["prompts"] == 12
    samples = [json.loads(line) for line in (tmp_path / "second.samples.jsonl").read_text().splitlines()]
    assert [s["completions"] for s in samples] == [s["completions"] for s in first]  # same seed, same samples
    correct = [s["correct"] for s in samples]
    assert any(any(c) for c in correct)
    assert result["pass_at_k"]["1"] == pytest.approx(sum(map(sum, correct)) / 96, abs=1e-12)
    for k in (2, 8):
        expected = sum(pass_at_k(8, sum(c), k) for c in correct) / 12
        assert result["pass_at_k"][str(k)] == pytest.approx(expected, abs=1e-12)
    truths = [next((g for g, a in zip(s["answer_groups"], s["answers"]) if a == s["answer"]), None) for s in samples]
    for k in (1, 2, 8):
        expected = sum(_brute_maj(s["answer_groups"], t, k) for s, t in zip(samples, truths)) / 12
        assert result["maj_at_k"][str(k)] == pytest.approx(expected, abs=1e-12)
    for k in (1, 2, 8):  # the first k samples' vote, ties to the answer seen first
        right = 0
        for s, t in zip(samples, truths):
            votes = Counter(g for g in s["answer_groups"][:k] if g is not None)
            leaders = [g for g in s["answer_groups"][:k] if g is not None and votes[g] == max(votes.values())]
            right += bool(leaders) and leaders[0] == t
        assert result["maj_at_k_first_k"][str(k)] == pytest.approx(right / 12, abs=1e-12)
    win = result["win_rate"]
    assert win["win_rate"] == 0.5 and win["prompts_tied"] == 12 and win["ci"]["method"] == "wilson"
    assert win["ci"]["low"] < 0.5 < win["ci"]["high"]
    assert abs(result["kl"]["kl_nats"]) < 1e-4
    tokens = [x for s in samples for x in s["lengths"]]
    assert result["length"]["tokens"]["mean"] == pytest.approx(sum(tokens) / 96)
    assert result["length"]["stop_rate"] + result["length"]["truncation_rate"] == pytest.approx(1.0)
