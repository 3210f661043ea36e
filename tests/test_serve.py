"""``posttrain serve`` in process: what reaches the model (the whole conversation, rendered as in training) and what
reaches generation (temperature, top_p, seed, max_tokens) from a chat-completions request.

A stub generate function records what ``create_app`` passes it; the tiny random Llama checks the real path: the
token ids the model is given, and that the seed makes sampling reproducible. (The refusals and the end-to-end server
are tested in test_judge.py.)
"""

from __future__ import annotations

import pytest
import torch

from posttrain.data.render import render_prompt
from posttrain.models.generation import Completion

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
]


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
def stubbed(tiny, monkeypatch):
    """A served app whose generate function is a stub: it records each call and replies "The answer is 8."."""
    import posttrain.models.generation as generation

    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append({"model": model, "prompts": prompts, **kwargs})
        return [Completion(text="The answer is 8.", token_ids=[11, 12, 13], finish_reason="length") for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    with _client(*tiny, default_max_tokens=9) as client:
        yield client, calls


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
