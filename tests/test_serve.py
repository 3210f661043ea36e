"""``posttrain serve`` in process: what reaches the model (the whole conversation, rendered as in training) and what
reaches generation (temperature, top_p, seed, max_tokens) from a chat-completions request; tool calls, tool results
and reasoning in requests, and a harmony model's reply as OpenAI's content, reasoning_content and tool_calls (with
``posttrain chat``'s harmony REPL, which shares the parsing); then the server's defences against abuse: malformed
numbers and bodies, the reply budget against the context and the limit, the body size and time limits, the bounded
queue, stopping a generation whose client has gone or whose time is up, and SIGINT / SIGTERM during a long
generation (a real ``posttrain serve`` process).

A stub generate function records what ``create_app`` passes it (or stands in for a slow model that honours the stop
hook); the tiny random Llama checks the real path: the token ids the model is given, that the seed makes sampling
reproducible, and that the stop hook ends a generation without changing its tokens. (More refusals and the
end-to-end judge are tested in test_judge.py.) Tests never assert speed: the seconds below are liveness bounds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.render import render_prompt
from posttrain.models.generation import Completion
from posttrain.stages.serve import BadRequest, create_app, make_server, parse_request

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
]

# any JSON value, for the request parsers' fuzz tests
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
            | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from posttrain.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def _client(model, tokenizer, **kwargs):
    from fastapi.testclient import TestClient

    from posttrain.stages.serve import create_app

    return TestClient(create_app(model, tokenizer, "tiny", **kwargs))


@pytest.fixture
def recorded(monkeypatch):
    """generate() replaced by a stub that records each call and replies "The answer is 8."; the list of calls."""
    import posttrain.models.generation as generation

    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append({"model": model, "prompts": prompts, **kwargs})
        return [Completion(text="The answer is 8.", token_ids=[11, 12, 13], finish_reason="length") for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    return calls


@pytest.fixture
def stubbed(tiny, recorded):
    """A served app whose generate function is the recording stub."""
    with _client(*tiny, default_max_tokens=9) as client:
        yield client, recorded


def test_generation_gets_the_whole_conversation_and_the_request_options(stubbed, tiny):
    client, calls = stubbed
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": CONVERSATION, "temperature": 0.7, "top_p": 0.9, "seed": 1234, "max_tokens": 7})
    assert response.status_code == 200, response.text
    assert len(calls) == 1
    call = calls[0]
    assert call["model"] is tiny[0]
    assert call["prompts"] == [CONVERSATION]  # every turn, system and earlier assistant reply included, in order
    assert (call["temperature"], call["top_p"], call["seed"], call["max_new_tokens"]) == (0.7, 0.9, 1234, 7)
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "The answer is 8."}
    assert body["choices"][0]["finish_reason"] == "length"
    # usage: the rendered whole conversation, and the 3 generated tokens (a length stop bills no stop token)
    assert body["usage"] == {"prompt_tokens": len(render_prompt(tiny[1], CONVERSATION)), "completion_tokens": 3,
                             "total_tokens": len(render_prompt(tiny[1], CONVERSATION)) + 3}


def test_request_without_options_gets_openai_defaults(stubbed):
    """No temperature / top_p / seed / max_tokens: OpenAI's defaults (1.0, 1.0), no seed, the server's budget (9);
    ``max_completion_tokens`` is read like ``max_tokens``; list-of-parts content is joined into text."""
    client, calls = stubbed
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]}]
    assert client.post("/v1/chat/completions", json={"messages": parts}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": parts, "max_completion_tokens": 5,
                                                     "temperature": 0}).status_code == 200
    first, second = calls
    assert first["prompts"] == [[{"role": "user", "content": "What is 2 + 3?"}]]
    assert (first["temperature"], first["top_p"], first["seed"], first["max_new_tokens"]) == (1.0, 1.0, None, 9)
    assert (second["temperature"], second["max_new_tokens"]) == (0.0, 5)


def test_the_model_is_fed_the_rendered_whole_conversation(tiny):
    """The token ids the model itself receives are ``render_prompt`` of the whole conversation (not of its last
    message), exactly the prompt part of what training renders."""
    model, tokenizer = tiny
    seen = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] == mask.shape[1]:  # the prefill (a decoding step feeds one token against the whole mask)
            seen.append(ids[mask.bool()].tolist())
        return original(*args, **kwargs)

    model.forward = recording_forward
    try:
        with _client(model, tokenizer) as client:
            response = client.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 2,
                                                                 "temperature": 0})
    finally:
        del model.forward
    assert response.status_code == 200, response.text
    whole = render_prompt(tokenizer, CONVERSATION)
    assert seen == [whole]
    assert len(whole) > len(render_prompt(tokenizer, CONVERSATION[-1:])) + 10  # the earlier turns are really there
    assert response.json()["usage"]["prompt_tokens"] == len(whole)


def test_seed_makes_sampling_reproducible(tiny):
    """At temperature 1 the same seed gives the same reply twice, different seeds give different replies, and a
    seeded reply is what the library's sampler gives for that conversation and seed."""
    from posttrain.models.generation import generate

    model, tokenizer = tiny
    messages = [{"role": "user", "content": "What is 2 + 3?"}]

    with _client(model, tokenizer) as client:
        def reply(seed: int) -> str:
            response = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 1.0,
                                                                 "seed": seed, "max_tokens": 12})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        first, again = reply(0), reply(0)
        others = {reply(seed) for seed in (1, 2, 3)}
    assert first == again
    assert others - {first}, "different seeds all gave the reply of seed 0"
    expected = generate(model, tokenizer, [messages], max_new_tokens=12, temperature=1.0, seed=0)[0].text
    assert first == expected
    greedy = generate(model, tokenizer, [messages], max_new_tokens=12, temperature=0.0)[0].text
    assert first != greedy  # temperature 1 really reached the sampler (the random model's greedy reply differs)


# ---------------------------------------------------------------------------------------------------------------
# Harmony, reasoning and tool calls: what an OpenAI / vLLM client sends and gets back.

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
ANALYSIS = "<|channel|>analysis<|message|>Need the tool.<|end|>"
WEATHER_CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city": "Paris"}<|call|>')


@pytest.fixture(scope="module")
def harmony_tokenizer(world_tokenizer):
    """The tiny world tokenizer with ``--chat_template harmony`` (its seven tokens added), as test_harmony.py makes
    it; served beside the tiny Llama, whose generation the tests script."""
    from posttrain.data import set_chat_template

    return set_chat_template(copy.deepcopy(world_tokenizer), "harmony")


def harmony_completion(tokenizer, generated: str, finish_reason: str = "stop") -> Completion:
    """What the engine returns for a reply that reads ``generated`` (the text after the prompt's
    ``<|start|>assistant``, its stop token included when ``finish_reason`` is "stop"): the token ids, and the text
    decoded with special tokens skipped."""
    ids = tokenizer.encode(generated, add_special_tokens=False)
    text = tokenizer.decode(ids[:-1] if finish_reason == "stop" else ids, skip_special_tokens=True)
    return Completion(text=text, token_ids=ids, finish_reason=finish_reason)


@pytest.fixture
def scripted(monkeypatch):
    """generate() replaced by a stub that returns the completions of ``script`` in turn (append before each
    request) and records a copy of each conversation it is given; (script, seen)."""
    import posttrain.models.generation as generation

    script, seen = [], []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.append(copy.deepcopy(prompts[0]))
        return [script.pop(0)]

    monkeypatch.setattr(generation, "generate", fake_generate)
    return script, seen


@pytest.mark.parametrize("generated, finish_reason, message, expected_finish", [
    (ANALYSIS + WEATHER_CALL, "stop",  # reasoning, then a call that stops the reply: no answer yet
     {"role": "assistant", "content": None, "reasoning": "Need the tool.", "reasoning_content": "Need the tool.",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
     "tool_calls"),
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>It is 20 C.<|return|>", "stop",
     {"role": "assistant", "content": "It is 20 C.", "reasoning": "Need the tool.",
      "reasoning_content": "Need the tool."}, "stop"),
    ("<|channel|>final<|message|>5<|return|>", "stop", {"role": "assistant", "content": "5"}, "stop"),
    ("<|channel|>analysis<|message|>2 + 3 is", "length",  # cut while reasoning: no answer, and "length"
     {"role": "assistant", "content": None, "reasoning": "2 + 3 is", "reasoning_content": "2 + 3 is"}, "length"),
    (ANALYSIS + '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"ci',
     "length",  # cut inside the call's arguments: no call (it could not be sent back nor run), and "length"
     {"role": "assistant", "content": None, "reasoning": "Need the tool.", "reasoning_content": "Need the tool."},
     "length"),
    ("The answer is 5.<|return|>", "stop",  # an untrained model's plain text: the content, as decoded
     {"role": "assistant", "content": "The answer is 5."}, "stop"),
], ids=["tool-call", "answer", "answer-only", "cut-reasoning", "cut-call", "not-harmony"])
def test_a_harmony_reply_comes_back_in_openai_fields(tiny, harmony_tokenizer, scripted, generated, finish_reason,
                                                      message, expected_finish):
    """The completion's tokens decoded with their special tokens and parsed: the final channel is ``content`` (null
    without one), the analysis ``reasoning`` and ``reasoning_content`` (vLLM's names; absent when empty), a call to
    functions.NAME an OpenAI tool call (arguments a JSON string, a ``call_`` id), finish_reason "tool_calls" when
    the reply stopped at ``<|call|>``; usage counts every generated token, the stop token included."""
    script, _ = scripted
    completion = harmony_completion(harmony_tokenizer, generated, finish_reason)
    script.append(completion)
    with _client(tiny[0], harmony_tokenizer) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    got = choice["message"]
    for call in got.get("tool_calls", []):
        assert CALL_ID.fullmatch(call.pop("id"))
    assert got == message
    assert choice["finish_reason"] == expected_finish
    assert response.json()["usage"]["completion_tokens"] == len(completion.token_ids)


def test_each_tool_call_gets_its_own_id(tiny, harmony_tokenizer, scripted):
    """Two calls in one reply (the first closed by <|end|>), and the same call in two replies: four distinct ids."""
    script, _ = scripted
    two = ('<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}<|end|>' + WEATHER_CALL)
    script += [harmony_completion(harmony_tokenizer, two), harmony_completion(harmony_tokenizer, two)]
    with _client(tiny[0], harmony_tokenizer) as client:
        replies = [client.post("/v1/chat/completions", json={"messages": QUESTION}).json() for _ in range(2)]
    calls = [call for reply in replies for call in reply["choices"][0]["message"]["tool_calls"]]
    assert [call["function"] for call in calls] == 2 * [{"name": "get_time", "arguments": "{}"},
                                                        {"name": "get_weather", "arguments": '{"city":"Paris"}'}]
    assert len({call["id"] for call in calls}) == 4


def test_a_tool_call_reply_sent_back_with_its_result_is_rendered_in_harmony(tiny, harmony_tokenizer, scripted):
    """The client sends back the assistant message it got (content null, reasoning under both names, the call with
    its id and arguments as a JSON string) and a tool message answering that id: the model is given posttrain's
    schema (arguments a dict, reasoning once) and so the harmony rendering of training, this turn's reasoning kept,
    the call in commentary to=functions.get_weather and the result from functions.get_weather."""
    script, seen = scripted
    script += [harmony_completion(harmony_tokenizer, ANALYSIS + WEATHER_CALL),
               harmony_completion(harmony_tokenizer, "<|channel|>final<|message|>20 C.<|return|>")]
    with _client(tiny[0], harmony_tokenizer) as client:
        first = client.post("/v1/chat/completions", json={"messages": QUESTION}).json()["choices"][0]["message"]
        call_id = first["tool_calls"][0]["id"]
        follow_up = QUESTION + [first, {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 20}'}]
        response = client.post("/v1/chat/completions", json={"messages": follow_up})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": "20 C."}
    expected = QUESTION + [
        {"role": "assistant", "content": "", "reasoning": "Need the tool.",
         "tool_calls": [{"id": call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 20}', "tool_call_id": call_id}]
    assert seen[1] == expected
    prompt = render_prompt(harmony_tokenizer, expected)
    assert harmony_tokenizer.decode(prompt, skip_special_tokens=False).endswith(
        "<|start|>user<|message|>What is 2 + 3?<|end|>" + "<|start|>assistant" + ANALYSIS + WEATHER_CALL.replace(
            '{"city": "Paris"}', '{"city":"Paris"}')
        + '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
        "<|start|>assistant")
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)


def test_a_tool_result_harmony_cannot_attribute_is_a_400(tiny, harmony_tokenizer, scripted):
    """A tool message whose tool_call_id no earlier call has cannot be rendered (harmony names the tool in the
    result's header): a 400 naming the message, and the model is not asked."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_2", "content": "20"}]
    with _client(tiny[0], harmony_tokenizer) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert "message 2 (tool): no earlier tool call has id 'call_2'" in response.json()["error"]["message"]
    assert scripted[1] == []


def test_a_non_harmony_model_replies_as_decoded_and_takes_tool_messages(stubbed):
    """The tiny Llama's own template: its reply is the content as decoded, never parsed (text that looks like a
    harmony reply stays as it is), and tool calls, tool results and reasoning reach its template in posttrain's
    schema (the arguments a dict, as Hugging Face templates expect them)."""
    client, calls = stubbed
    messages = QUESTION + [
        {"role": "assistant", "content": None, "reasoning_content": "Use the calculator.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "5"}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "tool_choice": "auto", "tools": []})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": "The answer is 8."}
    assert calls[0]["prompts"] == [QUESTION + [
        {"role": "assistant", "content": "", "reasoning": "Use the calculator.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1", "name": "add"}]]


def test_a_non_harmony_model_never_parses_its_reply(tiny, scripted):
    """A reply that reads like harmony from a model without the harmony template is the content verbatim."""
    script, _ = scripted
    script.append(Completion(text="analysisThe user asks.assistantfinal5", token_ids=[5, 6], finish_reason="length"))
    with _client(*tiny) as client:
        body = client.post("/v1/chat/completions", json={"messages": QUESTION}).json()
    assert body["choices"][0] == {"index": 0, "finish_reason": "length", "logprobs": None,
                                  "message": {"role": "assistant", "content": "analysisThe user asks.assistantfinal5"}}


_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}


@pytest.mark.parametrize("messages, extra, param, words", [
    ([{"role": "user", "content": "Hi", "tool_calls": [_CALL]}], {}, "messages[0].tool_calls",
     "only assistant messages make tool calls"),
    ([{"role": "assistant", "content": None, "tool_calls": _CALL}], {}, "messages[0].tool_calls",
     "must be a list of tool calls"),
    ([{"role": "assistant", "tool_calls": ["add"]}], {}, "messages[0].tool_calls[0]", "must be a tool call object"),
    ([{"role": "assistant", "tool_calls": [{**_CALL, "type": "retrieval"}]}], {}, "messages[0].tool_calls[0].type",
     "must be 'function'"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}], {},
     "messages[0].tool_calls[0].function", "must be an object with 'name' and 'arguments'"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": " ", "arguments": "{}"}}]}], {},
     "messages[0].tool_calls[0].function.name", "must be a non-empty string"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a: 1}"}}]}], {},
     "messages[0].tool_calls[0].function.arguments", "must be a JSON object encoded as a string, got '{a: 1}'"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "[1, 2]"}}]}], {},
     "messages[0].tool_calls[0].function.arguments", "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{**_CALL, "id": 7}]}], {}, "messages[0].tool_calls[0].id",
     "must be a string, got 7"),
    ([{"role": "user", "content": "Hi", "reasoning": "Hmm."}], {}, "messages[0].reasoning",
     "only assistant messages carry reasoning (this one is 'user')"),
    ([{"role": "assistant", "content": "5", "reasoning_content": 5}], {}, "messages[0].reasoning_content",
     "must be a string, got 5"),
    ([{"role": "assistant", "content": "5", "reasoning": "a", "reasoning_content": "b"}], {},
     "messages[0].reasoning_content", "give the reasoning once ('reasoning' and 'reasoning_content' differ)"),
    ([{"role": "tool", "content": "5", "tool_call_id": ""}], {}, "messages[0].tool_call_id",
     "must be a non-empty string"),
    ([{"role": "tool", "content": "5", "name": 3}], {}, "messages[0].name", "must be a non-empty string, got 3"),
    (QUESTION, {"tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]}, "tools",
     "tool definitions ('tools') are not supported"),
    (QUESTION, {"functions": [{"name": "add"}]}, "functions", "tool definitions ('functions') are not supported"),
    (QUESTION, {"tool_choice": "required"}, "tool_choice", "'tool_choice' must be 'auto'"),
], ids=lambda value: None)
def test_malformed_tool_calls_reasoning_and_tools_get_a_400_naming_the_field(stubbed, messages, extra, param,
                                                                                words):
    """Each is an OpenAI-format 400 whose ``param`` names the message and field, and the model is not asked. Tool
    definitions are refused, not ignored: no template posttrain renders would show them to the model."""
    client, calls = stubbed
    response = client.post("/v1/chat/completions", json={"messages": messages, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words in error["message"]
    assert calls == []


def test_a_reply_sent_back_with_reasoning_under_both_names_and_null_fields_is_accepted():
    """What an OpenAI client sends back of a reply: the same reasoning as ``reasoning`` and ``reasoning_content``,
    ``tool_calls: []`` or null, ``refusal: null``; read as one reasoning and no tool calls. Empty arguments are {}."""
    messages, _ = parse_request({"messages": QUESTION + [
        {"role": "assistant", "content": "5", "reasoning": "2 + 3.", "reasoning_content": "2 + 3.",
         "tool_calls": [], "refusal": None},
        {"role": "user", "content": "Again", "tool_calls": None, "reasoning_content": None},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": ""}}]}]})
    assert messages[1:] == [{"role": "assistant", "content": "5", "reasoning": "2 + 3."},
                            {"role": "user", "content": "Again"},
                            {"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]


_TEXT = st.none() | st.text(max_size=3)
_ARGUMENTS = (st.sampled_from(['{"a": 1}', "{}", "", None, {"a": [1]}])
              | st.sampled_from(["[1]", "nope", '"x"', "[" * 3000]) | _JSON)
_REASONING = ["reasoning", "reasoning_content", "thinking"]


@st.composite
def _message(draw) -> dict:
    """A message with the fields its role may carry (one reasoning field), holding text or null (a plausible
    message), or, half the time, any of the fields holding any JSON (a wild one)."""
    wild = draw(st.booleans())
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    value = (_TEXT | _JSON) if wild else _TEXT
    call = st.fixed_dictionaries({"function": st.fixed_dictionaries(
        {"name": st.just("add") | value}, optional={"arguments": _ARGUMENTS})},
        optional={"type": st.sampled_from(["function", None]) | value, "id": value})
    if wild:
        keys = draw(st.lists(st.sampled_from(["tool_calls", "tool_call_id", "name", *_REASONING]), unique=True))
    else:
        keys = {"assistant": ["tool_calls", draw(st.sampled_from(_REASONING))], "tool": ["tool_call_id", "name"]}
        keys = draw(st.lists(st.sampled_from(keys[role]), unique=True)) if role in keys else []
    message = {"role": role, "content": draw(value)}
    for key in keys:
        message[key] = draw(st.lists(call, min_size=1, max_size=2) | value if key == "tool_calls" else value)
    return message


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(_message(), min_size=1, max_size=3), options=st.dictionaries(
    st.sampled_from(["tools", "functions", "tool_choice"]), st.sampled_from([None, [], "auto"]) | _JSON))
def test_any_message_fields_are_read_into_posttrains_schema_or_refused(messages, options):
    """parse_request raises nothing but BadRequest whatever the tool calls, reasoning and tool fields hold, and
    the messages it accepts pass posttrain's own message validation (``check_messages``, what the loaders apply)."""
    from posttrain.data.io import Row, check_messages

    try:
        accepted, _ = parse_request({"messages": messages, **options})
    except BadRequest:
        return
    assert check_messages(Row({}, "request", "body"), accepted, "messages", allow_empty_content=True) == accepted


# ---------------------------------------------------------------------------------------------------------------
# posttrain chat with a harmony model.


@pytest.fixture
def chat_model(tiny, monkeypatch):
    """``posttrain chat``'s model loader gives the loaded tiny Llama (no progress bar on stderr)."""
    monkeypatch.setattr("posttrain.models.load_causal_lm", lambda path, **kwargs: tiny[0])


def test_chat_shows_reasoning_and_tool_calls_and_keeps_the_history_in_posttrains_schema(
        tiny_model_dir, chat_model, harmony_tokenizer, scripted, monkeypatch, capsys):
    """``posttrain chat --chat_template harmony`` on stdin: a question the model answers with a tool call (its
    reasoning and the call on stderr, no reply on stdout), ``/tool`` answering it, then the answer (on stdout), a
    second question. The history keeps each reply as content, reasoning and tool calls, so the next prompt renders
    the first turn's call and result but none of its reasoning (harmony drops earlier turns' reasoning)."""
    import io

    from posttrain.stages.chat import ChatConfig, run_chat

    script, seen = scripted
    script += [harmony_completion(harmony_tokenizer, ANALYSIS + WEATHER_CALL),
               harmony_completion(harmony_tokenizer, "<|channel|>analysis<|message|>It is 20.<|end|>"
                                                     "<|start|>assistant<|channel|>final<|message|>20 C.<|return|>"),
               harmony_completion(harmony_tokenizer, "<|channel|>final<|message|>No tool for that.<|return|>")]
    monkeypatch.setattr("sys.stdin", io.StringIO('Weather in Paris?\n/tool {"temp": 20}\n/tool late\nAnd Rome?\n'))
    run_chat(ChatConfig(model=str(tiny_model_dir), chat_template="harmony", device="cpu"))
    out, err = capsys.readouterr()
    assert out == "20 C.\nNo tool for that.\n"
    assert err == ('thinking: Need the tool.\ntool call: get_weather({"city": "Paris"})\n'
                   "(answer it with /tool RESULT)\nthinking: It is 20.\nno tool call is waiting for a result\n")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turn = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning": "Need the tool.", "tool_calls": [call]},
            {"role": "tool", "name": "get_weather", "content": '{"temp": 20}'}]
    assert seen == [turn[:1], turn, turn + [{"role": "assistant", "content": "20 C.", "reasoning": "It is 20."},
                                           {"role": "user", "content": "And Rome?"}]]
    last_prompt = harmony_tokenizer.decode(render_prompt(harmony_tokenizer, seen[2]), skip_special_tokens=False)
    assert "to=functions.get_weather" in last_prompt and '{"temp": 20}' in last_prompt and "20 C." in last_prompt
    assert "Need the tool." not in last_prompt and "It is 20." not in last_prompt


def test_chat_one_shot_prints_only_the_final_answer(tiny_model_dir, chat_model, scripted, capsys):
    """``--prompt``: stdout is the final answer alone (scripts read it), the reasoning goes to stderr."""
    from posttrain.models import load_tokenizer
    from posttrain.stages.chat import ChatConfig, run_chat

    tokenizer = load_tokenizer(tiny_model_dir, "harmony")
    scripted[0].append(harmony_completion(tokenizer, "<|channel|>analysis<|message|>2 + 3.<|end|>"
                                                     "<|start|>assistant<|channel|>final<|message|>5<|return|>"))
    run_chat(ChatConfig(model=str(tiny_model_dir), chat_template="harmony", prompt="What is 2 + 3?", device="cpu"))
    assert capsys.readouterr() == ("5\n", "thinking: 2 + 3.\n")



# ---------------------------------------------------------------------------------------------------------------
# Abuse: what a hostile or careless client must not be able to do to the server.


def _raw_post(client, raw: bytes):
    return client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("field", [
    b'"max_tokens": 1e999', b'"max_tokens": -1e999', b'"max_tokens": NaN', b'"max_tokens": -5', b'"max_tokens": 0',
    b'"max_tokens": true', b'"max_tokens": "12"', b'"max_tokens": 1.5', b'"max_tokens": [8]', b'"max_tokens": 1e9',
    b'"max_tokens": 100000000000000000000000000000', b'"max_completion_tokens": 1e999', b'"seed": 1e999',
    b'"seed": 18446744073709551616', b'"seed": "7"', b'"temperature": NaN', b'"temperature": true',
    b'"temperature": 1' + b"0" * 400, b'"top_p": Infinity'])
def test_malformed_numbers_get_a_clean_400_and_never_reach_the_model(stubbed, field):
    """Each used to be a 500 (int(inf) raised OverflowError; a 65-bit seed overflowed torch's generator) or was
    accepted (true as 1, "12" as 12, 1.5 as 1; 1e9 tokens were generated); now an OpenAI-format 400 naming it."""
    client, calls = stubbed
    key = field.split(b'"')[1].decode()
    response = _raw_post(client, b'{"messages": [{"role": "user", "content": "Hi"}], %s}' % field)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == key and key in error["message"]
    assert calls == []


def test_a_failure_inside_the_server_is_a_500_in_openai_format(tiny, monkeypatch):
    """An exception in generation (say, out of memory) reaches an OpenAI client as its usual server error, not as
    starlette's plain-text "Internal Server Error"."""
    import posttrain.models.generation as generation

    def failing_generate(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generation, "generate", failing_generate)
    from fastapi.testclient import TestClient

    with TestClient(create_app(*tiny, "tiny"), raise_server_exceptions=False) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in response.json()["error"]["message"]


_KEYS = ["max_tokens", "max_completion_tokens", "seed", "temperature", "top_p", "n", "stream"]


@settings(max_examples=300, deadline=None)
@given(messages=st.just(QUESTION) | _JSON, options=st.dictionaries(st.sampled_from(_KEYS), _JSON))
def test_any_json_body_is_parsed_into_safe_values_or_refused(messages, options):
    """parse_request raises nothing but BadRequest (a 400), whatever the JSON, and what it accepts is in range:
    max_tokens an int in [1, max_tokens_limit], a seed that torch's generator takes, finite temperature and top_p."""
    try:
        _, parsed = parse_request({"messages": messages, **options}, max_tokens_limit=100)
    except BadRequest:
        return
    assert 0 <= parsed["temperature"] <= 2 and 0 < parsed["top_p"] <= 1
    assert parsed["max_tokens"] is None or (type(parsed["max_tokens"]) is int and 1 <= parsed["max_tokens"] <= 100)
    if parsed["seed"] is not None:
        torch.Generator().manual_seed(parsed["seed"])


def test_max_tokens_must_fit_the_model_context_and_the_server_limit(tiny, recorded):
    """The tiny Llama's context is 512 tokens (max_position_embeddings). Prompt + max_tokens = 512 is served with
    exactly that budget; one token more is OpenAI's context-length 400 (refused, not clamped); without max_tokens the
    default budget (1000 here) is cut to the room left; a prompt that fills the context is refused; max_tokens over
    max_tokens_limit is a 400 naming the limit. ``context`` (``--context_length``) overrides the config's."""
    model, tokenizer = tiny
    assert model.config.max_position_embeddings == 512
    room = 512 - len(render_prompt(tokenizer, QUESTION))
    long_prompt = [{"role": "user", "content": "1 + 1 = 2. " * 60}]
    assert 512 < len(render_prompt(tokenizer, long_prompt)) < 1024
    with _client(model, tokenizer, max_tokens_limit=1000, default_max_tokens=1000) as client:
        assert client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": room}).status_code == 200
        over = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": room + 1})
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
        assert "maximum context length is 512 tokens" in over.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={"messages": QUESTION}).status_code == 200
        full = client.post("/v1/chat/completions", json={"messages": long_prompt, "max_tokens": 1})
        assert full.status_code == 400 and full.json()["error"]["param"] == "messages"
    with _client(model, tokenizer, context=1024) as client:
        assert client.post("/v1/chat/completions", json={"messages": long_prompt, "max_tokens": 1}).status_code == 200
    with _client(model, tokenizer, max_tokens_limit=100) as client:
        assert client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 100}).status_code == 200
        too_many = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 101})
        assert too_many.status_code == 400 and "max_tokens_limit" in too_many.json()["error"]["message"]
    assert [call["max_new_tokens"] for call in recorded] == [room, room, 1, 100]


def test_bodies_too_large_malformed_or_nested_too_deep_are_refused(tiny, recorded):
    """Over max_body_bytes: 413, whether Content-Length announces it or the body comes in chunks; not JSON, not
    UTF-8, empty, or nested deeper than the JSON parser recurses (a RecursionError, once a 500): 400."""
    with _client(*tiny, max_body_bytes=2000) as client:
        padded = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode()
        announced = _raw_post(client, padded)
        assert announced.status_code == 413 and "max_body_bytes" in announced.json()["error"]["message"]
        chunked = client.post("/v1/chat/completions", content=iter([padded[:1000], padded[1000:]]))
        assert chunked.status_code == 413
        for raw in [b'{"messages": [', b"\xff\xfe{}", b"", b"[" * 1500, b'"text"']:
            response = _raw_post(client, raw)
            assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", raw
    assert recorded == []


@pytest.fixture
def renders(monkeypatch):
    """render_prompt as create_app sees it (patch before creating the app), counting its calls; the list of calls."""
    import posttrain.data.render as render

    calls, original = [], render.render_prompt

    def counting(tokenizer, messages, **kwargs):
        calls.append(messages)
        return original(tokenizer, messages, **kwargs)

    monkeypatch.setattr(render, "render_prompt", counting)
    return calls


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(tiny, recorded, renders):
    """30 000 characters cannot fit the tiny model's 512 tokens (a token of its vocabulary covers at most 13
    characters, 4 x that is the bound): a 400 naming the messages, without tokenizing them (before, the whole prompt
    was rendered first). A long prompt under the bound is still tokenized and counted exactly."""
    with _client(*tiny) as client:
        huge = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 30000}]})
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "messages", huge.text
        assert "30000 characters" in huge.json()["error"]["message"] and renders == []
        long = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "1 + 1 = 2. " * 60}]})
        assert long.status_code == 400 and "no room is left" in long.json()["error"]["message"] and len(renders) == 1
    assert recorded == []


_PIECES = st.sampled_from(["<|im_end|>", "  ", "\n", "12", "ab", "\U0001f600", "x" * 50, " " * 40])


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1) | st.lists(_PIECES, min_size=1).map("".join))
def test_the_character_bound_never_refuses_a_prompt_that_fits(world_tokenizer, text):
    """For any content, a context of exactly the prompt's tokens allows at least its characters, so the precheck only
    refuses what the tokenized check would refuse too."""
    from posttrain.stages.serve import max_prompt_chars

    tokenizer = world_tokenizer
    messages = [{"role": "user", "content": text}]
    try:
        tokens = len(render_prompt(tokenizer, messages))
    except ValueError:  # an unpaired surrogate: refused anyway
        return
    assert max_prompt_chars(tokenizer, tokens) >= len(text)


def test_no_character_bound_for_a_tokenizer_that_drops_characters(tiny):
    """A pre-tokenizer that splits on whitespace drops it (any number of spaces costs no token): no bound, no
    precheck. A normalizer that only composes characters (NFC) keeps the bound."""
    import copy

    from tokenizers import normalizers, pre_tokenizers

    from posttrain.stages.serve import max_prompt_chars

    tokenizer = copy.deepcopy(tiny[1])
    assert max_prompt_chars(tokenizer, 512) == 512 * 4 * 13 and max_prompt_chars(tokenizer, None) is None
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    assert max_prompt_chars(tokenizer, 512) == 512 * 4 * 13
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert max_prompt_chars(tokenizer, 512) is None


def test_an_error_while_rendering_is_not_called_invalid_json(tiny, recorded, monkeypatch):
    """A ValueError raised while the messages are rendered (by the template or the tokenizer) is a 400 that says so,
    not "the request body is not valid JSON" (which it used to be)."""
    import posttrain.data.render as render

    def failing(tokenizer, messages, **kwargs):
        raise ValueError("the tokenizer cannot take this")

    monkeypatch.setattr(render, "render_prompt", failing)
    with _client(*tiny) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION})
        garbage = _raw_post(client, b'{"messages": [')
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert response.json()["error"]["message"] == ("the messages cannot be rendered (ValueError: the tokenizer "
                                                   "cannot take this)")
    assert garbage.json()["error"]["message"] == "the request body is not valid JSON"
    assert recorded == []


@contextmanager
def _live(app):
    """``app`` served by ``make_server`` (what ``posttrain serve`` runs) on a free port in a thread; yields (server,
    port); stopped at the end as SIGTERM stops it, and must have stopped within 10 s."""
    server = make_server(app, "127.0.0.1", 0, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started or not thread.is_alive())
    assert server.started, "the server did not start"
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=10)
    assert not thread.is_alive(), "the server did not stop within 10 s"


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _open_request(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    """A socket that has sent a chat-completions request's headers (Content-Length ``declared``) and ``body``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body) if declared is None else declared, body))
    return sock


@dataclass
class SlowModel:
    """Stands in for generate(): one "token" per ``token_s`` until max_new_tokens or until ``should_stop()`` says
    stop (``stopped`` is then set); it gives up after 30 s, so that a missing stop fails a test instead of hanging."""

    token_s: float = 0.05
    started: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, should_stop=None, **options):
        self.started.set()
        tokens, give_up = 0, time.monotonic() + 30
        while tokens < max_new_tokens and time.monotonic() < give_up:
            time.sleep(self.token_s)
            tokens += 1
            if should_stop is not None and should_stop():
                self.stopped.set()
                break
        return [Completion(text="tok " * tokens, token_ids=[7] * tokens, finish_reason="length")]


@pytest.fixture
def slow_model(monkeypatch):
    import posttrain.models.generation as generation

    stub = SlowModel()
    monkeypatch.setattr(generation, "generate", stub)
    return stub


def test_a_body_that_does_not_arrive_in_time_gets_408(tiny, recorded):
    """A client that announces 100 bytes and sends 13 (a slow sender) gets 408 at request_timeout_s, instead of
    holding its connection and handler open forever."""
    with _live(create_app(*tiny, "tiny", request_timeout_s=1.0)) as (_, port):
        with _open_request(port, b'{"messages": ', declared=100) as sock:
            assert sock.recv(4096).split(b" ")[1] == b"408"
    assert recorded == []


def test_generation_stops_when_its_client_disconnects(tiny, slow_model):
    """A client that asks for 400 tokens (20 s of the slow model) and hangs up frees the model within a poll and a
    token, instead of holding it for the whole reply; the next request is then served."""
    with _live(create_app(*tiny, "tiny", request_timeout_s=600)) as (_, port):
        with _open_request(port, json.dumps({"messages": QUESTION, "max_tokens": 400}).encode()):
            assert slow_model.started.wait(10)
        assert slow_model.stopped.wait(5), "the generation went on after its client had gone"
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"messages": QUESTION, "max_tokens": 2})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_generation_stops_at_the_request_deadline_with_a_partial_reply(tiny, slow_model):
    """request_timeout_s=0.5: a 400-token reply (20 s of the slow model) ends at the deadline with what it has and
    finish_reason "length", as OpenAI clients expect of a reply cut short."""
    with _client(*tiny, request_timeout_s=0.5) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 400})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert slow_model.stopped.is_set() and 0 < response.json()["usage"]["completion_tokens"] < 400


def test_the_queue_is_bounded_and_shutdown_stops_the_running_generation(tiny, slow_model):
    """max_queue=1: one request generates, one waits, a third gets 429 in OpenAI's format with Retry-After (and does
    not queue). Shutdown (what SIGINT / SIGTERM call) stops the running generation, whose client gets the partial
    reply, answers the waiting one 503, and the server stops (``_live`` checks) instead of finishing 2 x 20 s."""
    app = create_app(*tiny, "tiny", max_queue=1, request_timeout_s=600)
    long = {"messages": QUESTION, "max_tokens": 400}
    with _live(app) as (server, port), ThreadPoolExecutor(2) as pool:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        running = pool.submit(httpx.post, url, json=long, timeout=60)
        assert slow_model.started.wait(10)
        waiting = pool.submit(httpx.post, url, json=long, timeout=60)
        _wait_until(lambda: app.state.admitted == 2)
        refused = httpx.post(url, json=long, timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and app.state.admitted == 2
        server.handle_exit(signal.SIGINT, None)
        first, second = running.result(timeout=10), waiting.result(timeout=10)
    assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "length"
    assert first.json()["usage"]["completion_tokens"] < 400 and slow_model.stopped.is_set()
    assert second.status_code == 503 and "shutting down" in second.json()["error"]["message"]


def test_a_full_queue_is_refused_before_the_prompt_is_rendered(tiny, slow_model, renders):
    """max_queue=0: while one request generates, the next gets 429 without its prompt being rendered (before, it was
    read, parsed and rendered, then refused); a malformed one still gets its 400."""
    app = create_app(*tiny, "tiny", max_queue=0, request_timeout_s=600)
    with _live(app) as (server, port), ThreadPoolExecutor(1) as pool:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        running = pool.submit(httpx.post, url, json={"messages": QUESTION, "max_tokens": 400}, timeout=60)
        assert slow_model.started.wait(10) and len(renders) == 1
        refused = httpx.post(url, json={"messages": CONVERSATION}, timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        malformed = httpx.post(url, json={"messages": QUESTION, "max_tokens": -1}, timeout=10)
        assert malformed.status_code == 400 and len(renders) == 1
        server.handle_exit(signal.SIGINT, None)
        assert running.result(timeout=10).status_code == 200


def test_the_stop_hook_cuts_a_generation_without_changing_its_tokens(tiny):
    """should_stop, asked before the prefill and after each token, cuts a seeded sampled reply to a prefix of the
    uncut one: the same token ids and the same log-probs (the hook draws nothing and changes no logits),
    finish_reason "length"; a hook that never fires changes nothing."""
    from posttrain.models.generation import HFEngine, SamplingParams

    engine = HFEngine(*tiny)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, logprobs=True)
    full = engine.generate([QUESTION], params)[0][0]
    assert engine.generate([QUESTION], params, should_stop=lambda: False)[0][0] == full
    asked = []
    cut = engine.generate([QUESTION], params, should_stop=lambda: asked.append(1) or len(asked) >= 7)[0][0]
    assert len(full.token_ids) > 6 and len(asked) == 7  # once before the prefill, then after each of 6 tokens
    assert cut.token_ids == full.token_ids[:6] and cut.logprobs == full.logprobs[:6]
    assert cut.finish_reason == "length" and cut.text == tiny[1].decode(full.token_ids[:6], skip_special_tokens=True)


def test_the_stop_hook_skips_the_prompts_not_started(tiny):
    """batch_size=1 decodes three prompts one after another (the longest first). A stop during the first reply ends
    it and leaves the other two unstarted: one prefill in all (before, each later prompt was still prefilled and
    given a token), and empty completions with finish_reason "length" for them."""
    from posttrain.models.generation import Completion, HFEngine, SamplingParams

    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=1)
    prompts = [QUESTION, CONVERSATION, [{"role": "user", "content": "Hi"}]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True)
    full = engine.generate(prompts, params)
    assert len(full[1][0].token_ids) > 3
    prefills, asked, original = [], [], model.forward

    def recording_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == kwargs["attention_mask"].shape[1]:  # a prefill
            prefills.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.forward = recording_forward
    try:  # asked before the first prefill, after tokens 1, 2 and 3 (True), then not again
        cut = engine.generate(prompts, params, should_stop=lambda: asked.append(1) or len(asked) >= 4)
    finally:
        del model.forward
    assert prefills == [1] and len(asked) == 5
    assert cut[1][0].token_ids == full[1][0].token_ids[:3] and cut[1][0].finish_reason == "length"
    assert cut[0] == cut[2] == [Completion(text="", token_ids=[], finish_reason="length", logprobs=[])]
    stopped = engine.generate(prompts, params, should_stop=lambda: True)  # stopped before it started: no prefill
    assert [c[0].token_ids for c in stopped] == [[], [], []]


def test_serve_options_are_checked_before_the_model_loads(tmp_path):
    from posttrain.plumbing.config import ConfigError
    from posttrain.stages.serve import ServeConfig, run_serve

    for option, value in [("max_queue", -1), ("request_timeout_s", 0.0), ("request_timeout_s", float("nan")),
                          ("max_body_bytes", 0), ("max_tokens_limit", 0), ("max_tokens", 5000), ("context_length", -1)]:
        with pytest.raises(ConfigError, match=option):  # the directory does not exist: the check came first
            run_serve(ServeConfig(model=str(tmp_path / "missing"), **{option: value}))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hostile_clients_leave_the_server_serving(tiny):
    """benchmarks/serve_load.py for 3 s against the real tiny model: polite clients are served next to huge
    max_tokens, malformed numbers and JSON, 2 MiB bodies, clients that hang up, a slow sender and bursts; each
    hostile kind gets its 4xx, nothing gets a 5xx, and /v1/models answers throughout (a liveness bound, not a
    speed assertion)."""
    with _live(create_app(*tiny, "tiny", max_queue=4, request_timeout_s=2.0)) as (_, port):
        result = _load_benchmark().run_load(port, 3.0, polite=2, burst=8)
    counts = result["counts"]
    assert counts["polite"][200] > 0 and set(counts["polite"]) <= {200, 429, 503}
    assert set(counts["numbers"]) == {400} and set(counts["garbage"]) == {400}
    assert counts["giant"][413] > 0 and all(status == 413 or isinstance(status, str) for status in counts["giant"])
    assert set(counts["slow"]) == {408}
    assert set(counts["probe"]) == {200} and max(result["probe_latency"]) < 10
    assert 500 not in {status for c in counts.values() for status in c}


@pytest.fixture(scope="module")
def endless_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a 65 536-token context (RoPE has no trained length limit; the weights are random anyway)
    and zero output rows for its stop tokens (logit 0 never wins the greedy argmax): a reply runs for minutes."""
    from posttrain.data.render import end_of_turn_token_ids
    from posttrain.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[end_of_turn_token_ids(tokenizer)] = 0.0
    model.config.max_position_embeddings = 1 << 16
    path = tmp_path_factory.mktemp("tiny-endless")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_server_during_a_long_generation(endless_model_dir, tmp_path, sig):
    """A real ``posttrain serve`` generating a 60 000-token reply (minutes on a CPU) exits within 15 s of SIGINT or
    SIGTERM (about 1 s alone, most of it the interpreter's teardown of torch; the bound leaves room for a loaded
    machine under ``make test -n 2``), and the client gets the partial reply. Before, uvicorn's graceful shutdown
    waited for the whole reply (minutes), and a second Ctrl-C was needed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    import posttrain

    env = dict(os.environ, PYTHONPATH=str(Path(posttrain.__file__).parents[1]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")  # the server runs the posttrain this test imports
    command = [sys.executable, "-m", "posttrain.cli", "serve", "--model", str(endless_model_dir), "--port", str(port),
               "--max_tokens_limit", "60000", "--log_level", "warning"]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    pool = ThreadPoolExecutor(1)
    try:
        _wait_until(answers, timeout=120)
        assert process.poll() is None, log.read_text()
        reply = pool.submit(httpx.post, f"{url}/chat/completions", timeout=120,
                            json={"messages": QUESTION, "max_tokens": 60000, "temperature": 0})
        time.sleep(1.5)  # the generation is under way
        assert not reply.done(), reply.result().text
        process.send_signal(sig)
        process.wait(timeout=15)
        response = reply.result(timeout=5)
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
        assert 0 < response.json()["usage"]["completion_tokens"] < 60000
        assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGTERM), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        pool.shutdown()  # its request ends with the process
