"""Synthetic arithmetic problems with verifiable answers (the "tiny world").

Problem kinds and difficulty levels:

* level 1: single-digit ``add`` / ``sub`` (non-negative result) / ``mul``;
* level 2: two-digit ``add`` / ``sub`` (non-negative result) and
  one-digit x two-digit ``mul``;
* level 3: ``chain`` of 2-3 operations starting from a small number, e.g.
  "Start with 5, add 7, then double it." Every intermediate value stays in
  ``[0, 1000)``.

Each kind has several phrasings. :func:`solve` parses every phrasing this
module produces, so ``solve(q.text) == q.answer`` always holds.

The train / held-out split is a deterministic function of the phrasing-free
key :attr:`Question.canonical` (``sha256`` of the key, about 10 % held out),
so the two splits never share a problem, whatever its wording. The operands
of the commutative operations (add, mul) are sorted in the key, so
``37 + 48`` and ``48 + 37`` are the same problem.

Pure standard library: no torch, no numpy.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

WORLD_VERSION = "3"

SPLITS = ("train", "heldout")
LEVELS = (1, 2, 3)

HELDOUT_PERCENT = 10
"""Percentage of canonical problems that are held out."""

_MAX_CONSECUTIVE_MISSES = 2000
"""In :func:`questions`, a level is dropped after this many useless draws in a row."""

_OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
_SYMBOL_KIND = {symbol: kind for kind, symbol in _OP_SYMBOL.items()}

BINARY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "What is {a} + {b}?",
        "Compute {a} + {b}.",
        "Calculate {a} + {b}.",
        "What is {a} plus {b}?",
        "Find the sum of {a} and {b}.",
        "What do you get when you add {a} and {b}?",
        "Add {a} and {b}.",
    ),
    "sub": (
        "What is {a} - {b}?",
        "Compute {a} - {b}.",
        "Calculate {a} - {b}.",
        "What is {a} minus {b}?",
        "Find the difference between {a} and {b}.",
        "What do you get when you subtract {b} from {a}?",
        "Subtract {b} from {a}.",
    ),
    "mul": (
        "What is {a} * {b}?",
        "Compute {a} * {b}.",
        "Calculate {a} * {b}.",
        "What is {a} times {b}?",
        "Find the product of {a} and {b}.",
        "What do you get when you multiply {a} by {b}?",
        "Multiply {a} by {b}.",
    ),
}
"""Phrasings of the one-step problems; ``{a} op {b}`` is the computation."""

CHAIN_TEMPLATES: tuple[str, ...] = (
    "Start with {x}, {ops}.",
    "Take {x}, {ops}. What is the result?",
    "Begin with {x}, {ops}. What number do you get?",
    "Start with the number {x}, {ops}.",
)
"""Phrasings of the chains; ``{ops}`` is e.g. "add 7, subtract 3, then double it"."""


@dataclass(frozen=True)
class Question:
    """One world problem.

    ``steps`` is the worked solution, one ``("a op b = c", c)`` pair per
    operation; in a chain each step's left operand is the previous result.
    """

    text: str
    answer: int
    level: int
    kind: str
    steps: tuple[tuple[str, int], ...]

    @property
    def canonical(self) -> str:
        """Phrasing-independent key, e.g. ``"add:37:48"`` or ``"chain:5:+7:*2"``."""
        start, ops = step_operations(self.steps)
        if self.kind == "chain":
            return "chain:" + ":".join([str(start)] + [f"{op}{n}" for op, n in ops])
        a, b = start, ops[0][1]
        if self.kind in ("add", "mul"):
            a, b = sorted((a, b))
        return f"{self.kind}:{a}:{b}"


# --------------------------------------------------------------------------
# arithmetic helpers


def apply_op(x: int, op: str, n: int) -> int:
    """Return ``x op n`` for ``op`` in ``+ - *``."""
    if op == "+":
        return x + n
    if op == "-":
        return x - n
    if op == "*":
        return x * n
    raise ValueError(f"unknown operation {op!r}")


def format_step(x: int, op: str, n: int, result: int) -> str:
    """Equation text of one step, e.g. ``"37 + 48 = 85"``."""
    return f"{x} {op} {n} = {result}"


_STEP_RE = re.compile(r"^(-?\d+) ([+*-]) (-?\d+) = (-?\d+)$")


def parse_step(text: str) -> tuple[int, str, int, int]:
    """Inverse of :func:`format_step`: ``"37 + 48 = 85"`` -> ``(37, "+", 48, 85)``."""
    match = _STEP_RE.match(text)
    if match is None:
        raise ValueError(f"not a step: {text!r}")
    x, op, n, result = match.groups()
    return int(x), op, int(n), int(result)


def step_operations(steps: tuple[tuple[str, int], ...]) -> tuple[int, list[tuple[str, int]]]:
    """The start value and the ``(op, operand)`` list of a worked solution."""
    parsed = [parse_step(text) for text, _ in steps]
    return parsed[0][0], [(op, n) for _, op, n, _ in parsed]


def make_steps(start: int, ops: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Worked solution of applying ``ops`` in order to ``start``."""
    steps = []
    value = start
    for op, n in ops:
        result = apply_op(value, op, n)
        steps.append((format_step(value, op, n, result), result))
        value = result
    return tuple(steps)


# --------------------------------------------------------------------------
# generation


def _binary_operands(rng: random.Random, kind: str, level: int) -> tuple[int, int]:
    """Operands ``(a, b)`` of a one-step problem (``a - b >= 0`` for sub)."""
    if kind == "mul":
        if level == 1:
            return rng.randint(1, 9), rng.randint(1, 9)
        pair = (rng.randint(2, 9), rng.randint(10, 99))
        return pair if rng.random() < 0.5 else (pair[1], pair[0])
    low, high = (0, 9) if level == 1 else (10, 99)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if kind == "sub" and a < b:
        a, b = b, a
    return a, b


def _make_binary(rng: random.Random, level: int) -> Question:
    kind = rng.choice(("add", "sub", "mul"))
    a, b = _binary_operands(rng, kind, level)
    text = rng.choice(BINARY_TEMPLATES[kind]).format(a=a, b=b)
    steps = make_steps(a, [(_OP_SYMBOL[kind], b)])
    return Question(text=text, answer=steps[-1][1], level=level, kind=kind, steps=steps)


def _chain_op(rng: random.Random, value: int) -> tuple[str, int]:
    """A random chain operation that keeps ``value`` non-negative."""
    choice = rng.choice(("add", "sub", "mul", "mul"))
    if choice == "sub" and value > 0:
        return "-", rng.randint(1, min(20, value))
    if choice == "mul":
        return "*", rng.randint(2, 5)
    return "+", rng.randint(1, 20)


def _chain_phrase(rng: random.Random, op: str, n: int) -> str:
    """Words for one chain operation: add N, subtract N, multiply by N, double it, triple it."""
    if op == "+":
        return f"add {n}"
    if op == "-":
        return f"subtract {n}"
    if n == 2 and rng.random() < 0.6:
        return "double it"
    if n == 3 and rng.random() < 0.6:
        return "triple it"
    return f"multiply by {n}"


def _make_chain(rng: random.Random) -> Question:
    while True:
        start = rng.randint(2, 20)
        value, ops = start, []
        for _ in range(rng.choice((2, 3))):
            op, n = _chain_op(rng, value)
            value = apply_op(value, op, n)
            ops.append((op, n))
        if 0 <= value < 1000:
            break
    phrases = [_chain_phrase(rng, op, n) for op, n in ops]
    ops_text = ", ".join(phrases[:-1]) + ", then " + phrases[-1]
    text = rng.choice(CHAIN_TEMPLATES).format(x=start, ops=ops_text)
    steps = make_steps(start, ops)
    return Question(text=text, answer=steps[-1][1], level=3, kind="chain", steps=steps)


def make_question(rng: random.Random, level: int) -> Question:
    """Draw one random question of difficulty ``level`` (1, 2 or 3)."""
    if level in (1, 2):
        return _make_binary(rng, level)
    if level == 3:
        return _make_chain(rng)
    raise ValueError(f"level must be 1, 2 or 3, got {level!r}")


# --------------------------------------------------------------------------
# solving


def _template_regex(template: str) -> re.Pattern[str]:
    """Regex matching ``template`` with ``{a}``/``{b}`` as integers (final punctuation optional)."""
    body = re.escape(template[:-1])
    body = body.replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
    return re.compile(r"\b" + body + r"(?!\d)[?.]?", re.IGNORECASE)


_BINARY_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (kind, _template_regex(template))
    for kind, templates in BINARY_TEMPLATES.items()
    for template in templates
]

_CHAIN_OP = r"(?:add \d+|subtract \d+|multiply by \d+|double it|triple it)"
_CHAIN_PATTERN = re.compile(
    r"\b(?:start with|begin with|take)(?: the number)? (?P<x>\d+), "
    rf"(?P<ops>(?:{_CHAIN_OP}, )+)then (?P<last>{_CHAIN_OP})\b[?.]?",
    re.IGNORECASE,
)


def _parse_chain_op(phrase: str) -> tuple[str, int]:
    """``"add 7"`` -> ``("+", 7)``; ``"double it"`` -> ``("*", 2)``."""
    phrase = phrase.lower()
    if phrase == "double it":
        return "*", 2
    if phrase == "triple it":
        return "*", 3
    n = int(phrase.rsplit(" ", 1)[1])
    if phrase.startswith("add"):
        return "+", n
    if phrase.startswith("subtract"):
        return "-", n
    return "*", n


def _chain_question(match: re.Match[str]) -> Question:
    phrases = match.group("ops")[: -len(", ")].split(", ") + [match.group("last")]
    steps = make_steps(int(match.group("x")), [_parse_chain_op(p) for p in phrases])
    return Question(text=match.group(0), answer=steps[-1][1], level=3, kind="chain", steps=steps)


def _binary_question(kind: str, match: re.Match[str]) -> Question:
    a, b = int(match.group("a")), int(match.group("b"))
    steps = make_steps(a, [(_OP_SYMBOL[kind], b)])
    level = 1 if max(a, b) < 10 else 2
    return Question(text=match.group(0), answer=steps[-1][1], level=level, kind=kind, steps=steps)


def _matches(text: str) -> list[tuple[int, int, Question]]:
    """Every question found in ``text`` as ``(start, end, question)``."""
    found = [(m.start(), m.end(), _chain_question(m)) for m in _CHAIN_PATTERN.finditer(text)]
    for kind, pattern in _BINARY_PATTERNS:
        found += [(m.start(), m.end(), _binary_question(kind, m)) for m in pattern.finditer(text)]
    return found


def parse_question(text: str) -> Question | None:
    """Recover the world question in ``text`` (``None`` if there is none).

    Accepts every phrasing produced by :func:`make_question`, also when it is
    embedded in surrounding text; whitespace is normalised first. Matches
    lying inside a longer match are ignored (e.g. "subtract 4 from 9" inside
    "What do you get when you subtract 4 from 9?"); of the rest, the last
    question in the text is returned. Its ``text`` is the matched span, its
    ``level`` is inferred (chain: 3; both operands < 10: 1; otherwise 2).
    """
    normalised = " ".join(text.split())
    found = sorted(_matches(normalised), key=lambda m: (m[0], -m[1]))
    outer: list[tuple[int, int, Question]] = []
    for start, end, question in found:
        if outer and end <= outer[-1][1]:
            continue  # contained in the previous outer match
        outer.append((start, end, question))
    return outer[-1][2] if outer else None


def solve(question_text: str) -> int | None:
    """The true answer of the world question in ``question_text``, or ``None``.

    See :func:`parse_question` for what is accepted; ``solve(q.text) == q.answer``
    for every generated question.
    """
    question = parse_question(question_text)
    return None if question is None else question.answer


# --------------------------------------------------------------------------
# splits


def is_heldout(q: Question) -> bool:
    """True for about 10 % of problems: ``int(sha256("world:" + canonical)[:8], 16) % 100 < 10``."""
    digest = hashlib.sha256(f"world:{q.canonical}".encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def in_split(q: Question, split: str) -> bool:
    """Whether ``q`` belongs to ``split`` ("train" or "heldout")."""
    check_split(split)
    return is_heldout(q) == (split == "heldout")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def questions(split: str, n: int, seed: int, levels: tuple[int, ...] = LEVELS) -> list[Question]:
    """``n`` distinct (by canonical) questions of ``split``, deterministic in ``seed``.

    Draws with ``random.Random(seed)`` cycling through ``levels``. A level whose
    pool of problems is exhausted (``_MAX_CONSECUTIVE_MISSES`` useless draws in
    a row) is dropped, so the list can be shorter than ``n`` only if every
    level runs out.
    """
    check_split(split)
    rng = random.Random(seed)
    active = list(levels)
    misses = {level: 0 for level in active}
    seen: set[str] = set()
    out: list[Question] = []
    turn = 0
    while len(out) < n and active:
        level = active[turn % len(active)]
        turn += 1
        q = make_question(rng, level)
        if not in_split(q, split) or q.canonical in seen:
            misses[level] += 1
            if misses[level] >= _MAX_CONSECUTIVE_MISSES:
                active.remove(level)
            continue
        misses[level] = 0
        seen.add(q.canonical)
        out.append(q)
    return out
