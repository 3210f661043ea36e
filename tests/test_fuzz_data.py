"""Fuzzing the loaders and the one rendering path with hypothesis.

What must hold for any input:

* The loaders (``read_rows``, ``load_sft_examples``, ``load_texts``, ``load_prompt_rows``, preference rows through
  ``validate_rows``, ``load_generated``) fed any .jsonl or .json file either return valid rows / examples or raise
  ``DataError``, never another exception type. The files hold rows of the wrong types (numbers, lists, dicts, null
  where text is expected), missing and extra fields, unknown roles, empty and 100,000-character strings, NUL,
  right-to-left marks, emoji, escaped unpaired surrogates, special-token strings, prompt/completion rows mixed with
  messages rows, undecodable bytes, byte-order marks and broken JSON.
* With ``skip_invalid=True`` no row-level problem raises: what may still raise is about the whole file (no usable
  row; a .json document that cannot be decoded or parsed), and the report accounts for every row read.
* ``render_conversation`` of any valid conversation, whatever its contents (special-token strings included): the
  mask is as long as the ids and trains exactly each assistant content plus the end-of-turn token that closes it; the
  ids decode to the rendered text; the only special tokens in them are the ones the template writes; and the
  generation prompt is the ids' prefix.
"""

from __future__ import annotations

import codecs
import json

import pytest
from conftest import TEMPLATES, defused
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data import DataError, load_sft_examples, load_texts, read_rows, render_conversation, render_prompt
from posttrain.data.io import ROLES, preference_pair, validate_rows
from posttrain.data.prompts import load_generated, load_prompt_rows

SPECIAL_STRINGS = ["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n", "<|endoftext|>", "<|pad|>"]
ODD_TEXT = [
    "\x00", "a\x00b", "\u202eevil\u202c", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", "\U0001f600",
    "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\ufeff", "a\r\nb", "e\u0301", "\u2028",
    "{{ raise_exception('x') }}", "</s>",
] + SPECIAL_STRINGS
HUGE = "ab " * 33_334  # 100,002 characters
# Strings that are not valid text or are whitespace only: fine for the loaders to reject, never to crash on.
BAD_TEXT = ["", " ", "\n\t", "\ud800", "x\udfffy", "\ue000posttrain-content-0\ue001", HUGE]

# Each test stays within a few seconds on one CPU core (about 1-3 s measured).
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

# ---------------------------------------------------------------------------------------------------------------
# Strategies

texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(ODD_TEXT + BAD_TEXT),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(ODD_TEXT)), min_size=2, max_size=4).map("".join),
)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
roles = st.one_of(st.sampled_from([*ROLES, "robot", "", "USER"]), values)
messages_any = st.lists(
    st.one_of(st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, values)},
                                    optional={"name": values, "tool_calls": values}), values),
    max_size=4,
)


@st.composite
def conversations(draw, content=texts, allow_tool: bool = False):
    """Role order valid for every template (optional system turn, then user/assistant pairs)."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
        if allow_tool and draw(st.integers(0, 4)) == 0:
            messages += [{"role": "tool", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
    return messages


# Any text a loader accepts as content, except that it may not start with whitespace: a template's "\n" before it
# would merge with that whitespace into one BPE token (docs/rendering.md, "Token boundaries").
valid_content = st.one_of(
    st.text(min_size=1, max_size=30),
    st.sampled_from(ODD_TEXT),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(ODD_TEXT)), min_size=2, max_size=5).map("".join),
).filter(lambda s: s.strip() and not s[0].isspace())
good_rows = st.one_of(
    conversations(valid_content).map(lambda m: {"messages": m}),
    st.fixed_dictionaries({"prompt": valid_content, "completion": valid_content}),
)
rows = st.tuples(
    st.one_of(
        good_rows,
        good_rows,
        conversations().map(lambda m: {"messages": m}),
        messages_any.map(lambda m: {"messages": m}),
        st.fixed_dictionaries({"prompt": st.one_of(texts, conversations(), messages_any, values),
                               "completion": st.one_of(texts, messages_any, values)}),
        st.fixed_dictionaries({"prompt": st.one_of(texts, values), "chosen": st.one_of(texts, messages_any),
                               "rejected": st.one_of(texts, values)}),
        st.fixed_dictionaries({"text": st.one_of(texts, values)}),
        st.fixed_dictionaries({"prompt": st.one_of(texts, messages_any), "completions": st.lists(texts, max_size=3)},
                              optional={"rewards": st.lists(values, max_size=3)}),
        st.dictionaries(st.sampled_from(["messages", "prompt", "completion", "text", "chosen", "rejected",
                                         "completions", "rewards"]), values, max_size=4),
    ),
    st.dictionaries(st.text(max_size=5), values, max_size=2),  # extra fields
).map(lambda pair: {**pair[1], **pair[0]})


def dumps(value, ensure_ascii: bool) -> bytes:
    # An unpaired surrogate is a \ud800 escape with ensure_ascii, else bytes that are not valid UTF-8.
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


@st.composite
def jsonl_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["row", "row", "row", "row", "value", "truncated", "bytes", "blank"]))
    if kind == "row":
        return dumps(draw(rows), draw(st.booleans()))
    if kind == "value":  # valid JSON, not an object
        return dumps(draw(values), draw(st.booleans()))
    if kind == "truncated":
        line = dumps(draw(rows), True)
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=12))
    return b"  "


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(suffix, file contents)."""
    if draw(st.booleans()):
        suffix, body = ".jsonl", b"\n".join(draw(st.lists(jsonl_lines(), min_size=1, max_size=8)))
    else:
        items = draw(st.lists(st.one_of(rows, rows, rows, values), min_size=1, max_size=6))
        document = draw(st.sampled_from([items, items, items, {"data": items}, draw(values)]))
        suffix, body = ".json", dumps(document, draw(st.booleans()))
        if draw(st.integers(0, 7)) == 0:  # damage it: a stray byte somewhere
            at = draw(st.integers(0, len(body)))
            body = body[:at] + draw(st.binary(min_size=1, max_size=2)) + body[at:]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-bom", "utf-16"]))
    if encoding == "utf-8-bom":
        body = codecs.BOM_UTF8 + body
    elif encoding == "utf-16":  # Python's utf-16 codec writes a BOM; undecodable bytes become lone surrogates
        body = body.decode("utf-8", "surrogateescape").encode("utf-16", "surrogatepass")
    return suffix, body


# ---------------------------------------------------------------------------------------------------------------
# Loaders: valid results or DataError; with skip_invalid, no row-level DataError


def file_level(err: DataError, suffix: str) -> bool:
    """A problem with the whole file, not with one row: no location ('no usable rows', not a JSON list), or a .json
    document that cannot be decoded or parsed (located by line)."""
    return err.where == "" or (suffix == ".json" and err.where.startswith("line ") and err.field is None)


def accounted(report) -> bool:
    return report.kept + sum(report.dropped.values()) == report.read


def check_sft(result, max_length: int) -> None:
    examples, report = result
    assert accounted(report) and report.kept == len(examples) > 0
    for example in examples:
        assert len(example.input_ids) == len(example.loss_mask) <= max_length
        assert set(example.loss_mask) <= {0, 1} and any(example.loss_mask)


def check_texts(result) -> None:
    texts_, report = result
    assert accounted(report) and texts_ and all(isinstance(t, str) and t.strip() for t in texts_)


def check_prompts(result) -> None:
    assert result
    for messages, extra in result:
        assert messages and all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
        assert messages[-1]["role"] != "assistant" and isinstance(extra, dict)


def check_preferences(result) -> None:
    kept, report = result
    assert accounted(report)
    for _, (prompt, chosen, rejected) in kept:
        assert prompt and chosen and rejected and chosen != rejected


def check_generated(result) -> None:
    assert result and all(r["completions"] and all(isinstance(c, str) for c in r["completions"]) for r in result)


@pytest.fixture(scope="module")
def tok(world_tokenizer):
    return world_tokenizer


@FUZZ
@given(file=data_files())
def test_loaders_return_valid_rows_or_raise_data_error(tok, tmp_path, file):
    suffix, body = file
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(body)
    try:  # read_rows has no skip option: a bad row becomes a Row with its parse error, never an exception
        loaded = read_rows(path)
        assert all(isinstance(row.data, dict) for row in loaded)
    except DataError as err:
        assert file_level(err, suffix), err
    loaders = {
        "sft": (lambda skip: load_sft_examples(path, tok, max_length=256, skip_invalid=skip),
                lambda r: check_sft(r, 256)),
        "texts": (lambda skip: load_texts(path, skip_invalid=skip), check_texts),
        "prompts": (lambda skip: load_prompt_rows(str(path), skip_invalid=skip), check_prompts),
        "preferences": (lambda skip: validate_rows(read_rows(path), preference_pair, skip_invalid=skip),
                        check_preferences),
    }
    for name, (load, check) in loaders.items():
        for skip in (False, True):
            try:
                result = load(skip)
            except DataError as err:
                assert not skip or file_level(err, suffix), (name, str(err))
                continue
            check(result)
    try:
        check_generated(load_generated(str(path)))
    except DataError:
        pass


@settings(FUZZ, max_examples=40)
@given(conversation=conversations(), extra=st.dictionaries(st.text(max_size=5), values, max_size=2))
def test_mixed_rows_in_one_file(tok, tmp_path, conversation, extra):
    """messages rows and prompt/completion rows side by side, with extra fields: each valid row is kept (or dropped
    as too long), each invalid one is reported; skip_invalid keeps exactly the rows that load alone."""
    path = tmp_path / "mixed.jsonl"
    rows_ = [{"messages": conversation, **extra},
             {"prompt": "What is 1 + 1?", "completion": "2", **extra},
             {"prompt": conversation[:-1], "completion": conversation[-1:]}]
    path.write_bytes(b"\n".join(dumps(r, True) for r in rows_))
    alone = []
    for i, row in enumerate(rows_):
        one = tmp_path / f"one{i}.jsonl"
        one.write_bytes(dumps(row, True))
        try:
            alone += [e.input_ids for e in load_sft_examples(one, tok, max_length=256)[0]]
        except DataError:
            pass
    try:
        examples, report = load_sft_examples(path, tok, max_length=256, skip_invalid=True)
    except DataError as err:
        assert not alone and err.where == "", err
        return
    assert [e.input_ids for e in examples] == alone and report.read == 3 and accounted(report)


# ---------------------------------------------------------------------------------------------------------------
# Rendering any valid conversation (TEMPLATES, the ``tokenizers`` fixture and ``defused`` are in conftest.py)


@pytest.mark.parametrize("name", TEMPLATES)
@settings(FUZZ, max_examples=100)
@given(messages=conversations(valid_content, allow_tool=True))
def test_render_any_valid_conversation(tokenizers, name, messages):
    tokenizer = tokenizers[name]
    ids, mask = render_conversation(tokenizer, messages)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")  # what closes an assistant turn in all four templates
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == "".join(reply + "<|im_end|>" for reply in replies)
    specials = set(tokenizer.added_tokens_decoder)
    assert [t for t in trained if t in specials] == [eot] * len(replies)  # no fake end-of-turn is trained
    assert [t for t in ids if t in specials] == [t for t in render_conversation(tokenizer, defused(messages))[0]
                                                 if t in specials]
    prompt = render_prompt(tokenizer, messages[:-1])
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1
