"""Decontamination: word n-gram overlap between a training set and an eval set, reported and optionally filtered.

The rule (GPT-3's Appendix C, as lm-evaluation-harness applies it: any shared n-gram makes an eval row "dirty"):

* text is normalised to lowercase word tokens, ``re.findall(r"\\w+", text.lower())`` (letters, digits and ``_``;
  punctuation and spacing are dropped), and each text is n-grammed on its own (no n-gram spans two fields);
* an eval row's texts are the user turns of its prompt (``prompt`` as text or messages, or ``messages``), the
  texts a model is asked; a training row's texts are every string in the row, at any depth, except the values of
  ``role`` keys (prompts, completions, chosen / rejected replies, ``text``, message contents alike);
* a user turn with at least n words contributes its n-grams; a shorter one (0 < m < n words) contributes itself
  whole, and matches when its m words appear contiguously in a training text (otherwise a 5-word question could
  never be found with 8-grams); a turn without words contributes nothing;
* a row is contaminated when at least one of its n-grams is in the training set, and the share of its n-grams
  found there is at least ``min_overlap`` (0, the default: any one; open-instruct's decontamination scripts flag
  a row by such a share instead).

:func:`contamination` reports the count, the rate and examples of the shared n-grams; :func:`write_clean` writes
the clean rows unchanged (what ``posttrain eval --decontaminate`` evaluates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from posttrain.data.io import DataError, Row, read_rows, write_jsonl

_WORD = re.compile(r"\w+")
MAX_EXAMPLES = 10  # contaminated rows listed in a report, each with up to 3 of its shared n-grams


def words(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` (the normalisation of the module docstring)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[str]:
    """The set of contiguous n-word sequences of ``tokens``, each joined by one space (empty when shorter)."""
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def row_strings(value: Any) -> Iterator[str]:
    """Every string in a training row, at any depth, except the values of ``role`` keys."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "role":
                yield from row_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from row_strings(item)


def user_texts(messages: list[dict]) -> list[str]:
    """The user turns of a prompt (its checked messages)."""
    return [m["content"] for m in messages if m["role"] == "user" and isinstance(m["content"], str)]


def eval_grams(messages: list[dict], n: int) -> set[str]:
    """The n-grams of a prompt's user turns; a turn of 0 < m < n words is one m-gram (the whole turn)."""
    grams: set[str] = set()
    for text in user_texts(messages):
        tokens = words(text)
        grams |= ngrams(tokens, n) if len(tokens) >= n else ({" ".join(tokens)} if tokens else set())
    return grams


@dataclass
class TrainingNgrams:
    """The n-grams of a training set, and its m-grams for each shorter length m some eval turn needs."""

    n: int
    grams: dict[int, set[str]] = field(default_factory=dict)  # length -> the training set's grams of that length
    rows: int = 0

    def __contains__(self, gram: str) -> bool:
        return gram in self.grams.get(gram.count(" ") + 1, set())


def training_ngrams(path: str, n: int, lengths: set[int] = frozenset()) -> TrainingNgrams:
    """The n-grams (and m-grams for m in ``lengths``) of every training row of ``path``; a row that cannot be read,
    or holds no words at all, is a :class:`DataError` naming the file and line."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    index = TrainingNgrams(n, {m: set() for m in {n, *lengths}})
    for row in read_rows(path):
        if row.parse_error is not None:
            raise row.parse_error
        texts = [words(text) for text in row_strings(row.data)]
        if not any(texts):
            raise row.error(None, "no text to compare (a training row needs at least one word in some string field)")
        for tokens in texts:
            for m, grams in index.grams.items():
                grams |= ngrams(tokens, m)
        index.rows += 1
    if not index.rows:
        raise DataError(str(path), "", None, "no training rows")
    return index


def contamination(rows: list[tuple[Row, list[dict]]], train_path: str, n: int = 8,
                  min_overlap: float = 0.0) -> tuple[dict, list[bool]]:
    """``(report, flags)`` for eval ``rows`` (each a row with its checked prompt messages) against the training
    set at ``train_path``: ``flags[i]`` says row i is contaminated (the rule of the module docstring)."""
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    grams = [eval_grams(messages, n) for _, messages in rows]
    short = {g.count(" ") + 1 for row_grams in grams for g in row_grams} - {n}
    index = training_ngrams(train_path, n, short)
    flags, examples = [], []
    for (row, _), row_grams in zip(rows, grams):
        shared = sorted(g for g in row_grams if g in index)
        overlap = len(shared) / len(row_grams) if row_grams else 0.0
        dirty = bool(shared) and overlap >= min_overlap
        flags.append(dirty)
        if dirty and len(examples) < MAX_EXAMPLES:
            examples.append({"row": f"{row.source}, {row.where}", "overlap": overlap, "ngrams": shared[:3]})
    count = sum(flags)
    report = {"train_data": str(train_path), "train_rows": index.rows, "ngram": n, "min_overlap": min_overlap,
              "rows": len(rows), "contaminated": count, "rate": count / len(rows) if rows else float("nan"),
              "contaminated_rows": [row.where for (row, _), dirty in zip(rows, flags) if dirty],
              "examples": examples}
    return report, flags


def write_clean(rows: list[tuple[Row, list[dict]]], flags: list[bool], path: str | Path) -> Path:
    """The rows whose flag is False, as read (their original columns), to the JSONL file ``path``."""
    if len(rows) != len(flags):
        raise ValueError(f"{len(rows)} rows but {len(flags)} flags")
    return write_jsonl([row.data for (row, _), dirty in zip(rows, flags) if not dirty], path)
