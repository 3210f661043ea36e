"""Bad input data: every malformed row is reported with its file, line (or row) and field.

Acceptance test: a bad-input file with one malformed row of each kind; each error names file, line and field. With
``skip_invalid`` the good rows are kept and the report counts every dropped row with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data import DataError, load_sft_examples, load_texts, read_rows
from posttrain.data.io import preference_pair, validate_rows

SRC = Path(__file__).resolve().parents[1] / "src"

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def good_row(a: int, b: int) -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}]}


GOOD = [good_row(a, a + 1) for a in range(1, 5)]  # 4 valid rows

# One malformed row of each kind: (kind, raw JSONL line, expected field, a phrase of the message, LoadReport reason).
BAD_SFT = [
    ("malformed_json", '{"messages": [{"role": "user", "content": "hi"}', None, "malformed JSON", "malformed JSON"),
    ("missing_messages", json.dumps({"conversation": GOOD[0]["messages"]}), "messages", "missing column 'messages'",
     "missing column 'messages'"),
    ("unknown_role", json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"},
                                             {"role": "robot", "content": "2"}]}),
     "messages[1].role", "unknown role 'robot'", "unknown role 'robot'"),
    ("list_content", json.dumps({"messages": [{"role": "user", "content": ["What is", "1 + 1?"]},
                                             {"role": "assistant", "content": "2"}]}),
     "messages[0].content", "content must be a string, got list", "content must be a string, got list"),
    ("number_content", json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"},
                                               {"role": "assistant", "content": 2}]}),
     "messages[1].content", "content must be a string, got int", "content must be a string, got int"),
    ("empty_conversation", json.dumps({"messages": []}), "messages", "empty conversation", "empty conversation"),
    ("no_final_assistant", json.dumps({"messages": [SYSTEM, {"role": "user", "content": "What is 1 + 1?"}]}),
     "messages[1].role", "must end with an assistant turn", "an SFT example must end with an assistant turn"),
    ("not_alternating", json.dumps({"messages": [SYSTEM, {"role": "user", "content": "What is 1 + 1?"},
                                                {"role": "user", "content": "Please answer."},
                                                {"role": "assistant", "content": "2"}]}),
     "messages[2].role", "roles must alternate", "roles must alternate user/assistant"),
]
BAD_IDS = [case[0] for case in BAD_SFT]


@pytest.fixture(scope="module")
def tok():
    """The tiny world's tokenizer (its template requires user/assistant alternation)."""
    from posttrain.models import load_tokenizer
    from posttrain.stages.world import ensure_world

    paths = ensure_world(base_model=False, progress=False)
    return load_tokenizer(paths.tokenizer)


@pytest.fixture(scope="module")
def tiny_model(tok, tmp_path_factory) -> Path:
    from posttrain.world.model import init_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    init_tiny_model("world-llama", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def file_with_bad_row(tmp_path: Path, bad_line: str, position: int = 2) -> tuple[Path, int]:
    """GOOD rows with ``bad_line`` inserted after ``position`` good rows; returns (path, 1-based line of the bad
    row)."""
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(position, bad_line)
    return write_jsonl(tmp_path / "bad.jsonl", lines), position + 1


def test_world_template_requires_alternation(tok):
    """Precondition of the 'not_alternating' case: the world template itself rejects two user turns in a row."""
    from posttrain.data.io import template_requires_alternation
    from posttrain.data.render import RenderError, render_conversation

    assert template_requires_alternation(tok.chat_template)
    two_users = json.loads(BAD_SFT[BAD_IDS.index("not_alternating")][1])["messages"]
    with pytest.raises(RenderError, match="Conversation roles must alternate"):
        render_conversation(tok, two_users)


def test_good_rows_load(tmp_path, tok):
    path = write_jsonl(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    examples, report = load_sft_examples(path, tok)
    assert len(examples) == len(GOOD)
    assert report.read == report.kept == len(GOOD) and not report.dropped
    assert all(any(ex.loss_mask) for ex in examples)


@pytest.mark.parametrize("kind, bad_line, field, phrase, reason", BAD_SFT, ids=BAD_IDS)
@pytest.mark.parametrize("position", [0, 2, 4])
def test_each_bad_row_names_file_line_and_field(tmp_path, tok, kind, bad_line, field, phrase, reason, position):
    path, line = file_with_bad_row(tmp_path, bad_line, position)
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    err = info.value
    message = str(err)
    assert message.startswith(f"{path}, line {line}"), message
    assert err.source == str(path) and err.where == f"line {line}"
    assert phrase in message
    if field is None:  # malformed JSON: no field can be named, the file and line locate it
        assert err.field is None and "field" not in message
    else:
        assert err.field == field
        assert f"field '{field}'" in message


def test_blank_lines_count_in_line_numbers(tmp_path, tok):
    lines = [json.dumps(GOOD[0]), "", "   ", json.dumps({"messages": []})]
    path = write_jsonl(tmp_path / "blanks.jsonl", lines)
    with pytest.raises(DataError, match=r"blanks\.jsonl, line 4, field 'messages': empty conversation"):
        load_sft_examples(path, tok)


def test_non_object_json_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "list.jsonl", [json.dumps(GOOD[0]), "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_sft_examples(path, tok)


def test_alternation_not_required_without_alternating_template(tmp_path, tok):
    """Two user turns in a row are only an error under a template that requires alternation."""
    from posttrain.models import load_tokenizer

    chatml = load_tokenizer(tok.name_or_path, "chatml")
    assert "alternate" not in chatml.chat_template
    bad_line = BAD_SFT[BAD_IDS.index("not_alternating")][1]
    path, _ = file_with_bad_row(tmp_path, bad_line)
    examples, report = load_sft_examples(path, chatml)
    assert len(examples) == len(GOOD) + 1 and not report.dropped


def test_skip_invalid_keeps_exactly_the_good_rows(tmp_path, tok):
    lines = [json.dumps(r) for r in GOOD[:2]]
    for _, bad_line, *_ in BAD_SFT:
        lines.append(bad_line)
    lines += [json.dumps(r) for r in GOOD[2:]]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)

    with pytest.raises(DataError, match=rf"{path.name}, line 3"):  # the first bad row stops the load
        load_sft_examples(path, tok)

    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    expected, _ = load_sft_examples(write_jsonl(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD]), tok)
    assert [e.input_ids for e in examples] == [e.input_ids for e in expected]
    assert [e.loss_mask for e in examples] == [e.loss_mask for e in expected]
    assert report.read == len(GOOD) + len(BAD_SFT)
    assert report.kept == len(GOOD)
    assert sum(report.dropped.values()) == len(BAD_SFT)
    for _, _, _, _, reason in BAD_SFT:
        assert report.dropped[reason] >= 1, (reason, report.dropped)
    assert report.dropped == {reason: 1 for *_, reason in BAD_SFT}
    summary = report.summary()
    assert f"kept {len(GOOD)} of {len(GOOD) + len(BAD_SFT)} rows" in summary
    assert f"dropped {len(BAD_SFT)}" in summary
    assert report.examples and all(str(path) in e for e in report.examples)


def test_skip_invalid_with_no_good_rows_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "allbad.jsonl", [json.dumps({"messages": []})] * 3)
    with pytest.raises(DataError, match=r"no usable rows .*dropped 3 \(3 empty conversation\)"):
        load_sft_examples(path, tok, skip_invalid=True)


def test_over_long_rows_are_counted(tmp_path, tok):
    long_row = good_row(1, 2)
    long_row["messages"][2]["content"] = "The answer is 3. " * 60
    path = write_jsonl(tmp_path / "long.jsonl", [json.dumps(r) for r in GOOD] + [json.dumps(long_row)])
    examples, report = load_sft_examples(path, tok, max_length=64)
    assert len(examples) == len(GOOD)
    assert report.dropped == {"longer than max_length=64": 1}


# --------------------------------------------------------------------------------------------------------------
# preference rows


def preference(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_preference_chosen_equals_rejected(tmp_path):
    rows = [preference("What is 2 + 3?", "5", "6"), preference("What is 1 + 1?", "2", "3"),
            preference("What is 4 + 4?", "8", "8"), preference("What is 3 + 3?", "6", "7")]
    path = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as info:
        validate_rows(read_rows(path), preference_pair, skip_invalid=False)
    assert str(info.value) == f"{path}, line 3, field 'chosen': chosen and rejected are identical"

    kept, report = validate_rows(read_rows(path), preference_pair, skip_invalid=True)
    assert [row.where for row, _ in kept] == ["line 1", "line 2", "line 4"]
    assert report.kept == 3 and report.dropped == {"chosen and rejected are identical": 1}
    prompt, chosen, rejected = kept[0][1]
    assert prompt == [{"role": "user", "content": "What is 2 + 3?"}]
    assert chosen == [{"role": "assistant", "content": "5"}] and rejected == [{"role": "assistant", "content": "6"}]


def test_preference_missing_and_bad_fields(tmp_path):
    rows = [json.dumps(preference("What is 2 + 3?", "5", "6")),
            json.dumps({"prompt": "What is 1 + 1?", "chosen": "2"}),
            json.dumps({"prompt": "What is 1 + 1?", "chosen": [{"role": "assistant", "content": 2}], "rejected": "3"})]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    kept, report = validate_rows(read_rows(path), preference_pair, skip_invalid=True)
    assert len(kept) == 1
    assert any("line 2, field 'rejected': missing column 'rejected'" in e for e in report.examples)
    assert any("line 3, field 'chosen[0].content': content must be a string" in e for e in report.examples)


# --------------------------------------------------------------------------------------------------------------
# other formats: JSON list, Parquet, datasets directory; column mapping


def test_json_list_file_names_row(tmp_path, tok):
    rows = GOOD[:3] + [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "2"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value).startswith(f"{path}, row 4, field 'messages[1].role': unknown role 'robot'")

    path.write_text(json.dumps({"data": GOOD}))  # the {"data": [...]} form
    examples, _ = load_sft_examples(path, tok)
    assert len(examples) == len(GOOD)


def test_malformed_json_file_names_line(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": ]\n]\n')
    with pytest.raises(DataError, match=r"data\.json, line 3: malformed JSON"):
        load_sft_examples(path, tok)


def test_parquet_file_names_row(tmp_path, tok):
    import datasets

    rows = [dict(r) for r in GOOD]
    rows.insert(1, {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "robot", "content": "2"}]})
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value).startswith(f"{path}, row 2, field 'messages[1].role': unknown role 'robot'")

    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == len(GOOD) and report.dropped == {"unknown role 'robot'": 1}


def test_datasets_directory_loads(tmp_path, tok):
    import datasets

    good_jsonl = write_jsonl(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    expected, _ = load_sft_examples(good_jsonl, tok)

    path = tmp_path / "ds"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(path))
    examples, report = load_sft_examples(path, tok)
    assert [e.input_ids for e in examples] == [e.input_ids for e in expected]
    assert report.read == len(GOOD)

    dict_path = tmp_path / "ds_dict"  # a DatasetDict: the train split is used, a missing split is named
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD[:2])}).save_to_disk(str(dict_path))
    assert len(load_sft_examples(dict_path, tok)[0]) == 2
    with pytest.raises(DataError, match=r"no split 'test'"):
        read_rows(dict_path, split="test")


def test_column_mapping(tmp_path, tok):
    rows = [{"conversation": r["messages"], "id": i} for i, r in enumerate(GOOD)]
    path = write_jsonl(tmp_path / "renamed.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"line 1, field 'messages': missing column 'messages' \(columns present: "
                                        r"conversation, id"):
        load_sft_examples(path, tok)
    examples, _ = load_sft_examples(path, tok, columns={"conversation": "messages"})
    expected, _ = load_sft_examples(write_jsonl(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD]), tok)
    assert [e.input_ids for e in examples] == [e.input_ids for e in expected]


def test_prompt_completion_rows(tmp_path, tok):
    rows = [{"prompt": "What is 2 + 3?", "completion": "5"}, {"prompt": "What is 1 + 1?", "completion": ""}]
    path = write_jsonl(tmp_path / "pc.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"line 2, field 'completion': empty text"):
        load_sft_examples(path, tok)


def test_text_rows(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [json.dumps({"text": "1 + 1 = 2."}), json.dumps({"text": 5}),
                                                 json.dumps({"body": "x"}), json.dumps({"text": "2 + 2 = 4."})])
    with pytest.raises(DataError, match=r"text\.jsonl, line 2, field 'text': expected a string, got int"):
        load_texts(path)
    texts, report = load_texts(path, skip_invalid=True)
    assert texts == ["1 + 1 = 2.", "2 + 2 = 4."]
    assert sum(report.dropped.values()) == 2
    texts, _ = load_texts(write_jsonl(tmp_path / "body.jsonl", [json.dumps({"body": "x y"})]), columns={"body": "text"})
    assert texts == ["x y"]


def test_unsupported_format_and_missing_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data format '.csv'"):
        read_rows(tmp_path / "data.csv")


def test_load_generated_reports_malformed_json(tmp_path):
    from posttrain.data.prompts import load_generated

    good = {"prompt": "What is 1 + 1?", "completions": ["2", "3"]}
    path = write_jsonl(tmp_path / "gen.jsonl", [json.dumps(good), '{"prompt": "x", "completions": ['])
    with pytest.raises(DataError, match=r"gen\.jsonl, line 2: malformed JSON"):
        load_generated(str(path))


# --------------------------------------------------------------------------------------------------------------
# text encodings: undecodable bytes name the file and line; byte-order marks are understood


def good_lines() -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in GOOD]


def test_undecodable_jsonl_line_names_file_and_line(tmp_path, tok):
    """An invalid UTF-8 byte in line 3 is that line's error (not a bare codec error); skip_invalid drops the line
    and counts it like any malformed row."""
    lines = good_lines()
    prefix = b'{"messages": [{"role": "user", "content": "caf'
    lines.insert(2, prefix + b"\xe9" + b'"}]}')  # é written in Latin-1
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert info.value.source == str(path) and info.value.where == "line 3" and info.value.field is None
    assert str(info.value) == (f"{path}, line 3: not valid UTF-8 text (invalid continuation byte 0xe9 at byte "
                               f"{len(prefix) + 1} of the line, counting from 1; save the file as UTF-8)")
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == len(GOOD) and report.read == len(GOOD) + 1
    assert report.dropped == {"not valid UTF-8 text": 1}
    assert report.examples[0].startswith(f"{path}, line 3: not valid UTF-8 text")


def test_undecodable_json_file_names_file_line_and_offset(tmp_path, tok):
    """The byte's position counts from 1, as in a JSONL line's message (it was a 0-based offset here)."""
    path = tmp_path / "data.json"
    text = json.dumps(GOOD, indent=1).encode()
    cut = text.index(b"The answer")
    path.write_bytes(text[:cut] + b"\xff" + text[cut:])
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok, skip_invalid=True)  # the file cannot be decoded: no row can be trusted
    line = text[:cut].count(b"\n") + 1
    assert str(info.value) == (f"{path}, line {line}: not valid UTF-8 text (invalid start byte 0xff at byte "
                               f"{cut + 1} of the file, counting from 1; save the file as UTF-8)")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_byte_order_marks_are_decoded(tmp_path, tok, encoding, suffix):
    """Files Windows tools write (UTF-8 with a BOM; UTF-16 with a BOM, as PowerShell's `>` does) load exactly like
    the UTF-8 file."""
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in GOOD)
    else:
        text = json.dumps(GOOD, ensure_ascii=False, indent=1)
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")  # Python's utf-16 and utf-32 codecs write their own BOM
    path = tmp_path / f"data{suffix}"
    path.write_bytes(bom + text.replace("What", "Wh\u00e4t").encode(encoding))
    plain = tmp_path / f"plain{suffix}"
    plain.write_text(text.replace("What", "Wh\u00e4t"), encoding="utf-8")
    examples, report = load_sft_examples(path, tok)
    expected, _ = load_sft_examples(plain, tok)
    assert [e.input_ids for e in examples] == [e.input_ids for e in expected] and report.read == len(GOOD)


def test_byte_order_mark_inside_a_concatenated_jsonl(tmp_path, tok):
    path = tmp_path / "cat.jsonl"
    lines = good_lines()
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:2]) + b"\n\xef\xbb\xbf" + b"\n".join(lines[2:]) + b"\n")
    assert len(load_sft_examples(path, tok)[0]) == len(GOOD)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-be", "utf-32"])
def test_cr_lf_and_crlf_all_end_a_jsonl_line(tmp_path, tok, encoding):
    """Old Mac (CR only), Windows (CR LF) and Unix (LF) line ends, mixed in one file, split lines as text mode's
    universal newlines did (a CR-only file used to be one long malformed line); line numbers count each ending once,
    so the bad row in the 4th line is named "line 4"."""
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD]
    lines.insert(3, json.dumps({"messages": []}))
    text = lines[0] + "\r" + lines[1] + "\r\n" + lines[2] + "\n" + lines[3] + "\r" + lines[4] + "\r\n"
    path = tmp_path / "ends.jsonl"
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")  # Python's utf-16 and utf-32 codecs write their own BOM
    path.write_bytes(bom + text.replace("What", "Wh\u00e4t").encode(encoding))
    with pytest.raises(DataError, match=r"ends\.jsonl, line 4, field 'messages': empty conversation"):
        load_sft_examples(path, tok)
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == len(GOOD) and report.read == len(GOOD) + 1


def test_utf16_without_byte_order_mark_says_so(tmp_path, tok):
    path = tmp_path / "u16.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in GOOD).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"u16\.jsonl, line 1: malformed JSON .*UTF-16 without a byte-order mark"):
        load_sft_examples(path, tok)


def test_undecodable_utf16_line_is_a_bad_row(tmp_path, tok):
    lines = [json.dumps(row).encode("utf-16-le") for row in GOOD]
    lines.insert(1, "{".encode("utf-16-le") + b"\x00\xdc")  # a lone low surrogate code unit
    path = tmp_path / "u16.jsonl"
    path.write_bytes(b"\xff\xfe" + "\n".encode("utf-16-le").join(lines))
    with pytest.raises(DataError, match=r"u16\.jsonl, line 2: not valid UTF-16 text \(illegal encoding 0x00 0xdc at "
                                        r"byte 3 "):
        load_sft_examples(path, tok)
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == len(GOOD) and report.dropped == {"not valid UTF-16 text": 1}


def test_unpaired_surrogate_escape_is_a_bad_row(tmp_path, tok):
    """JSON can spell a lone surrogate ("\\ud800"); no tokenizer can encode it, so the row is rejected at loading,
    naming the field. A valid pair (an emoji) is kept."""
    bad = {"messages": [{"role": "user", "content": "Hi \ud800"}, {"role": "assistant", "content": "Hello"}]}
    emoji = {"messages": [{"role": "user", "content": "Hi \U0001f600"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "sur.jsonl", [json.dumps(emoji), json.dumps(bad)])
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value) == (f"{path}, line 2, field 'messages[0].content': invalid Unicode: an unpaired "
                               "surrogate escape (like \\ud800)")
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == 1 and report.dropped == {"invalid Unicode": 1}


def test_json_too_deep_or_huge_integer_is_a_bad_row(tmp_path, tok):
    """json.loads raises RecursionError and ValueError (not JSONDecodeError) for these; both are bad rows."""
    path = write_jsonl(tmp_path / "odd.jsonl", [json.dumps(GOOD[0]), "[" * 100_000, '{"n": ' + "1" * 5000 + "}"])
    with pytest.raises(DataError, match=r"odd\.jsonl, line 2: malformed JSON \(maximum recursion depth"):
        load_sft_examples(path, tok)
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == 1 and report.dropped == {"malformed JSON": 2}


def test_non_object_item_of_a_json_list_is_a_bad_row(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD[:2] + [[1, 2]] + GOOD[2:]))
    with pytest.raises(DataError, match=r"data\.json, row 3: expected a JSON object, got list"):
        load_sft_examples(path, tok)
    examples, report = load_sft_examples(path, tok, skip_invalid=True)
    assert len(examples) == len(GOOD) and report.dropped == {"expected a JSON object, got list": 1}


# --------------------------------------------------------------------------------------------------------------
# files that cannot be read at all: the error names the path and what is wrong


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_parquet_names_the_file(tmp_path, tok, damage):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(GOOD).to_parquet(str(path))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not parquet at all", "empty": b""}[damage])
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok, skip_invalid=True)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: not a readable Parquet file (")
    expected = "Parquet file size is 0 bytes" if damage == "empty" else "magic bytes not found"
    assert expected in str(info.value)


def test_directory_that_is_not_a_saved_dataset(tmp_path, tok):
    path = tmp_path / "some_dir"
    path.mkdir()
    (path / "train.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value).startswith(f"{path}: not a saved `datasets` directory (it has no state.json or "
                                      "dataset_dict.json)")


def test_saved_dataset_with_a_missing_file_is_not_called_unsaved(tmp_path, tok):
    """A saved dataset whose .arrow file is gone is a damaged saved dataset, not "not a saved `datasets` directory"
    (both were a FileNotFoundError from datasets, and used to get the second message)."""
    import datasets

    path = tmp_path / "ds"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(path))
    for arrow in path.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value).startswith(f"{path}: cannot read the saved dataset (FileNotFoundError: ")


def test_corrupt_saved_dataset_names_the_directory(tmp_path, tok):
    import datasets

    path = tmp_path / "ds"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(path))
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError) as info:
        load_sft_examples(path, tok)
    assert str(info.value).startswith(f"{path}: cannot read the saved dataset (")


# --------------------------------------------------------------------------------------------------------------
# end to end: the CLI reports the bad row in one line, exit code 2, no traceback


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def test_cli_sft_reports_bad_row(tmp_path, tiny_model):
    bad_line = BAD_SFT[BAD_IDS.index("unknown_role")][1]
    path, line = file_with_bad_row(tmp_path, bad_line, position=3)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "sft", "--data", str(path), "--model", str(tiny_model),
         "--out", str(out), "--progress=false", "--max_steps=1"],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("posttrain sft: error:")]
    assert len(error_lines) == 1, result.stderr
    assert f"{path}, line {line}, field 'messages[1].role': unknown role 'robot'" in error_lines[0]
    assert not (out / "model").exists()
