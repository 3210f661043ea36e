"""Loading rows from JSONL / JSON / Parquet / `datasets` directories, and validating them with clear errors.

Every error names the file, the line (JSONL) or row (JSON, Parquet, datasets; 1-based) and the field, e.g.::

    data/sft.jsonl, line 7, field 'messages[2].role': unknown role 'robot' (expected assistant, system, tool, user)

``skip_invalid=True`` drops bad rows instead and the returned report says how many and why.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad input row. ``str(err)`` reads ``<file>, line <n>, field '<field>': <message>``."""

    def __init__(self, source: str, where: str, field_name: str | None, message: str):
        self.source, self.where, self.field, self.message = source, where, field_name, message
        loc = f"{source}, {where}" if where else source
        super().__init__(f"{loc}, field '{field_name}': {message}" if field_name else f"{loc}: {message}")


@dataclass
class Row:
    """One input row with where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    where: str  # "line 7" for JSONL, "row 7" otherwise
    parse_error: DataError | None = None  # malformed JSON: reported (or skipped) at validation

    def error(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.source, self.where, field_name, message)


@dataclass
class LoadReport:
    """How many rows were read and kept, and why the others were dropped."""

    source: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few full error messages

    def drop(self, reason: str, err: Exception | None = None) -> None:
        self.dropped[reason] += 1
        if err is not None and len(self.examples) < 5:
            self.examples.append(str(err))

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.source}: kept {self.kept} of {self.read} rows"
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common())
        return f"{self.source}: kept {self.kept} of {self.read} rows; dropped {sum(self.dropped.values())} ({reasons})"


def _read_jsonl(path: Path) -> Iterable[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"malformed JSON ({err.msg} at column {err.colno})"
                yield Row({}, str(path), where, DataError(str(path), where, None, message))
                continue
            if not isinstance(data, dict):
                message = f"expected a JSON object, got {type(data).__name__}"
                yield Row({}, str(path), where, DataError(str(path), where, None, message))
                continue
            yield Row(data, str(path), where)


def _read_json(path: Path) -> Iterable[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(str(path), f"line {err.lineno}", None, f"malformed JSON ({err.msg} at column {err.colno})")
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), "", None, "expected a JSON list of objects (or {'data': [...]})")
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(str(path), f"row {number}", None, f"expected a JSON object, got {type(item).__name__}")
        yield Row(item, str(path), f"row {number}")


def _read_dataset(path: Path, split: str) -> Iterable[Row]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:  # parquet
        ds = datasets.Dataset.from_parquet(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(str(path), "", None, f"no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    for number, item in enumerate(ds, start=1):
        yield Row(dict(item), str(path), f"row {number}")


def read_rows(path: str | Path, *, columns: dict[str, str] | None = None, split: str = "train") -> list[Row]:
    """Read every row of a JSONL, JSON, Parquet file or a `datasets` directory (``save_to_disk``).

    ``columns`` maps names in the file to the names posttrain expects, e.g. ``{"conversation": "messages"}``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        rows = list(_read_dataset(path, split))
    elif suffix == ".json":
        rows = list(_read_json(path))
    elif suffix in (".jsonl", ".ndjson"):
        rows = list(_read_jsonl(path))
    else:
        raise ValueError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .json, .parquet or a datasets dir)")
    if columns:
        for row in rows:
            for old, new in columns.items():
                if old in row.data:
                    row.data[new] = row.data.pop(old)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Validation. Each validator returns the cleaned value or raises ``DataError`` naming the field.


def require(row: Row, name: str) -> Any:
    if name not in row.data or row.data[name] is None:
        present = ", ".join(sorted(row.data)) or "none"
        raise row.error(name, f"missing column '{name}' (columns present: {present}; map names with --columns)")
    return row.data[name]


def check_text(row: Row, name: str) -> str:
    value = require(row, name)
    if not isinstance(value, str):
        raise row.error(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise row.error(name, "empty text")
    return value


def check_messages(row: Row, value: Any, name: str, *, allow_empty_content: bool = False) -> list[dict]:
    """A list of {role, content} dicts with known roles and string contents."""
    if not isinstance(value, list):
        raise row.error(name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise row.error(name, "empty conversation")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise row.error(where, f"expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise row.error(f"{where}.role", f"unknown role {role!r} (expected {', '.join(sorted(ROLES))})")
        if "content" not in message:
            raise row.error(f"{where}.content", "missing content")
        content = message["content"]
        if not isinstance(content, str):
            raise row.error(f"{where}.content", f"content must be a string, got {type(content).__name__}")
        if not content.strip() and not allow_empty_content and role != "system":
            raise row.error(f"{where}.content", f"empty {role} content")
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def check_alternation(row: Row, messages: list[dict], name: str) -> None:
    """After an optional leading system turn, user and assistant turns must alternate, starting with user.

    Tool turns may follow an assistant turn (a tool call's result) and must be followed by an assistant turn.
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    expected = "user"
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role == "tool":
            if messages[i - 1]["role"] not in ("assistant", "tool"):
                raise row.error(f"{name}[{i}].role", "a tool turn must follow an assistant or tool turn")
            expected = "assistant"
            continue
        if role != expected:
            raise row.error(
                f"{name}[{i}].role",
                f"roles must alternate user/assistant (after an optional system turn): expected {expected!r}, "
                f"got {role!r}",
            )
        expected = "assistant" if role == "user" else "user"


def template_requires_alternation(template: str | None) -> bool:
    """Heuristic: templates that enforce alternation say so in their raise_exception message."""
    return bool(template) and "alternate" in template


def as_messages(row: Row, name: str, role: str) -> list[dict]:
    """A column that holds either a plain string (wrapped as one ``role`` message) or a list of messages."""
    value = require(row, name)
    if isinstance(value, str):
        if not value.strip():
            raise row.error(name, "empty text")
        return [{"role": role, "content": value}]
    return check_messages(row, value, name)


def sft_messages(row: Row, *, require_alternation: bool = False) -> list[dict]:
    """An SFT conversation from ``messages`` (conversational) or ``prompt``/``completion`` columns."""
    if "messages" in row.data or not ("prompt" in row.data and "completion" in row.data):
        messages = check_messages(row, require(row, "messages"), "messages")
        name = "messages"
    else:
        messages = as_messages(row, "prompt", "user") + as_messages(row, "completion", "assistant")
        name = "prompt+completion"
    if messages[-1]["role"] != "assistant":
        raise row.error(
            f"{name}[{len(messages) - 1}].role",
            f"an SFT example must end with an assistant turn (last role is {messages[-1]['role']!r})",
        )
    if require_alternation:
        check_alternation(row, messages, name)
    return messages


def preference_pair(row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages from an explicit-prompt preference row."""
    prompt = as_messages(row, "prompt", "user")
    chosen = as_messages(row, "chosen", "assistant")
    rejected = as_messages(row, "rejected", "assistant")
    if chosen == rejected:
        raise row.error("chosen", "chosen and rejected are identical")
    return prompt, chosen, rejected


def validate_rows(
    rows: list[Row], validate: Callable[[Row], Any], *, skip_invalid: bool, source: str = ""
) -> tuple[list[tuple[Row, Any]], LoadReport]:
    """Apply ``validate`` to every row. Without ``skip_invalid`` the first bad row raises its ``DataError``."""
    report = LoadReport(source or (rows[0].source if rows else "data"), read=len(rows))
    kept = []
    for row in rows:
        try:
            if row.parse_error is not None:
                raise row.parse_error
            kept.append((row, validate(row)))
        except DataError as err:
            if not skip_invalid:
                raise
            report.drop(err.message.split(" (")[0].split(":")[0], err)
    report.kept = len(kept)
    return kept, report


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """One JSON object per line (UTF-8, ``ensure_ascii=False``), written atomically (a crash never leaves a
    half-written file under the final name); creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
