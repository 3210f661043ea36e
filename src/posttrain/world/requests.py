"""Requests about the reply: the tiny world's preference dimension that depends on the prompt.

Most prompts carry a request, in the user turn or in the system prompt, in one of four styles:

============  =======================================  ===========================================================
style         canonical reply (``styled_reply``)       ``follows_request`` is true when the reply ...
============  =======================================  ===========================================================
``terse``     ``The answer is 85.``                    is that one sentence and nothing else
``worked``    ``37 + 48 = 85. The answer is 85.``      shows an equation per step of the question, no check line,
                                                       no warm opener
``checked``   ``37 + 48 = 85. Check: 85 - 48 = 37.``   shows the equations and a ``Check:`` line, no warm opener
              ``The answer is 85.``
``friendly``  ``Glad you asked! 37 + 48 = 85.``        opens with a warm sentence and has no check line
              ``The answer is 85.``
============  =======================================  ===========================================================

The reply that wins under one request loses under another, and the lengths cross: *terse* wants the shortest reply,
*checked* the longest, *worked* and *friendly* sit between (a friendly reply is 3 words longer than a worked one, a
checked reply 6), so a reward that only measures length is at chance on request pairs, and one that ignores the
prompt is too (every pair of styles appears under both of its requests).

Each style has five phrasings: three are used in every training set, two (``HELDOUT_PHRASINGS``) only in the
``*_unseen`` evaluation sets, to measure whether a learned reward generalises to wording it never saw.

Pure standard library.
"""

from __future__ import annotations

import random
import re
from typing import Any

STYLES = ("terse", "worked", "checked", "friendly")

TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "terse": ("Just give me the number.", "Only the final answer, please.", "No explanation needed."),
    "worked": ("Show your work.", "Explain each step.", "Walk me through the calculation."),
    "checked": ("Double-check the result.", "Verify your answer.", "Please check your work."),
    "friendly": ("Be warm and encouraging.", "Please be friendly.", "I am nervous about math, be kind."),
}
HELDOUT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "terse": ("Skip the steps and tell me the result.", "Answer with the number alone."),
    "worked": ("Please include the intermediate steps.", "Let me see how you got there."),
    "checked": ("Make sure it is right by testing the result.", "Confirm the answer before you give it."),
    "friendly": ("Cheer me on while you answer.", "Use a gentle, supportive tone."),
}
PHRASING_SETS = ("train", "unseen")

WARM_OPENERS = ("Happy to help!", "Great question, friend!", "Glad you asked!", "Nice problem, friend!")
"""The warm first sentences of a friendly reply (3 words each)."""

_PHRASING_STYLE = {phrase.lower(): style for table in (TRAIN_PHRASINGS, HELDOUT_PHRASINGS)
                   for style, phrases in table.items() for phrase in phrases}
_PHRASING_RE = re.compile("|".join(re.escape(p) for p in sorted(_PHRASING_STYLE, key=len, reverse=True)),
                          re.IGNORECASE)
_EQUATION_RE = re.compile(r"^-?\d+ [+*-] -?\d+ = -?\d+\.$")
_CHECK_RE = re.compile(r"^Check: -?\d+ [+*/-] -?\d+ = -?\d+\.$")
_ANSWER_RE = re.compile(r"^The answer is -?\d+\.$")
_SENTENCE_RE = re.compile(r"[^.!?]*[.!?]+|[^.!?]+$")


def phrasings(style: str, which: str = "train") -> tuple[str, ...]:
    """The phrasings of ``style``: ``which="train"`` (used in every training set) or ``"unseen"`` (held out)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if which not in PHRASING_SETS:
        raise ValueError(f"phrasings must be one of {PHRASING_SETS}, got {which!r}")
    return (TRAIN_PHRASINGS if which == "train" else HELDOUT_PHRASINGS)[style]


def _contents(prompt: Any) -> tuple[str, str]:
    """(last user message, system message) of a prompt given as a string or a list of chat messages."""
    from posttrain.data.messages import content_text, message_text

    if isinstance(prompt, str):
        return prompt, ""
    system = next((content_text(m.get("content")) for m in prompt if m.get("role") == "system"), "")
    return message_text(prompt, "user"), system


def request_of(prompt: Any) -> str | None:
    """The style the prompt asks for: a phrasing in its last user turn, else in its system prompt; else None."""
    for text in _contents(prompt):
        found = _PHRASING_RE.findall(text)
        if found:
            return _PHRASING_STYLE[found[-1].lower()]
    return None


def sentences(reply: str) -> list[str]:
    """``"Glad you asked! 5 + 7 = 12. The answer is 12."`` -> the three sentences, stripped."""
    return [s.strip() for s in _SENTENCE_RE.findall(" ".join(reply.split())) if s.strip()]


def reply_features(reply: str) -> dict[str, int]:
    """Counts of the sentence kinds of a reply: ``warm`` openers (first sentence only), ``equation``, ``check``,
    ``answer`` ("The answer is N.") and ``other`` (anything else: rambling, an unformatted ending)."""
    counts = dict(warm=0, equation=0, check=0, answer=0, other=0)
    for index, sentence in enumerate(sentences(reply)):
        if index == 0 and sentence in WARM_OPENERS:
            counts["warm"] += 1
        elif _EQUATION_RE.match(sentence):
            counts["equation"] += 1
        elif _CHECK_RE.match(sentence):
            counts["check"] += 1
        elif _ANSWER_RE.match(sentence):
            counts["answer"] += 1
        else:
            counts["other"] += 1
    return counts


def satisfies(style: str, reply: str, n_steps: int) -> bool:
    """Whether ``reply`` has the form ``style`` asks for, for a question solved in ``n_steps`` equations."""
    f = reply_features(reply)
    if style == "terse":
        return f["answer"] == 1 and f["warm"] + f["equation"] + f["check"] + f["other"] == 0
    if style == "worked":
        return f["equation"] >= n_steps and f["check"] == 0 and f["warm"] == 0
    if style == "checked":
        return f["equation"] >= n_steps and f["check"] >= 1 and f["warm"] == 0
    if style == "friendly":
        return f["warm"] == 1 and f["check"] == 0
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def follows_request(prompt: Any, completion: Any) -> bool | None:
    """Whether the completion does what the prompt's request asks (see the table above); None if there is none.

    ``prompt``: a string or chat messages; ``completion``: a string, a message or messages (the last assistant
    content). A prompt without a world question counts its request as asking for one step of working.
    """
    from posttrain.data.messages import message_text

    from .tasks import parse_question

    style = request_of(prompt)
    if style is None:
        return None
    question = parse_question(_contents(prompt)[0])
    return satisfies(style, message_text(completion, "assistant"), len(question.steps) if question else 1)


# --------------------------------------------------------------------------
# replies in each style


def check_sentence(x: int, op: str, n: int, result: int) -> str:
    """The inverse of the step ``x op n = result``: ``"Check: 85 - 48 = 37."`` for ``37 + 48 = 85``."""
    if op == "+":
        return f"Check: {result} - {n} = {x}."
    if op == "-":
        return f"Check: {result} + {n} = {x}."
    return f"Check: {result} / {n} = {x}."


def work_text(equations: list[str]) -> str:
    """``["5 + 7 = 12", "12 * 2 = 24"]`` -> ``"5 + 7 = 12. 12 * 2 = 24."``: the worked steps, one sentence each."""
    return " ".join(f"{equation}." for equation in equations)


def styled_reply(equations: list[str], answer: int, style: str, rng: random.Random | None = None) -> str:
    """A reply in ``style`` from worked ``equations`` (``"a op b = c"``, no final period) ending with ``answer``.

    The check line inverts the last equation; the warm opener is drawn with ``rng`` (the first one without).
    """
    from .tasks import parse_step

    work = work_text(equations)
    final = f"The answer is {answer}."
    if style == "terse":
        return final
    if style == "worked":
        return f"{work} {final}"
    if style == "checked":
        return f"{work} {check_sentence(*parse_step(equations[-1]))} {final}"
    if style == "friendly":
        opener = rng.choice(WARM_OPENERS) if rng is not None else WARM_OPENERS[0]
        return f"{opener} {work} {final}"
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def requested_words(style: str | None, n_steps: int) -> int:
    """Words in the canonical reply of ``style`` (no request: a worked reply): what the request asks for, so the
    gold reward's concision term charges only the words beyond it."""
    answer, step, check, warm = 4, 5, 6, 3
    if style == "terse":
        return answer
    extra = {None: 0, "worked": 0, "checked": check, "friendly": warm}
    if style not in extra:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return answer + step * n_steps + extra[style]
