"""Gold reward of the tiny world (v3): the ground truth every learned reward is judged by.

For a prompt holding a world question ``q`` (and maybe a request, ``posttrain.world.requests``) and a completion
``c``::

    reward = 1.0 * correct + 0.3 * format_ok + 0.4 * request_ok + 0.2 * concision      (range [0, 1.9])
    correct    = 1 if parse_final_answer(c) == solve(q) else 0      (0 if solve(q) is None)
    format_ok  = 1 if follows_format(c) else 0
    request_ok = 1 if follows_request(prompt, c) is not False else 0  (a prompt without a request: 1)
    concision  = max(0, 1 - excess / 30),  excess = max(0, n_words - requested_words(request, steps of q))

Correctness is the largest term: a right answer in the wrong style (1.3 + concision) beats a wrong answer in the
requested one (0.7 at most). Concision charges only the words beyond the form the request asks for, so a worked or
checked reply is not penalised for its working, a terse request makes working cost, and rambling costs everywhere
(a 30-word preamble loses the whole term). ``parse_final_answer`` reads the integer of the last "The answer is N."
(or, failing that, the last integer in the text); ``follows_format`` asks that the stripped completion end with
exactly "The answer is N." and contain that phrase once.

``prompt`` may be a string or a list of chat messages (the last user message holds the question; the request may
also sit in the system prompt); ``completion`` may be a string, a message dict, or a list of messages (the content
of the last assistant message is used). Only the reply's answer is scored: the ``final`` channel of a harmony reply
(as the engine decodes it, special tokens kept or skipped; no final channel scores as an empty reply), the text after
a leading ``<think>...</think>``; the reasoning counts toward neither the answer nor the length.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.data.harmony import answer_text
from posttrain.data.messages import message_text

from .requests import follows_request, request_of, requested_words
from .tasks import parse_question

CORRECT_WEIGHT = 1.0
FORMAT_WEIGHT = 0.3
REQUEST_WEIGHT = 0.4
CONCISION_WEIGHT = 0.2
CONCISION_WORDS = 30
MAX_REWARD = CORRECT_WEIGHT + FORMAT_WEIGHT + REQUEST_WEIGHT + CONCISION_WEIGHT

_INT = r"(?:(?<![\w.])-)?[0-9]+"
"""An integer; a minus sign counts only if it does not follow a word ("12-3" is 12 and 3)."""

_ANSWER_RE = re.compile(rf"the answer is ({_INT})", re.IGNORECASE)
_INT_RE = re.compile(_INT)
_FORMAT_END_RE = re.compile(r"(?:^|\s)The answer is -?[0-9]+\.$")
_PHRASE_RE = re.compile(r"the answer is", re.IGNORECASE)


def parse_final_answer(completion: str) -> int | None:
    """The N of the last "The answer is N", else the last integer, else None."""
    answers = _ANSWER_RE.findall(completion)
    if answers:
        return int(answers[-1])
    integers = _INT_RE.findall(completion)
    return int(integers[-1]) if integers else None


def follows_format(completion: str) -> bool:
    """True iff ``completion.strip()`` ends with "The answer is N." and says "the answer is" once."""
    text = completion.strip()
    return bool(_FORMAT_END_RE.search(text)) and len(_PHRASE_RE.findall(text)) == 1


def gold_components(prompt: Any, completion: Any) -> dict[str, float]:
    """Every term of the gold reward: ``correct``, ``format_ok``, ``request_ok``, ``concision``, ``reward``, and
    ``has_request`` (1 if the prompt carries a request) and ``excess_words`` for inspection."""
    question = parse_question(message_text(prompt, "user"))
    text = answer_text(message_text(completion, "assistant"))  # the final channel / the text after </think>
    correct = float(question is not None and parse_final_answer(text) == question.answer)
    format_ok = float(follows_format(text))
    follows = follows_request(prompt, text)
    request_ok = float(follows is not False)
    n_steps = len(question.steps) if question is not None else 1
    excess = max(0, len(text.split()) - requested_words(request_of(prompt), n_steps))
    concision = max(0.0, 1.0 - excess / CONCISION_WORDS)
    reward = (CORRECT_WEIGHT * correct + FORMAT_WEIGHT * format_ok + REQUEST_WEIGHT * request_ok
              + CONCISION_WEIGHT * concision)
    return {"correct": correct, "format_ok": format_ok, "request_ok": request_ok, "concision": concision,
            "reward": reward, "has_request": float(follows is not None), "excess_words": float(excess)}


def gold_reward(prompt: Any, completion: Any) -> float:
    """``1.0 correct + 0.3 format_ok + 0.4 request_ok + 0.2 concision`` in [0, 1.9] (see the module docstring)."""
    return gold_components(prompt, completion)["reward"]
