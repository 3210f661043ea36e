"""The world's evaluation functions by hand: ``score_completions`` on given completions, and
``evaluate_reward_on_world`` on a tiny hand-written data dir (every metric computed in the docstrings) and on the
world's own held-out data against its gold reward."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.data.messages import completion_text
from posttrain.models.generation import Completion
from posttrain.world.evaluate import evaluate_reward_on_world, score_completions


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_score_completions_hand_values():
    """E = the end-of-turn token (in ``token_ids`` of a stopped reply, not counted in the length). No prompt carries
    a request, so the worked form (9 words for one step) is what concision allows:

      9 - 4 (answer 5, an int)  "9 - 4 = 5. The answer is 5."  stop, 9 + E: formatted, right, 9 words:
                                gold 1 + 0.3 + 0.4 + 0.2 = 1.9
      2 + 3 ("5")  "The answer is 4. No wait, the answer is 5."  stop, 12 + E: the last answer counts (right) but the
                   phrase appears twice (not formatted), 10 words (1 over): gold 1 + 0.4 + 0.2 (1 - 1/30) = 1.5933333
      4 + 4 ("8")  "The answer is 8."  length, 6: right and formatted text, but it never stopped (format_rate does
                   not count it), 4 words: gold 1.9
      6 + 1 ("7")  ""  stop, E only: no answer, 0 words: gold 0.4 + 0.2 = 0.6

    format_rate 1/4, accuracy 3/4, gold_reward 5.9933333 / 4 = 1.4983333, mean_length (9 + 12 + 6 + 0)/4 = 6.75,
    stop_rate 3/4; no requests, so request_rate is NaN and the per-style dict is empty."""
    E = 2
    rows = [{"prompt": _user("What is 9 - 4?"), "answer": 5}, {"prompt": _user("What is 2 + 3?"), "answer": "5"},
            {"prompt": _user("What is 4 + 4?"), "answer": "8"}, {"prompt": _user("What is 6 + 1?"), "answer": "7"}]
    completions = [Completion("9 - 4 = 5. The answer is 5.", [10] * 9 + [E], "stop"),
                   Completion("The answer is 4. No wait, the answer is 5.", [11] * 12 + [E], "stop"),
                   Completion("The answer is 8.", [12] * 6, "length"),
                   Completion("", [E], "stop")]
    metrics = score_completions(rows, completions)
    assert set(metrics) == {"format_rate", "accuracy", "request_rate", "gold_reward", "mean_length", "stop_rate",
                            "request_rate_by_style", "requests"}
    assert metrics.pop("request_rate_by_style") == {}
    assert metrics == pytest.approx({"format_rate": 0.25, "accuracy": 0.75, "request_rate": math.nan,
                                     "gold_reward": 1.4983333, "mean_length": 6.75, "stop_rate": 0.75,
                                     "requests": 0}, abs=1e-7, nan_ok=True)
    one = score_completions(rows[:1], completions[:1])
    assert one["gold_reward"] == pytest.approx(1.9) and one["format_rate"] == one["accuracy"] == 1.0


def test_score_completions_request_rates():
    """Three prompts: a terse request answered tersely (follows), a worked request answered tersely (does not), and
    no request (not counted): request_rate 1/2, per style terse 1.0 and worked 0.0. Gold: 1.9, then 1.3 + 0.2
    (the terse reply is short, nothing to charge) = 1.5, then 1.9 -> mean 5.3 / 3."""
    rows = [{"prompt": _user("What is 2 + 3? Just give me the number."), "answer": "5"},
            {"prompt": [{"role": "system", "content": "Show your work."}, *_user("What is 2 + 3?")], "answer": "5"},
            {"prompt": _user("What is 2 + 3?"), "answer": "5"}]
    completions = [Completion("The answer is 5.", [7] * 6 + [2], "stop")] * 3
    metrics = score_completions(rows, completions)
    assert metrics["request_rate"] == 0.5 and metrics["requests"] == 2
    assert metrics["request_rate_by_style"] == {"terse": 1.0, "worked": 0.0}
    assert metrics["gold_reward"] == pytest.approx(5.3 / 3)


# A tiny held-out set in the world's format. Words per reply in brackets; (+) right, (-) wrong, (?) no answer.
PAIRS = [  # (question, chosen, rejected)
    ("What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6."),  # 9 (+) vs 9 (-)
    ("What is 4 + 4?", "The answer is 8.", "I do not know the answer."),  # 4 (+) vs 6 (?)
    ("What is 6 + 1?", "6 + 1 = 7. The answer is 7.", "Let me think. 6 + 1 = 7. The answer is 7."),  # 9 (+) vs 12 (+)
    ("What is 3 + 3?", "First, 3 + 3 = 6. The answer is 6.", "3 + 3 = 7. The answer is 7."),  # 10 (+) vs 9 (-)
]
RANKINGS = [  # (question, completions)
    ("What is 2 + 3?", ["2 + 3 = 5. The answer is 5.", "The answer is 6.",  # 9 (+), 4 (-)
                        "Hmm. 2 + 3 = 5. So the answer is 5 for sure."]),  # 13 (+)
    ("What is 4 + 4?", ["4 + 4 = 9. The answer is 9. I am quite sure.", "The answer is 8."]),  # 12 (-), 4 (+)
    ("What is 6 + 1?", ["I am sure it is 8.", "I know that the answer is 7."]),  # 6 (-), 7 (+)
    ("What is 3 + 3?", ["The answer is 6.", "The answer is 7."]),  # 4 (+), 4 (-)
]


def _write_data_dir(path, pairs, rankings):
    """preference_heldout.jsonl and rankings_heldout.jsonl as posttrain.world.datagen writes them (plus a blank
    line at the end, which the reader skips)."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / "preference_heldout.jsonl").open("w") as f:
        for question, chosen, rejected in pairs:
            f.write(json.dumps({"prompt": _user(question), "chosen": _assistant(chosen),
                                "rejected": _assistant(rejected)}) + "\n")
        f.write("\n")
    with (path / "rankings_heldout.jsonl").open("w") as f:
        for question, completions in rankings:
            f.write(json.dumps({"prompt": _user(question), "completions": completions}) + "\n")
        f.write("\n")
    return path


def words(prompts, completions, **columns):
    """A length-loving reward: the reply's word count."""
    return [float(len(completion_text(c).split())) for c in completions]


def words_unless_unsure(prompts, completions, **columns):
    """The word count, or None (cannot score) for a reply that says "know" or "sure"."""
    texts = [completion_text(c) for c in completions]
    return [None if "know" in t or "sure" in t else float(len(t.split())) for t in texts]


NAN = math.nan
EMPTY_GROUPS = {"pair_accuracy_request": NAN, "request_pairs": 0, "pair_accuracy_request_shorter": NAN,
                "request_shorter_pairs": 0, "pair_accuracy_request_unseen_phrasing": NAN,
                "counterfactual_flip_rate": NAN, "counterfactual_rows": 0}


def test_reward_on_world_hand_values(tmp_path):
    """Word count on PAIRS (no requests; gold: 1.9 vs 0.9, 1.9 vs 0.6, 1.9 vs 1.88, 1.8933 vs 0.9): tie (0.5),
    4 < 6 (0), 9 < 12 (0), 10 > 9 (1) -> pair_accuracy 1.5 / 4 = 0.375. Pairs 1 and 4 give answers, one right
    (answer check: (0.5 + 1) / 2 = 0.75); pair 2's rejected reply gives no answer (surface: 0 / 1); pair 3's differ
    by 3 words of padding, 0.02 in gold (near tie: 0 / 1). No request pairs, no unseen or counterfactual files.
    RANKINGS: the longest is picked: 13 words (right), 12 (wrong), 7 (right), and the 4-4 tie goes to the first
    (right): top1 3/4; random_top1 = (2/3 + 1/2 + 1/2 + 1/2) / 4 = 13/24. The reward is the length, so
    length_correlation = 1."""
    report = evaluate_reward_on_world(words, _write_data_dir(tmp_path, PAIRS, RANKINGS))
    assert report == pytest.approx({"pair_accuracy": 0.375, "pairs": 4, "pair_accuracy_answer_check": 0.75,
                                    "answer_check_pairs": 2, "pair_accuracy_surface": 0.0, "surface_pairs": 1,
                                    "pair_accuracy_near_tie": 0.0, "near_tie_pairs": 1, **EMPTY_GROUPS,
                                    "top1_accuracy": 3 / 4, "random_top1": 13 / 24, "length_correlation": 1.0,
                                    "rankings": 4}, abs=1e-12, nan_ok=True)


def test_reward_on_world_skips_what_the_reward_cannot_score(tmp_path):
    """None for "know"/"sure": pair 2 drops out (its rejected reply is unscored): (0.5 + 0 + 1) / 3 = 0.5; answer
    check (0.5 + 1) / 2 = 0.75 over 2 pairs; no surface pair left; near tie 0 / 1. RANKINGS: 13 words (right) and
    12 (wrong) are unscored, so 9 words (right) and 4 words (right) win; the third ranking has nothing scored and
    counts as a miss; the fourth is the 4-4 tie (right): top1 3/4. random_top1 does not depend on the reward."""
    report = evaluate_reward_on_world(words_unless_unsure, _write_data_dir(tmp_path, PAIRS, RANKINGS))
    assert report == pytest.approx({"pair_accuracy": 0.5, "pairs": 3, "pair_accuracy_answer_check": 0.75,
                                    "answer_check_pairs": 2, "pair_accuracy_surface": NAN, "surface_pairs": 0,
                                    "pair_accuracy_near_tie": 0.0, "near_tie_pairs": 1, **EMPTY_GROUPS,
                                    "top1_accuracy": 3 / 4, "random_top1": 13 / 24, "length_correlation": 1.0,
                                    "rankings": 4}, abs=1e-12, nan_ok=True)


def test_reward_on_world_limit(tmp_path):
    """limit=1 reads the first pair and the first ranking only: pair_accuracy 0.5 (the tie), all of it answer-check
    (1 pair; the empty groups report NaN); top1 1 (13 words, right), random_top1 2/3."""
    report = evaluate_reward_on_world(words, _write_data_dir(tmp_path, PAIRS, RANKINGS), limit=1)
    assert report == pytest.approx({"pair_accuracy": 0.5, "pairs": 1, "pair_accuracy_answer_check": 0.5,
                                    "answer_check_pairs": 1, "pair_accuracy_surface": NAN, "surface_pairs": 0,
                                    "pair_accuracy_near_tie": NAN, "near_tie_pairs": 0, **EMPTY_GROUPS,
                                    "top1_accuracy": 1.0, "random_top1": 2 / 3, "length_correlation": 1.0,
                                    "rankings": 1}, abs=1e-12, nan_ok=True)


TERSE, WORKED = "What is 2 + 3? Just give me the number.", "What is 2 + 3? Show your work."
SHORT, LONG = "The answer is 5.", "2 + 3 = 5. The answer is 5."


def test_reward_on_world_request_groups_by_hand(tmp_path):
    """Request pairs, scored with the word count. Under the terse request the preferred reply is the shorter one
    (4 < 9 words: 0), under the worked request the longer one (9 > 4: 1): request 0.5, request_shorter 0 / 1. The
    unseen-phrasing pair is a terse request (0). The counterfactual row holds the same two replies under both
    requests: the word count prefers the long reply under both, so it does not flip (0); the gold reward flips (1).
    The file's chosen/rejected labels do not matter: the second pair is written the wrong way round."""
    data = _write_data_dir(tmp_path, [(TERSE, SHORT, LONG), (WORKED, SHORT, LONG)], [])
    (data / "preference_unseen.jsonl").write_text(json.dumps(
        {"prompt": _user("What is 2 + 3? Answer with the number alone."), "chosen": _assistant(SHORT),
         "rejected": _assistant(LONG)}) + "\n")
    (data / "counterfactual_heldout.jsonl").write_text(json.dumps(
        {"prompts": [_user(TERSE), _user(WORKED)], "completions": [SHORT, LONG]}) + "\n")
    report = evaluate_reward_on_world(words, data)
    assert report["pair_accuracy_request"] == 0.5 and report["request_pairs"] == 2
    assert report["pair_accuracy_request_shorter"] == 0.0 and report["request_shorter_pairs"] == 1
    assert report["pair_accuracy_request_unseen_phrasing"] == 0.0
    assert report["counterfactual_flip_rate"] == 0.0 and report["counterfactual_rows"] == 1
    from posttrain.rewards import GoldReward

    gold = evaluate_reward_on_world(GoldReward(), data)
    assert gold["pair_accuracy_request"] == gold["pair_accuracy_request_shorter"] == 1.0
    assert gold["pair_accuracy_request_unseen_phrasing"] == gold["counterfactual_flip_rate"] == 1.0


def test_reward_on_world_length_correlation(tmp_path):
    """One ranking (replies of 4 and 2 words) and one pair (3 and 1 words); the reward is looked up per reply.

    Rewards (1, 3, 2, 0) against lengths (4, 2, 3, 1): deviations (-0.5, 1.5, 0.5, -1.5) and (1.5, -0.5, 0.5, -1.5),
    cov = -0.75 - 0.75 + 0.25 + 2.25 = 1, both variances 5: r = 1/5 = 0.2.
    With the 2-word reply unscored: rewards (1, 2, 0), lengths (4, 3, 1): deviations (0, 1, -1) and
    (4/3, 1/3, -5/3), cov = 2, variances 2 and 14/3: r = 2 / sqrt(28/3) = sqrt(3/7) = 0.6546537."""
    data = _write_data_dir(tmp_path, [("What is 2 + 3?", "It is 5.", "6.")],
                           [("What is 2 + 3?", ["The answer is 5.", "Maybe 6."])])
    table = {"The answer is 5.": 1.0, "Maybe 6.": 3.0, "It is 5.": 2.0, "6.": 0.0}

    def lookup(prompts, completions, **columns):
        return [table[completion_text(c)] for c in completions]

    assert evaluate_reward_on_world(lookup, data)["length_correlation"] == pytest.approx(0.2, abs=1e-12)
    table["Maybe 6."] = None
    assert evaluate_reward_on_world(lookup, data)["length_correlation"] == pytest.approx(math.sqrt(3 / 7), abs=1e-12)


def test_gold_reward_on_the_world_held_out_data(world):
    """The gold reward prefers every held-out gold-preferred reply (whatever the annotators labelled); it ranks a
    right completion first exactly when a ranking has one (a right reply scores >= 1.3, a wrong one <= 0.9), and
    random_top1 is the mean share of right ones — both counted here from the files with the world's solver."""
    from posttrain.rewards import GoldReward
    from posttrain.world.gold import parse_final_answer
    from posttrain.world.tasks import solve

    report = evaluate_reward_on_world(GoldReward(), world.data)
    assert report["pair_accuracy"] == 1.0
    assert report["pair_accuracy_answer_check"] == 1.0 and report["pair_accuracy_surface"] == 1.0
    rankings = [json.loads(line) for line in (world.data / "rankings_heldout.jsonl").read_text().splitlines()]
    pairs = (world.data / "preference_heldout.jsonl").read_text().splitlines()
    right = [[parse_final_answer(c) == solve(r["prompt"][-1]["content"]) for c in r["completions"]] for r in rankings]
    rows = [json.loads(line) for line in pairs]
    ties = sum(GoldReward()([r["prompt"]], [r["chosen"]]) == GoldReward()([r["prompt"]], [r["rejected"]]) for r in rows)
    from posttrain.world.datagen import DEFAULT_SIZES, heldout_size

    assert report["pairs"] == len(pairs) - ties
    assert report["rankings"] == len(rankings) == heldout_size(DEFAULT_SIZES["rankings"])
    assert report["top1_accuracy"] == pytest.approx(sum(any(r) for r in right) / len(right), abs=1e-12)
    assert report["random_top1"] == pytest.approx(sum(sum(r) / len(r) for r in right) / len(right), abs=1e-12)
