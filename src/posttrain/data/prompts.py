"""Prompt rows (for anything that generates) and generated rows (``posttrain generate`` / ``score`` output), read
and checked: a bad row names the file, the line and the field."""

from __future__ import annotations

from posttrain.data.io import DataError, Row, as_messages, check_messages, read_rows, require, validate_rows

GENERATED_KEYS = ("prompt", "completions", "lengths", "finish_reasons", "logprobs", "rewards")


def prompt_messages(row: Row) -> list[dict]:
    """The prompt of a row: ``prompt`` (text or messages), or ``messages`` without its final assistant turn."""
    if "prompt" in row.data:
        messages = as_messages(row, "prompt", "user")
    else:
        messages = check_messages(row, require(row, "messages"), "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    if not messages or messages[-1]["role"] == "assistant":
        raise row.error("prompt", "a prompt must end with a user (or system) turn for the model to answer")
    return messages


def load_prompt_rows(path: str, *, columns: dict | None = None, skip_invalid: bool = False,
                     limit: int = 0) -> list[tuple[list[dict], dict]]:
    """``(prompt messages, other columns)`` per valid row; bad rows raise (or are skipped and reported)."""
    rows = read_rows(path, columns=columns or None)
    kept, report = validate_rows(rows, prompt_messages, skip_invalid=skip_invalid, source=str(path))
    if report.dropped:
        print(report.summary())
    out = [(messages, {k: v for k, v in row.data.items() if k not in ("prompt", "messages") + GENERATED_KEYS})
           for row, messages in kept]
    if not out:
        raise DataError(str(path), "", None, "no usable prompt rows")
    return out[:limit] if limit else out


def load_generated(path: str, *, need_rewards: bool = False) -> list[dict]:
    """Rows written by ``posttrain generate`` (and ``score``), checked: same N everywhere, rewards when needed."""
    rows = read_rows(path)
    checked = []
    for row in rows:
        if row.parse_error is not None:
            raise row.parse_error
        completions = require(row, "completions")
        if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
            raise row.error("completions", "expected a non-empty list of completion strings")
        prompt_messages(row)
        if need_rewards:
            rewards = require(row, "rewards")
            if not isinstance(rewards, list) or len(rewards) != len(completions):
                raise row.error("rewards", f"expected {len(completions)} rewards (one per completion); run "
                                           "`posttrain score` first")
            if not all(r is None or isinstance(r, (int, float)) for r in rewards):
                raise row.error("rewards", "rewards must be numbers or null")
        checked.append(row.data)
    if len({len(r["completions"]) for r in checked}) > 1:
        raise DataError(path, "", "completions", "every prompt needs the same number N of completions")
    if not checked:
        raise DataError(path, "", None, "no rows")
    return checked
