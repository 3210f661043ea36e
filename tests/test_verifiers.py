"""RLVR verifiers (posttrain.verifiers): answer extraction, math_reward against a suite of tricky strings with its
false-positive / false-negative counts pinned (docs/verifiers.md records them), the wall-clock deadline on
pathological inputs from threads and processes, the format reward, and the VERIFIERS entries."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from posttrain.rewards import reward_from_spec
from posttrain.verifiers import (VERIFIERS, extract_answer, extract_code, final_answer_text, format_reward,
                                 math_answer, math_reward, math_rewards)

# (completion, gold answer, truth): truth is whether the completion's final answer really is the gold answer.
# docs/verifiers.md's table lists the cases math_reward gets wrong.
TRICKY = [
    # equivalent forms
    ("The answer is 1/2.", "0.5", 1),
    ("So x = \\boxed{\\frac{1}{2}}", "0.5", 1),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),
    ("The total is 1,000 dollars. The answer is 1,000", "1000", 1),
    ("#### 1000", "1,000", 1),
    ("The answer is \u22123", "-3", 1),  # unicode minus
    ("\\boxed{\u22123}", "-3", 1),
    ("Therefore \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1),
    ("\\boxed{\\tfrac34}", "0.75", 1),
    ("The solution set is \\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1),
    ("\\boxed{(1, 2]}", "(1,2]", 1),
    ("\\boxed{[-1, 3)}", "[-1,3)", 1),
    ("The answer is 50%", "0.5", 1),
    ("The answer is 12 apples.", "12", 1),
    ("\\boxed{12\\text{ apples}}", "12", 1),
    ("The answer is 5.", "5", 1),
    ("The answer is $5.00", "5", 1),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ("\\boxed{x = 5}", "5", 1),
    ("<think>Add them.</think><answer>42</answer>", "42", 1),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1),
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips in total.\n#### 72", 1),
    ("The answer is 0.3333333", "1/3", 1),  # within the relative tolerance 1e-6
    ("\\boxed{1.5}", "\\frac{3}{2}", 1),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1),
    ("\\boxed{10^{3}}", "1000", 1),
    ("Final answer: 7", "7", 1),
    ("\\boxed{A}", "A", 1),
    ("\\boxed{\\text{(B)}}", "B", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
    ("The answer is $\\frac{3}{4}$.", "0.75", 1),
    ("x = 2 or x = 3, so \\boxed{2, 3}", "\\{2,3\\}", 1),
    ("Answer: \\boxed{\\frac{1}{2}} (approximately 0.5).", "1/2", 1),
    # wrong but close
    ("The answer is 0.333", "1/3", 0),
    ("\\boxed{12}", "120", 0),
    ("\\boxed{-5}", "5", 0),
    ("\\boxed{5}", "-5", 0),
    ("\\boxed{1000001}", "1000000", 0),  # integers compare exactly, whatever the tolerance
    ("\\boxed{(1, 2)}", "(1,2]", 0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{1, 2\\}", 0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}", 0),
    ("The answer is 3.14", "\\pi", 0),
    ("\\boxed{x + 1}", "x - 1", 0),
    ("\\boxed{1/2}", "2", 0),
    # extraction traps
    ("First, 3 + 4 = 7. Then 7 * 2 = 14. The answer is 14.", "14", 1),
    ("First, 3 + 4 = 7. Then 7 * 2 = 14. The answer is 14.", "7", 0),
    ("I first thought \\boxed{5}, but rechecking gives \\boxed{7}.", "7", 1),
    ("I first thought \\boxed{5}, but rechecking gives \\boxed{7}.", "5", 0),
    ("The answer is not 5; it is 7.", "7", 1),
    ("The answer is not 5; it is 7.", "5", 0),
    ("<think>The answer is 5.</think><answer>7</answer>", "7", 1),
    ("<think>The answer is 5.</think><answer>7</answer>", "5", 0),
    ("<think>maybe \\boxed{5}</think> The answer is 7", "7", 1),
    ("We get 48 clips in April and 24 in May, so 72 in total.", "72", 1),
    ("We get 72 in total: 48 in April and 24 in May.", "72", 1),  # the last number is not the answer
    ("The answer is 5 or maybe 6", "6", 0),  # a hedge is not an answer
    ("\\boxed{}", "5", 0),
    ("I don't know.", "5", 0),
    ("#### 18\n\nCheck: 9 + 9 = 18, and 99 is too many.", "18", 1),
    # prose after "answer is": its first number, or its last after a negation
    ("The answer is 5 because there are 2 red and 3 blue.", "5", 1),
    ("The answer is 5 because there are 2 red and 3 blue.", "3", 0),
    ("The answer is 6, not 7.", "6", 1),
    ("The answer is 6, not 7.", "7", 0),
    ("The answer is:\n\n42", "42", 1),
]
# Measured by test_tricky_suite_error_counts (docs/verifiers.md): the counts may only go down.
FALSE_POSITIVES = 0
FALSE_NEGATIVES = 1  # "We get 72 in total: 48 in April and 24 in May." (its last number is not the answer)
UNJUDGED = 0


def test_tricky_suite_size():
    assert len(TRICKY) >= 40
    assert {truth for _, _, truth in TRICKY} == {0, 1}


def test_tricky_suite_error_counts():
    """False positives (scored 1.0, truth 0), false negatives (scored 0.0, truth 1) and unjudged (None) on the suite
    equal what docs/verifiers.md records; a regression shows the offending cases."""
    scores = math_rewards([c for c, _, _ in TRICKY], [g for _, g, _ in TRICKY], workers=2)
    fp = [(c, g) for (c, g, t), s in zip(TRICKY, scores) if t == 0 and s == 1.0]
    fn = [(c, g) for (c, g, t), s in zip(TRICKY, scores) if t == 1 and s == 0.0]
    unjudged = [(c, g) for (c, g, _), s in zip(TRICKY, scores) if s is None]
    assert (len(fp), len(fn), len(unjudged)) == (FALSE_POSITIVES, FALSE_NEGATIVES, UNJUDGED), (fp, fn, unjudged)


@pytest.mark.parametrize("completion, answer", [
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("text \\boxed{\\{a\\}} more \\fbox{3} end", "3"),
    ("\\boxed 5", "5"),
    ("<answer>\\boxed{9}</answer> and \\boxed{4} outside", "9"),
    ("The answer is: 17", "17"),
    ("#### 1,234.", "1,234"),
    ("so the result is $x^2 + 1$", "x^2 + 1"),
    ("The answer is \\(\\frac{3}{4}\\).", "\\frac{3}{4}"),
    ("<think>5</think>", "5"),  # nothing after </think>: the whole completion
])
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_extract_answer_none_and_final_answer_text():
    assert extract_answer("no digits here") is None
    assert extract_answer("\\boxed{") is None
    assert final_answer_text("The answer is 24.") == "\\boxed{24}"
    assert final_answer_text("nothing") == ""


def test_cheap_path_decides_numbers_without_a_worker(monkeypatch):
    """Plain numbers and identical strings never reach math-verify (the RL loop's common case)."""
    import posttrain.verifiers as verifiers

    monkeypatch.setattr(verifiers, "_math_verify", lambda *a: pytest.fail("math-verify was called"))
    assert math_reward("The answer is 1,024.", "1024") == 1.0
    assert math_reward("#### 7", "7.0") == 1.0
    assert math_reward("\\boxed{\\frac{1}{4}}", "0.25") == 1.0
    assert math_reward("\\boxed{3}", "4") == 0.0
    assert math_reward("The answer is 0.5000001", "0.5") == 1.0  # rel. difference 2e-7 <= 1e-6
    assert math_reward("The answer is 0.5000001", "0.5", rel_tol=0) == 0.0
    assert math_reward("\\boxed{\\sin x}", "\\sin x") == 1.0  # identical strings


def test_none_when_the_gold_answer_cannot_be_judged():
    assert math_reward("The answer is 4.", None) is None
    assert math_reward("The answer is 4.", "  ") is None
    assert math_reward("\\boxed{4}", "\\frac{") is None  # math-verify cannot parse the gold answer
    assert math_reward("no answer at all", "4") == 0.0  # the completion's fault, not the gold's


@pytest.mark.parametrize("completion", [
    "\\boxed{9^9^9^9^9}",
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "The answer is " + "9" * 1_000_000,
    "x" * 1_000_000,
    "\\boxed{" * 100_000 + "1" + "}" * 100_000,
    "{" * 200_000 + "\\boxed{" + "{" * 200_000,
    "\\(" * 100_000,
])
def test_pathological_inputs_return_within_the_deadline(completion):
    math_reward("\\boxed{\\frac{1}{2}}", "\\sqrt{2}")  # a warm worker: the deadline is for the check itself
    started = time.monotonic()
    result = math_reward(completion, "\\frac{10}{3}", timeout_s=2.0)
    assert time.monotonic() - started < 2.0 + 1.5
    assert result in (0.0, None)


def test_timeout_kills_the_worker_and_scores_none():
    math_reward("\\boxed{\\frac{1}{2}}", "\\sqrt{2}")  # a warm worker: the deadline is for the check itself
    started = time.monotonic()
    assert math_reward("\\boxed{9^{9^{9^{9^{9}}}}}", "\\frac{10}{3}", timeout_s=1.0) is None
    assert time.monotonic() - started < 1.0 + 1.5
    assert math_reward("\\boxed{\\frac{2}{3}}", "\\frac{4}{6}") == 1.0  # the next check gets a fresh worker


def test_threads_in_parallel():
    """math-verify's signal.alarm fails off the main thread; ours does not use signals."""
    pairs = [("\\boxed{\\frac{%d}{2}}" % i, "%d/2" % i) for i in range(12)] + [("\\boxed{\\sqrt{4}}", "3")] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: math_reward(*p), pairs))
    assert results == [1.0] * 12 + [0.0] * 4
    errors = []
    thread = threading.Thread(target=lambda: errors.append(math_reward("\\boxed{x^2}", "x\\cdot x")))
    thread.start()
    thread.join(timeout=30)
    assert errors == [1.0]


def _in_child(queue):
    queue.put([math_reward("\\boxed{\\frac{6}{4}}", "1.5"), math_reward("\\boxed{\\sqrt{2}}", "2")])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_from_a_child_process(method):
    math_reward("\\boxed{\\sqrt{9}}", "3")  # the parent has a worker: a forked child must not use its pipes
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == [1.0, 0.0]
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0


def test_math_rewards_keeps_order_and_lengths():
    assert math_rewards([], []) == []
    completions = ["\\boxed{\\sqrt{4}}", "#### 3", "\\boxed{\\frac{1}{3}}", "nothing"]
    assert math_rewards(completions, ["2", "3", "0.5", "1"], workers=2) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_rewards(["a", "b"], ["1"])


@pytest.mark.parametrize("completion, score", [
    ("<think>add</think><answer>4</answer>", 1.0),
    ("  <think>\nadd\n</think>\n\n<answer> 4 </answer>\n", 1.0),
    ("<think></think><answer>4</answer>", 1.0),
    ("<answer>4</answer><think>add</think>", 0.0),  # order
    ("<think>add</think><answer></answer>", 0.0),  # empty answer
    ("Sure! <think>add</think><answer>4</answer>", 0.0),  # text outside
    ("<think>add</think><answer>4</answer> done", 0.0),
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # two thinks
    ("<think>add</think><answer>4</answer><answer>5</answer>", 0.0),
    ("<think>add<answer>4</answer></think>", 0.0),
    ("4", 0.0),
])
def test_format_reward(completion, score):
    assert format_reward(completion) == score


def test_verifiers_signature_and_reward_spec():
    """VerifierReward calls VERIFIERS[name](completion_text, **row_columns)."""
    assert VERIFIERS["math"] is math_answer
    assert math_answer("The answer is 1/2.", answer="0.5", prompt_id=3) == 1.0
    assert math_answer("The answer is 4.") is None
    reward = reward_from_spec("verifier:math")
    assert reward(["q1", "q2", "q3"], ["The answer is 24.", "\\boxed{23}", "..."], answer=["24", "24", None]) == [
        1.0, 0.0, None]
    assert reward_from_spec("verifier:format")(["q"], ["<think>a</think><answer>1</answer>"]) == [1.0]
    assert VERIFIERS["code"]("no tests column") is None


def test_extract_code():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```") == "print(2)\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"
