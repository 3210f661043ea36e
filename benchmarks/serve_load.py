"""Load test of ``posttrain serve`` on loopback: well-behaved clients next to hostile ones, for a fixed time.

Starts ``posttrain serve`` on a tiny random Llama (512-token context, CPU) on a free port with ``--max_queue 8
--request_timeout_s 5``, runs these clients side by side for ``--seconds``, then sends SIGINT during a long reply:

  polite   short chats (max_tokens 16, greedy), one after another; after a 429 / 503 they wait its Retry-After
  greedy   long replies (max_tokens 400 of the 512-token context), again and again (legitimate but heavy)
  numbers  max_tokens 1e9, 1e999, NaN, -1, true, "12" and seed 1e999 (each must be a 400, not a 500)
  garbage  bodies that are not JSON, not UTF-8, or nested 100 000 deep (400)
  giant    a 2 MiB body (413; the server may close the connection before the client has sent it all)
  leaver   a greedy request whose connection is closed after 0.3 s (its generation must stop)
  slow     a body sent one byte every 0.2 s (408 at request_timeout_s)
  burst    every 2 s, 12 polite requests at once: beyond max_queue they get 429
  probe    GET /v1/models every 0.1 s: its worst latency says whether the server stayed responsive

Hostile clients pause 20 ms between requests (the load generator shares the CPU with the server). Prints the status
codes per client kind, the polite clients' latency percentiles, /v1/models's worst latency and the time the server
took to exit after SIGINT. Timings depend on the machine; the status codes should not.

Usage: python benchmarks/serve_load.py [--seconds 20] [--polite 4] [--model DIR]
(tests/test_serve.py runs ``run_load`` for 3 s against an in-process server.)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_PAUSE_S = 0.02
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
POLITE = json.dumps({"messages": QUESTION, "max_tokens": 16, "temperature": 0}).encode()
BAD_NUMBERS = [b'"max_tokens": 1e9', b'"max_tokens": 1e999', b'"max_tokens": NaN', b'"max_tokens": -1',
               b'"max_tokens": true', b'"max_tokens": "12"', b'"seed": 1e999']
GARBAGE = [b'{"messages": [', b"\xff\xfe not utf-8", b"[" * 100_000, b'"just a string"']
KINDS = ["polite", "greedy", "burst", "numbers", "garbage", "giant", "leaver", "slow", "probe"]  # table order


def _greedy_body(tokens: int) -> bytes:
    return json.dumps({"messages": QUESTION, "max_tokens": tokens, "temperature": 1.0}).encode()


def _post(port: int, body: bytes, timeout: float = 120.0) -> tuple[int | str, float, float]:
    """(status, or the connection error's name; latency in s; Retry-After in s) of one chat-completions request."""
    start = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - start, float(response.getheader("retry-after") or 0)
    except OSError as err:
        return type(err).__name__, time.monotonic() - start, 0.0
    finally:
        connection.close()


def _raw(port: int, body: bytes) -> socket.socket:
    """A socket that has sent the headers of a chat-completions request announcing ``body`` (not the body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    return sock


def _status_line(data: bytes) -> int | str:
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "no-status"


def run_load(port: int, seconds: float, *, polite: int = 4, greedy_tokens: int = 400, burst: int = 12) -> dict:
    """Run the clients of the module docstring against 127.0.0.1:``port`` for ``seconds``; returns
    ``{"counts": {kind: Counter(status)}, "polite_latency": [s], "probe_latency": [s], "seconds": wall}``."""
    until = time.monotonic() + seconds
    lock = threading.Lock()
    counts: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)

    def record(kind: str, status, seconds_taken: float | None = None) -> None:
        with lock:
            counts[kind][status] += 1
            if seconds_taken is not None and status == 200:
                latency[kind].append(seconds_taken)

    def polite_client(kind: str = "polite", once: bool = False) -> None:
        while time.monotonic() < until:
            status, took, retry_after = _post(port, POLITE)
            record(kind, status, took)
            if once:
                return
            if status in (429, 503):
                time.sleep(retry_after or 1.0)

    def greedy_client() -> None:
        body = _greedy_body(greedy_tokens)
        while time.monotonic() < until:
            status, took, retry_after = _post(port, body)
            record("greedy", status)
            time.sleep(retry_after)

    def numbers_client() -> None:
        for i in range(10**9):
            if time.monotonic() >= until:
                return
            body = b'{"messages": %s, %s}' % (json.dumps(QUESTION).encode(), BAD_NUMBERS[i % len(BAD_NUMBERS)])
            record("numbers", _post(port, body)[0])
            time.sleep(HOSTILE_PAUSE_S)

    def garbage_client() -> None:
        for i in range(10**9):
            if time.monotonic() >= until:
                return
            record("garbage", _post(port, GARBAGE[i % len(GARBAGE)])[0])
            time.sleep(HOSTILE_PAUSE_S)

    def giant_client() -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
        while time.monotonic() < until:
            record("giant", _post(port, body)[0])
            time.sleep(HOSTILE_PAUSE_S)

    def leaver_client() -> None:
        body = _greedy_body(greedy_tokens)
        while time.monotonic() < until:
            with _raw(port, body) as sock:
                sock.sendall(body)
                time.sleep(0.3)
            record("leaver", "left")

    def slow_client() -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "y" * 1000}]}).encode()
        while time.monotonic() < until:
            start = time.monotonic()
            status: int | str = "sent-all"
            with _raw(port, body) as sock:
                sock.settimeout(0.2)
                for byte in body:
                    try:
                        sock.sendall(bytes([byte]))
                        data = sock.recv(4096)
                        status = _status_line(data) if data else "closed"
                        break
                    except TimeoutError:
                        continue
                    except OSError as err:
                        status = type(err).__name__
                        break
            record("slow", status, time.monotonic() - start)

    def burst_client() -> None:
        while time.monotonic() < until:
            threads = [threading.Thread(target=polite_client, args=("burst", True)) for _ in range(burst)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(2.0)

    def probe_client() -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request("GET", "/v1/models")
                response = connection.getresponse()
                response.read()
                record("probe", response.status, time.monotonic() - start)
            except OSError as err:
                record("probe", type(err).__name__)
            finally:
                connection.close()
            time.sleep(0.1)

    clients = [polite_client] * polite + [greedy_client, numbers_client, garbage_client, giant_client, leaver_client,
                                          slow_client, burst_client, probe_client]
    start = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for client in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"counts": dict(counts), "polite_latency": latency["polite"], "probe_latency": latency["probe"],
            "seconds": time.monotonic() - start}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def format_table(result: dict) -> str:
    """Markdown: status codes per client kind, then the latencies."""
    statuses = sorted({s for c in result["counts"].values() for s in c}, key=str)
    lines = ["| client | requests | " + " | ".join(map(str, statuses)) + " |",
             "|---|---" + "|---" * len(statuses) + "|"]
    for kind in sorted(result["counts"], key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        counter = result["counts"][kind]
        lines.append(f"| {kind} | {sum(counter.values())} | " + " | ".join(str(counter.get(s, 0)) for s in statuses)
                     + " |")
    served = sum(c.get(200, 0) for kind, c in result["counts"].items() if kind != "probe")
    polite, probe = result["polite_latency"], result["probe_latency"]
    lines += ["", f"chat completions served (200): {served} in {result['seconds']:.1f} s",
              f"polite latency (s): p50 {_percentile(polite, 0.5):.3f}, p95 {_percentile(polite, 0.95):.3f}, "
              f"p99 {_percentile(polite, 0.99):.3f} (n={len(polite)})",
              f"/v1/models: {len(probe)} answered, max latency {max(probe, default=float('nan')):.3f} s"]
    return "\n".join(lines)


def _tiny_model(work: Path) -> Path:
    """A randomly initialised tiny Llama with the tiny world's tokenizer (what the tests serve)."""
    path = work / "serve-tiny"
    if not (path / "config.json").exists():
        from posttrain.models import load_tokenizer
        from posttrain.stages.world import ensure_world
        from posttrain.world.model import init_tiny_model

        tokenizer = load_tokenizer(ensure_world(base_model=False, progress=False).tokenizer)
        init_tiny_model("world-llama", tokenizer, seed=0).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--polite", type=int, default=4, help="well-behaved clients")
    parser.add_argument("--model", type=Path, help="model directory to serve (default: a tiny random Llama)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work")
    args = parser.parse_args()
    model = args.model or _tiny_model(args.work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", str(model), "--port",
                               str(port), "--max_queue", "8", "--request_timeout_s", "5", "--log_level", "error"],
                              env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/v1/models")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"posttrain serve did not start (exit code {server.poll()})")
                time.sleep(0.5)
        result = run_load(port, args.seconds, polite=args.polite)
        threading.Thread(target=_post, args=(port, _greedy_body(400)), daemon=True).start()
        time.sleep(0.3)  # SIGINT in the middle of a long reply
        start = time.monotonic()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        print(format_table(result))
        print(f"server exit after SIGINT during a 400-token reply: {time.monotonic() - start:.2f} s "
              f"(exit code {server.returncode})")
    finally:
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    main()
