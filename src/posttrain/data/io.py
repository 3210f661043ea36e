"""Loading rows from JSONL / JSON / Parquet / `datasets` directories, and validating them with clear errors.

Every error names the file, the line (JSONL) or row (JSON, Parquet, datasets; 1-based) and the field, e.g.::

    data/sft.jsonl, line 7, field 'messages[2].role': unknown role 'robot' (expected assistant, system, tool, user)

``skip_invalid=True`` drops bad rows instead and the returned report says how many and why.

Text files (.jsonl, .json) are UTF-8; a byte-order mark is understood (UTF-8, and UTF-16 or UTF-32, which Windows tools
write) and removed. JSONL lines end at ``\n``, ``\r\n`` or a lone ``\r`` (universal newlines, as text mode reads
them). Text that cannot be decoded is an error naming the file, the line and the bad bytes' position, counted from 1
(a JSONL line is a bad row, which ``skip_invalid`` drops); so is an unpaired surrogate escape (``"\\ud800"``), which
no tokenizer can encode. A file that cannot be read at all (a corrupt or truncated Parquet file, a directory that is
not a saved dataset, a saved dataset with damaged or missing files) is a ``DataError`` naming the path.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from posttrain.data.messages import REASONING_FIELDS

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


# Byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate can reach a str decoded from valid UTF-8
UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str: text no tokenizer can encode (render.py uses it too)


def _sniff_encoding(path: Path) -> tuple[str, int]:
    """``(encoding, length of its byte-order mark)``: UTF-8 unless the file starts with a byte-order mark."""
    with path.open("rb") as f:
        head = f.read(4)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _undecodable(err: UnicodeDecodeError, encoding: str, where: str) -> str:
    """``not valid UTF-8 text (invalid start byte 0xff at byte 12 of the line, counting from 1; save the file as
    UTF-8)``; ``where`` says where the 1-based byte position counts from."""
    bad = " ".join(f"0x{b:02x}" for b in err.object[err.start:err.end])
    name = encoding.upper().removesuffix("-LE").removesuffix("-BE")
    return f"not valid {name} text ({err.reason} {bad} at {where}, counting from 1; save the file as UTF-8)"


def _raw_lines(path: Path, encoding: str, bom: int) -> Iterator[bytes]:
    """The file's lines as bytes, split at ``\n``, ``\r\n`` and a lone ``\r`` (universal newlines): UTF-8 streamed,
    UTF-16/32 split at newline code units. Splitting bytes keeps an undecodable line from hiding the others; a CR or
    LF byte is never part of a longer UTF-8 sequence, so no character is cut."""
    if encoding == "utf-8":
        with path.open("rb") as f:
            for line in f:  # split at b"\n"; a UTF-8 byte-order mark stays on line 1 and is removed after decoding
                body = line.removesuffix(b"\n")
                if len(body) < len(line):
                    body = body.removesuffix(b"\r")  # \r\n ends one line
                yield from body.split(b"\r")
        return
    data = path.read_bytes()[bom:]
    cr, lf = "\r".encode(encoding), "\n".encode(encoding)
    start = 0
    for end in re.finditer(re.escape(cr) + b"(?:" + re.escape(lf) + b")?|" + re.escape(lf), data):
        if end.start() % len(lf):  # not on a code-unit boundary (a CR / LF code unit always is)
            continue
        yield data[start:end.start()]
        start = end.end()
    if start < len(data):
        yield data[start:]


def _surrogate_field(value: Any, name: str = "") -> str | None:
    """The first field (``messages[1].content``) whose string holds an unpaired surrogate, or None."""
    if isinstance(value, str):
        return name if UNPAIRED_SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = ((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{name}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for key, v in items if (found := _surrogate_field(v, key)) is not None), None)


def _parse_object(text: str, source: str, where: str) -> tuple[dict, DataError | None]:
    """One JSON object (a JSONL line, an item of a JSON list), or the ``DataError`` that says why it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        message = f"malformed JSON ({err.msg} at column {err.colno})"
        if "\x00" in text:
            message += "; the line holds NUL characters: is the file UTF-16 without a byte-order mark?"
        return {}, DataError(source, where, None, message)
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep
        return {}, DataError(source, where, None, f"malformed JSON ({str(err).split(':')[0]})")
    return _check_object(data, source, where, check_surrogates=bool(_SURROGATE_ESCAPE.search(text)))


def _check_object(data: Any, source: str, where: str, *, check_surrogates: bool) -> tuple[dict, DataError | None]:
    if not isinstance(data, dict):
        return {}, DataError(source, where, None, f"expected a JSON object, got {type(data).__name__}")
    if check_surrogates and (name := _surrogate_field(data)) is not None:
        return {}, DataError(source, where, name, "invalid Unicode: an unpaired surrogate escape (like \\ud800)")
    return data, None


def _read_jsonl(path: Path) -> Iterable[Row]:
    source = str(path)
    encoding, bom = _sniff_encoding(path)
    for number, raw in enumerate(_raw_lines(path, encoding, bom), start=1):
        where = f"line {number}"
        try:
            line = raw.decode(encoding).lstrip("\ufeff")  # a byte-order mark (also one left by concatenating files)
        except UnicodeDecodeError as err:
            message = _undecodable(err, encoding, f"byte {err.start + 1} of the line")  # 1-based, like columns
            yield Row({}, source, where, DataError(source, where, None, message))
            continue
        if not line.strip():
            continue
        data, error = _parse_object(line, source, where)
        yield Row(data, source, where, error)


def _read_json(path: Path) -> Iterable[Row]:
    source = str(path)
    encoding, bom = _sniff_encoding(path)
    raw = path.read_bytes()[bom:]
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[:err.start].decode(encoding, errors="replace").count("\n") + 1
        raise DataError(source, f"line {line}", None,
                        _undecodable(err, encoding, f"byte {bom + err.start + 1} of the file")) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(source, f"line {err.lineno}", None,
                        f"malformed JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep
        raise DataError(source, "", None, f"malformed JSON ({str(err).split(':')[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(source, "", None, "expected a JSON list of objects (or {'data': [...]})")
    check_surrogates = bool(_SURROGATE_ESCAPE.search(text))
    for number, item in enumerate(data, start=1):
        where = f"row {number}"
        item, error = _check_object(item, source, where, check_surrogates=check_surrogates)
        yield Row(item, source, where, error)


def _read_parquet(path: Path) -> Iterable[Row]:
    import pyarrow
    import pyarrow.parquet

    number = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches():
            for item in batch.to_pylist():
                number += 1
                yield Row(item, str(path), f"row {number}")
    except (OSError, ValueError, pyarrow.ArrowException) as err:
        after = f" after row {number}" if number else ""
        raise DataError(str(path), "", None, f"not a readable Parquet file{after} ({' '.join(str(err).split())})"
                        ) from err


def _read_dataset(path: Path, split: str) -> Iterable[Row]:
    import datasets
    import pyarrow

    # what save_to_disk writes (a Dataset: state.json and dataset_info.json; a DatasetDict: dataset_dict.json)
    if not any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
        raise DataError(str(path), "", None, "not a saved `datasets` directory (it has no state.json or "
                                             "dataset_dict.json): use a directory written by save_to_disk, or a "
                                             ".jsonl, .json or .parquet file")
    try:  # a saved dataset that is damaged: a missing or truncated .arrow file, a broken state.json, ...
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(str(path), "", None, f"no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        items = [dict(item) for item in ds]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, pyarrow.ArrowException, datasets.exceptions.DatasetsError) as err:
        raise DataError(str(path), "", None, f"cannot read the saved dataset ({type(err).__name__}: {err})") from err
    for number, item in enumerate(items, start=1):
        yield Row(item, str(path), f"row {number}")


def read_rows(path: str | Path, *, columns: dict[str, str] | None = None, split: str = "train") -> list[Row]:
    """Read every row of a JSONL, JSON, Parquet file or a `datasets` directory (``save_to_disk``).

    ``columns`` maps names in the file to the names posttrain expects, e.g. ``{"conversation": "messages"}``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = list(_read_dataset(path, split))
    elif suffix == ".parquet":
        rows = list(_read_parquet(path))
    elif suffix == ".json":
        rows = list(_read_json(path))
    elif suffix in (".jsonl", ".ndjson"):
        rows = list(_read_jsonl(path))
    else:
        raise DataError(str(path), "", None,
                        f"unsupported data format {suffix!r} (use .jsonl, .json, .parquet or a datasets dir)")
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
    """A list of {role, content} dicts with known roles and string contents; an assistant message may carry
    reasoning (``reasoning`` / ``thinking``, or a leading ``<think>...</think>``) and ``tool_calls`` (then its
    content may be empty or missing), a tool message ``name`` / ``tool_call_id`` (docs/rendering.md)."""
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
        calls = message.get("tool_calls")
        if calls is not None and calls != []:  # null or [] = no tool calls (datasets give every row every field)
            _check_tool_calls(row, calls, role, f"{where}.tool_calls")
        if message.get("content") is None and calls:  # a tool-call message may have no content (HF, TRL)
            message = {**message, "content": ""}
        if "content" not in message:
            raise row.error(f"{where}.content", "missing content")
        content = message["content"]
        if not isinstance(content, str):
            raise row.error(f"{where}.content", f"content must be a string, got {type(content).__name__}")
        if not content.strip() and not allow_empty_content and role != "system" and not calls:
            raise row.error(f"{where}.content", f"empty {role} content")
        _check_reasoning(row, message, role, where)
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if message.get(key) is not None and not (isinstance(message[key], str) and message[key].strip()):
                    raise row.error(f"{where}.{key}", f"expected a non-empty string, got {message[key]!r}")
        messages.append({k: v for k, v in message.items() if v is not None and not (k == "tool_calls" and v == [])})
    return messages


def _check_reasoning(row: Row, message: dict, role: str, where: str) -> None:
    """An assistant's reasoning: one string field (``reasoning`` or ``thinking``) or a closed ``<think>`` that
    starts the content, never both; no reasoning on other roles."""
    given = [name for name in REASONING_FIELDS if message.get(name) is not None]
    for name in given:
        if role != "assistant":
            raise row.error(f"{where}.{name}", f"only assistant messages carry reasoning (this one is {role!r})")
        if not isinstance(message[name], str):
            raise row.error(f"{where}.{name}", f"expected a string, got {type(message[name]).__name__}")
    if len(given) > 1:
        raise row.error(f"{where}.{given[1]}", f"give the reasoning once: both {given[0]!r} and {given[1]!r} are set")
    think = message["content"].lstrip().startswith("<think>")
    if role == "assistant" and think:
        if "</think>" not in message["content"]:
            raise row.error(f"{where}.content", "<think> at the start of the content is never closed by </think>")
        if given:
            raise row.error(f"{where}.{given[0]}", "give the reasoning once: both a reasoning field and <think> in "
                                                   "the content are set")


def _check_tool_calls(row: Row, calls: Any, role: str, name: str) -> None:
    """``[{"type": "function", "function": {"name": str, "arguments": dict | JSON object string}, "id"?}]``."""
    if role != "assistant":
        raise row.error(name, f"only assistant messages make tool calls (this one is {role!r})")
    if not isinstance(calls, list):
        raise row.error(name, f"expected a list of tool calls, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        at = f"{name}[{j}]"
        if not isinstance(call, dict):
            raise row.error(at, f"expected a tool call object, got {type(call).__name__}")
        if (call.get("type") or "function") != "function":
            raise row.error(f"{at}.type", f"only 'function' tool calls are supported, got {call['type']!r}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise row.error(f"{at}.function", "expected {'name': ..., 'arguments': ...}")
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise row.error(f"{at}.function.name", f"expected a non-empty string, got {function.get('name')!r}")
        arguments = function.get("arguments")
        if arguments is None:  # no arguments (rendered as {})
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise row.error(f"{at}.function.arguments", "a string of arguments must be JSON") from None
        if not isinstance(arguments, dict):
            raise row.error(f"{at}.function.arguments",
                            f"expected a JSON object of arguments, got {type(arguments).__name__}")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise row.error(f"{at}.id", f"expected a string, got {type(call['id']).__name__}")


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
