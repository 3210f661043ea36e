"""Gold reward of the tiny world: the ground truth every learned reward is judged by.

For a prompt holding a world question ``q`` and a completion ``c``::

    reward  = 1.0 * correct + 0.3 * format_ok + 0.2 * brevity      (range [0, 1.5])
    correct   = 1 if parse_final_answer(c) == solve(q) else 0       (0 if solve(q) is None)
    format_ok = 1 if follows_format(c) else 0
    brevity   = max(0.0, 1.0 - n_words / 60),  n_words = len(c.split())

``parse_final_answer`` reads the integer of the last "The answer is N." (or,
failing that, the last integer in the text). ``follows_format`` asks that the
stripped completion end with exactly "The answer is N." and contain that
phrase once.

``prompt`` may be a string or a list of chat messages (the content of the last
user message is used); ``completion`` may be a string, a message dict, or a
list of messages (the content of the last assistant message is used).
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.data.messages import message_text

from .tasks import solve

CORRECT_WEIGHT = 1.0
FORMAT_WEIGHT = 0.3
BREVITY_WEIGHT = 0.2
BREVITY_WORDS = 60
MAX_REWARD = CORRECT_WEIGHT + FORMAT_WEIGHT + BREVITY_WEIGHT

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
    """The parts of the gold reward: ``correct``, ``format_ok``, ``brevity`` and ``reward``.

    ``reward = 1.0 * correct + 0.3 * format_ok + 0.2 * brevity`` with
    ``brevity = max(0, 1 - len(text.split()) / 60)``.
    """
    question = message_text(prompt, "user")
    text = message_text(completion, "assistant")
    truth = solve(question)
    correct = float(truth is not None and parse_final_answer(text) == truth)
    format_ok = float(follows_format(text))
    brevity = max(0.0, 1.0 - len(text.split()) / BREVITY_WORDS)
    reward = CORRECT_WEIGHT * correct + FORMAT_WEIGHT * format_ok + BREVITY_WEIGHT * brevity
    return {"correct": correct, "format_ok": format_ok, "brevity": brevity, "reward": reward}


def gold_reward(prompt: Any, completion: Any) -> float:
    """``1.0 * correct + 0.3 * format_ok + 0.2 * brevity`` in [0, 1.5] (see the module docstring)."""
    return gold_components(prompt, completion)["reward"]
