"""LLM-as-a-judge, ``posttrain serve`` and ``posttrain label``.

Unit tests use a scripted judge (a function of the judge conversation) or a stub HTTP endpoint on 127.0.0.1; the
end-to-end test starts a real ``posttrain serve`` process on the tiny random Llama and judges through it with the
OpenAI backend. Only loopback addresses are used.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from posttrain import cli
from posttrain.rewards.judge import (
    PAIRWISE_SYSTEM,
    SINGLE_SYSTEM,
    JudgeRequestError,
    JudgeReward,
    JudgeStats,
    OpenAIBackend,
    backoff_delays,
    combine_swapped,
    judge_pair,
    judge_pairs,
    pairwise_messages,
    parse_pairwise_verdict,
    parse_rating,
    question_text,
    single_messages,
    win_rate,
)
from posttrain.stages.label import LabelConfig, label_pairs, read_principles, run_label

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# Prompts and parsing.


def test_pairwise_prompt_puts_question_and_answers_in_their_slots():
    system, user = pairwise_messages("What is 2 + 3?", "first answer", "second answer")
    assert system == {"role": "system", "content": PAIRWISE_SYSTEM}
    assert user["role"] == "user"
    text = user["content"]
    assert text.startswith("[User Question]\nWhat is 2 + 3?\n\n")
    a = text.index("[The Start of Assistant A's Answer]\nfirst answer\n[The End of Assistant A's Answer]")
    b = text.index("[The Start of Assistant B's Answer]\nsecond answer\n[The End of Assistant B's Answer]")
    assert a < b
    assert '"[[C]]" for a tie.' in PAIRWISE_SYSTEM


def test_principles_are_appended_as_a_numbered_list(tmp_path):
    path = tmp_path / "principles.txt"
    path.write_text("1. Prefer the correct answer.\n\n- Prefer the shorter answer.\n")
    principles = read_principles(path)
    assert principles == ["Prefer the correct answer.", "Prefer the shorter answer."]
    system = pairwise_messages("q", "a", "b", principles)[0]["content"]
    assert system.startswith(PAIRWISE_SYSTEM)
    assert system.endswith("\n1. Prefer the correct answer.\n2. Prefer the shorter answer.")
    single = single_messages("q", "the answer", principles)
    assert single[0]["content"].startswith(SINGLE_SYSTEM) and "2. Prefer the shorter answer." in single[0]["content"]
    assert "[Question]\nq\n\n[The Start of Assistant's Answer]\nthe answer\n" in single[1]["content"]


def test_question_text_from_prompts():
    assert question_text("plain") == "plain"
    assert question_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    assert question_text(turns) == "User: hi\n\nAssistant: hello\n\nUser: and?"


@pytest.mark.parametrize("text, verdict", [
    ("A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good. [[C]]", "tie"),
    ("At first [[A]] seemed right, but on reflection [[B]]", "B"),  # the last verdict wins
    ('Output "[[A]]" if A is better... My verdict: [[C]]', "tie"),
    ("[[A]] then [[D]]", "A"),  # [[D]] is not a verdict
    ("[[D]]", None),
    ("", None),
    ("A is better.", None),
    ("[A]", None),
    ("[[a]]", None),
    (None, None),
])
def test_parse_pairwise_verdict(text, verdict):
    assert parse_pairwise_verdict(text) == verdict


@pytest.mark.parametrize("text, rating", [
    ("Good answer. Rating: [[7]]", 7.0),
    ("Rating: [[7.5]]", 7.5),
    ("[[1]]", 1.0),
    ("[[10]]", 10.0),
    ('Format "Rating: [[5]]". Mine: Rating: [[8]]', 8.0),  # last wins
    ("Rating: [[0]]", None),
    ("Rating: [[11]]", None),
    ("Rating: 7", None),
    ("Rating: [[seven]]", None),
    ("", None),
    (None, None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_combine_swapped():
    assert combine_swapped("A", "B") == ("A", False)  # A wins in both orders
    assert combine_swapped("B", "A") == ("B", False)
    assert combine_swapped("tie", "tie") == ("tie", False)
    assert combine_swapped("A", "A") == ("tie", True)  # always the first position: position bias
    assert combine_swapped("A", "tie") == ("tie", True)
    assert combine_swapped(None, "A") == (None, False)
    assert combine_swapped("B", None) == (None, False)


# ---------------------------------------------------------------------------------------------------------------
# Swap debiasing with a scripted judge.

_ANSWERS = re.compile(r"Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\].*"
                      r"Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", re.DOTALL)


class ScriptedJudge:
    """A judge backend whose reply is ``script(answer_a, answer_b)``; records every conversation it sees."""

    def __init__(self, script):
        self.script, self.seen = script, []

    def complete(self, conversations):
        self.seen += conversations
        replies = []
        for messages in conversations:
            found = _ANSWERS.search(messages[-1]["content"])
            replies.append(self.script(*found.groups()) if found else self.script(messages[-1]["content"], None))
        return replies


def prefers(word):
    """A position-consistent judge: the answer containing ``word`` wins."""
    return lambda a, b: "Explanation... [[A]]" if word in a else "[[B]]" if word in b else "[[C]]"


def test_swap_debiasing_keeps_consistent_verdicts_in_both_orders():
    judge, stats = ScriptedJudge(prefers("good")), JudgeStats()
    verdicts = judge_pairs(judge, ["q1", "q2", "q3"], ["good", "bad", "meh"], ["bad", "good", "meh"], stats=stats)
    assert verdicts == ["A", "B", "tie"]
    # each pair asked in both orders: (a, b) then (b, a)
    assert [_ANSWERS.search(m[-1]["content"]).groups() for m in judge.seen[:2]] == [("good", "bad"), ("bad", "good")]
    assert stats == JudgeStats(calls=6, unparseable=0, inconsistent=0)


def test_swap_debiasing_turns_position_bias_into_ties_and_counts_unparseable():
    stats = JudgeStats()
    always_first = ScriptedJudge(lambda a, b: "[[A]]")
    assert judge_pair(always_first, "q", "x", "y", stats=stats) == "tie"
    assert stats.inconsistent == 1
    garbage = ScriptedJudge(lambda a, b: "I refuse to choose.")
    assert judge_pair(garbage, "q", "x", "y", stats=stats) is None
    half = ScriptedJudge(lambda a, b: "[[A]]" if a == "x" else "no verdict")  # readable in one order only
    assert judge_pair(half, "q", "x", "y", stats=stats) is None
    assert stats == JudgeStats(calls=6, unparseable=3, inconsistent=1)
    assert stats.as_dict() == {"judge/calls": 6, "judge/unparseable": 3, "judge/inconsistent": 1}


def test_judge_reward_and_win_rate():
    ratings = ScriptedJudge(lambda text, _: "Rating: [[9]]" if "The answer is 5." in text else "meh")
    reward = JudgeReward(ratings, principles=["Be correct."])
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    completions = ["The answer is 5.", [{"role": "assistant", "content": "The answer is 6."}]]
    assert reward(prompts, completions, answer=[5, 5]) == [9.0, None]
    assert reward.stats.calls == 2 and reward.stats.unparseable == 1
    assert "1. Be correct." in ratings.seen[0][0]["content"]

    judge = ScriptedJudge(prefers("good"))
    result = win_rate(judge, ["q"] * 4, ["good", "good", "bad", "x"], ["bad", "bad", "good", "x"])
    assert result == {"win_rate": (2 + 0.5) / 4, "wins": 2, "losses": 1, "ties": 1, "unjudged": 0}


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI backend against a stub endpoint on 127.0.0.1.


class StubEndpoint:
    """A chat-completions endpoint that fails its first ``fail_first`` requests with ``fail_status``."""

    def __init__(self, *, fail_first=0, fail_status=503, delay_s=0.0, reply="Judged. [[A]]"):
        self.fail_first, self.fail_status, self.delay_s, self.reply = fail_first, fail_status, delay_s, reply
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests += 1
                    number = stub.requests
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(stub.delay_s)
                with stub.lock:
                    stub.in_flight -= 1
                if number <= stub.fail_first:
                    self._send(stub.fail_status, {"error": {"message": "try later", "type": "server_error"}})
                    return
                content = stub.reply if body["temperature"] == 0 else "sampled"
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    stubs = []

    def make(**kwargs):
        stubs.append(StubEndpoint(**kwargs))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def backend_for(stub, **kwargs) -> OpenAIBackend:
    options = dict(base_url=stub.url, api_key="test", retries=3, backoff_s=0.01, timeout_s=10.0)
    backend = OpenAIBackend("judge", **(options | kwargs))
    backend.sleeps = []
    backend._sleep = backend.sleeps.append  # record the backoff instead of waiting it out
    return backend


def one_question(text="q"):
    return [[{"role": "user", "content": text}]]


def test_backoff_delays_double_and_cap():
    assert backoff_delays(4, 0.5) == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delays(3, 10.0, cap_s=15.0) == [10.0, 15.0, 15.0]
    assert backoff_delays(0, 1.0) == []


def test_openai_backend_retries_server_errors_with_exponential_backoff(stub_factory):
    stub = stub_factory(fail_first=2, fail_status=503)
    backend = backend_for(stub, backoff_s=0.5)
    assert backend.complete(one_question()) == ["Judged. [[A]]"]
    assert stub.requests == 3 and backend.requests == 3 and backend.failed == 0
    assert backend.sleeps == [0.5, 1.0]


def test_openai_backend_gives_up_after_its_retries_without_raising(stub_factory):
    stub = stub_factory(fail_first=100, fail_status=500)
    backend = backend_for(stub, retries=2)
    stats = JudgeStats()
    assert judge_pair(backend, "q", "a", "b", stats=stats) is None  # both orders failed -> cannot judge
    assert stub.requests == 2 * 3 and backend.failed == 2 and backend.errors
    assert stats.unparseable == 2


def test_openai_backend_does_not_retry_a_bad_request_and_raises_on_auth_errors(stub_factory):
    stub = stub_factory(fail_first=1, fail_status=400)
    backend = backend_for(stub)
    assert backend.complete(one_question()) == [""]
    assert stub.requests == 1 and backend.failed == 1 and backend.sleeps == []
    with pytest.raises(JudgeRequestError, match="401"):
        backend_for(stub_factory(fail_first=1, fail_status=401)).complete(one_question())


def test_openai_backend_times_out_slow_requests(stub_factory):
    stub = stub_factory(delay_s=1.0)
    backend = backend_for(stub, timeout_s=0.2, retries=1)
    start = time.monotonic()
    assert backend.complete(one_question()) == [""]
    assert backend.failed == 1 and backend.requests == 2 and "Timeout" in backend.errors[0]
    assert time.monotonic() - start < 1.5


def test_openai_backend_bounds_concurrency(stub_factory):
    stub = stub_factory(delay_s=0.2)
    backend = backend_for(stub, concurrency=3)
    replies = backend.complete([one_question(f"q{i}")[0] for i in range(7)])
    assert replies == ["Judged. [[A]]"] * 7
    assert 2 <= stub.max_in_flight <= 3


def test_openai_backend_cache_answers_repeated_requests_from_disk(stub_factory, tmp_path):
    stub = stub_factory()
    cache = tmp_path / "cache.jsonl"
    conversations = [one_question("q1")[0], one_question("q2")[0], one_question("q1")[0]]
    first = backend_for(stub, cache=cache).complete(conversations)
    assert stub.requests == 2  # q1 asked once although it appears twice
    assert len(cache.read_text().splitlines()) == 2
    again = backend_for(stub, cache=cache)  # a new process would load the same file
    assert again.complete(conversations) == first
    assert stub.requests == 2 and again.requests == 0
    backend_for(stub, cache=cache, temperature=0.7).complete(one_question("q1"))  # temperature is in the key
    assert stub.requests == 3


def test_openai_backend_does_not_cache_failures(stub_factory, tmp_path):
    stub = stub_factory(fail_first=1, fail_status=400)
    cache = tmp_path / "cache.jsonl"
    assert backend_for(stub, cache=cache).complete(one_question()) == [""]
    assert backend_for(stub, cache=cache).complete(one_question()) == ["Judged. [[A]]"]
    assert stub.requests == 2


# ---------------------------------------------------------------------------------------------------------------
# Labelling.


def world_pair(question, a, b):
    return [{"role": "user", "content": question}], [{"role": "assistant", "content": a}], \
        [{"role": "assistant", "content": b}]


def test_label_pairs_writes_chosen_rejected_and_drops_ties_and_unparseable():
    pairs = [world_pair("What is 2 + 3?", "The answer is 5.", "The answer is 6."),
             world_pair("What is 4 + 4?", "The answer is 9.", "The answer is 8."),
             world_pair("Say hello.", "same", "same"),
             world_pair("Say bye.", "??", "bye")]
    judge = ScriptedJudge(lambda a, b: "no idea" if "??" in a + b else prefers("answer is 5.")(a, b)
                          if "5." in a + b else prefers("answer is 8.")(a, b))
    rows, report = label_pairs(judge, pairs)
    assert rows == [{"prompt": pairs[0][0], "chosen": pairs[0][1], "rejected": pairs[0][2]},
                    {"prompt": pairs[1][0], "chosen": pairs[1][2], "rejected": pairs[1][1]}]
    assert report["labelled"] == 2 and report["dropped_tie"] == 1 and report["dropped_unparseable"] == 1
    assert report["judge/calls"] == 8 and report["judge/unparseable"] == 2
    assert report["gold/compared"] == 2 and report["gold/agreement"] == 1.0

    contrarian = ScriptedJudge(lambda a, b: prefers("answer is 6.")(a, b) if "5." in a + b else "[[C]]")
    _, report = label_pairs(contrarian, pairs[:2])
    assert report["labelled"] == 1 and report["gold/compared"] == 1 and report["gold/agreement"] == 0.0


def test_run_label_reads_strings_or_messages_and_writes_jsonl(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "completion_a": "The answer is 6.", "completion_b": "The answer is 5."},
            {"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
             "completion_a": [{"role": "assistant", "content": "The answer is 2."}],
             "completion_b": "The answer is 3."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    principles = tmp_path / "principles.txt"
    principles.write_text("Prefer correct arithmetic.\n")
    judge = ScriptedJudge(lambda a, b: "[[A]]" if a.endswith(("5.", "2.")) else "[[B]]")
    out = tmp_path / "labels" / "prefs.jsonl"
    report = run_label(LabelConfig(data=str(data), out=str(out), principles=str(principles)), backend=judge)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
         "chosen": [{"role": "assistant", "content": "The answer is 5."}],
         "rejected": [{"role": "assistant", "content": "The answer is 6."}]},
        {"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
         "chosen": [{"role": "assistant", "content": "The answer is 2."}],
         "rejected": [{"role": "assistant", "content": "The answer is 3."}]},
    ]
    assert report["gold/agreement"] == 1.0
    assert all("1. Prefer correct arithmetic." in m[0]["content"] for m in judge.seen)


# ---------------------------------------------------------------------------------------------------------------
# posttrain serve: in process, then end to end in its own process.


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from posttrain.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_local_backend_judges_greedily_through_generate(tiny_model, tiny_model_dir, tmp_path, capsys):
    from posttrain.rewards.judge import LocalBackend

    backend = LocalBackend(*tiny_model, max_new_tokens=3)
    conversations = pairwise_messages("What is 2 + 3?", "5", "6"), single_messages("What is 2 + 3?", "5")
    replies = backend.complete(list(conversations))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert backend.complete(list(conversations)) == replies  # temperature 0: the same replies again
    # the verdict is the swap-debiased combination of the judge's greedy replies in both orders
    both_orders = backend.complete([pairwise_messages("What is 2 + 3?", "5", "6"),
                                    pairwise_messages("What is 2 + 3?", "6", "5")])
    stats = JudgeStats()
    assert judge_pair(backend, "What is 2 + 3?", "5", "6", stats=stats) == combine_swapped(
        parse_pairwise_verdict(both_orders[0]), parse_pairwise_verdict(both_orders[1]))[0]
    assert stats.calls == 2 and stats.unparseable == sum(parse_pairwise_verdict(r) is None for r in both_orders)

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion_a": "5", "completion_b": "6"}) + "\n")
    out = tmp_path / "prefs.jsonl"
    argv = ["label", "--data", str(data), "--out", str(out), "--judge_model", str(tiny_model_dir), "--max_tokens", "3",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "labelled" in capsys.readouterr().out and out.exists()


@pytest.fixture(scope="module")
def served_app(tiny_model):
    from fastapi.testclient import TestClient

    from posttrain.stages.serve import create_app

    with TestClient(create_app(*tiny_model, "tiny", default_max_tokens=4)) as client:
        yield client


def test_serve_app_answers_and_refuses_what_it_cannot_do(served_app):
    assert served_app.get("/v1/models").json()["data"][0]["id"] == "tiny"
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    body = served_app.post("/v1/chat/completions", json={"messages": messages, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] <= 4  # default_max_tokens when max_tokens is absent
    for bad, param in [({"messages": messages, "n": 2}, "n"), ({"messages": messages, "stream": True}, "stream"),
                       ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                        "messages[0].role"),
                       ({"messages": messages, "temperature": 3}, "temperature")]:
        response = served_app.post("/v1/chat/completions", json=bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``python -m posttrain.cli serve`` on 127.0.0.1 (terminated at teardown)."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
             "--model_name", "tiny", "--log_level", "warning",
             "--context_length", "1024"],  # the judge prompt (573 tokens) is longer than the tiny model's 512
            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"posttrain serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/models", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"posttrain serve did not answer within 90 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_returns_a_well_formed_chat_completion(server, tiny_model):
    """The served reply at temperature 0 is the model's greedy reply, as generated in this process."""
    import httpx

    from posttrain.data.render import render_prompt
    from posttrain.models.generation import generate

    assert httpx.get(f"{server}/models").json()["data"][0]["id"] == "tiny"
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    response = httpx.post(f"{server}/chat/completions", timeout=30, json={
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    greedy = generate(*tiny_model, [messages], max_new_tokens=6, temperature=0.0)[0]
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": greedy.text}
    assert choice["finish_reason"] == greedy.finish_reason
    prompt_tokens = len(render_prompt(tiny_model[1], messages))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(greedy.token_ids),
                             "total_tokens": prompt_tokens + len(greedy.token_ids)}


def test_judge_end_to_end_through_posttrain_serve(server, tmp_path):
    backend = OpenAIBackend("tiny", base_url=server, api_key="anything", max_tokens=6, concurrency=2, retries=1,
                            timeout_s=60, cache=tmp_path / "cache.jsonl")
    prompts = ["What is 2 + 3?", [{"role": "user", "content": "What is 4 + 4?"}]]
    answers_a, answers_b = ["The answer is 5.", "The answer is 9."], ["The answer is 6.", "The answer is 8."]
    stats = JudgeStats()
    verdicts = judge_pairs(backend, prompts, answers_a, answers_b, stats=stats)
    assert len(verdicts) == 2
    assert stats.calls == 4 and backend.requests == 4 and backend.failed == 0

    # The same conversations again come from the cache; their replies explain the counts.
    conversations = []
    for prompt, a, b in zip(prompts, answers_a, answers_b):
        question = question_text(prompt)
        conversations += [pairwise_messages(question, a, b), pairwise_messages(question, b, a)]
    replies = backend.complete(conversations)
    assert backend.requests == 4
    parsed = [parse_pairwise_verdict(r) for r in replies]
    assert stats.unparseable == sum(v is None for v in parsed)
    assert verdicts == [combine_swapped(parsed[i], parsed[i + 1])[0] for i in (0, 2)]

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion_a": a, "completion_b": b}) + "\n"
                            for p, a, b in zip(prompts, answers_a, answers_b)))
    out = tmp_path / "prefs.jsonl"
    report = run_label(LabelConfig(data=str(data), out=str(out), judge_base_url=server, judge_model_name="tiny",
                                   max_tokens=6, cache=str(tmp_path / "cache.jsonl"), progress=False))
    assert report["pairs"] == 2 and report["judge/requests"] == 0  # all four replies were cached
    assert len(out.read_text().splitlines()) == report["labelled"]
    assert report["labelled"] + report["dropped_tie"] + report["dropped_unparseable"] == 2


def test_cli_lists_and_documents_the_new_commands(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "serve" in usage and "label" in usage
    assert cli.main(["serve", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    assert cli.main(["label", "--help"]) == 0
    assert "--judge_base_url" in capsys.readouterr().out
    assert cli.main(["label", "--data", "x.jsonl", "--out", "y.jsonl"]) == 2  # no judge given: a clear error
    assert "judge_model" in capsys.readouterr().err
