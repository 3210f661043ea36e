"""Verifiable rewards: checkers of a completion against a reference column, for rewards, best-of-N and RLVR.

Answer equivalence is math-verify's (``math_verify.parse`` / ``verify``: numbers, fractions, LaTeX, sets, ...), never a
hand-written comparison. Each checker has the verifier signature of :class:`posttrain.rewards.VerifierReward`:
``check(completion_text, **row_columns) -> float | None`` (None: nothing to check against).
"""

from __future__ import annotations

from typing import Any


def final_answer_text(completion: str) -> str:
    """The text the answer is read from: what follows the last "answer is" when there is one, else the whole reply
    (math-verify then takes the last expression it can parse)."""
    lowered = completion.lower()
    cut = lowered.rfind("answer is")
    return completion[cut + len("answer is"):] if cut >= 0 else completion


def math_answer(completion: str, answer: Any = None, **_: Any) -> float | None:
    """1.0 if the completion's final answer is mathematically equal to ``answer`` (math-verify), else 0.0."""
    if answer is None or str(answer).strip() == "":
        return None
    from math_verify import parse, verify

    gold = parse(str(answer))
    predicted = parse(final_answer_text(completion))
    if not gold or not predicted:
        return 0.0 if gold else None
    return 1.0 if verify(gold, predicted) else 0.0


VERIFIERS = {"math": math_answer}
"""Verifiers by name (``--reward=verifier:math``)."""
