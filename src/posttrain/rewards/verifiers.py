"""Verifiable rewards (RLVR): checkers of a completion against a reference column, for rewards, best-of-N and RL.

- ``math_reward(completion, answer)``: the completion's final answer (``extract_answer``) against the gold answer.
  A cheap path decides plain numbers and identical strings in the caller's process; everything else goes to
  math-verify (``math_verify.parse`` / ``verify``: fractions, LaTeX, sets, intervals, percentages, ...), never a
  hand-written equivalence. math-verify's own timeout is ``signal.alarm``, which raises off the main thread, so it is
  switched off (``parsing_timeout=None``, ``timeout_seconds=None``) and math-verify runs in a pool of worker
  processes instead: the caller waits for a verdict until a wall-clock deadline, then kills the worker and scores
  None (cannot judge). That works from any thread and any process. ``math_rewards`` scores a batch in parallel.
- ``format_reward(completion)``: 1.0 for exactly ``<think>...</think><answer>...</answer>``.
- ``code_reward(program, tests)``: the program, then the tests' top-level statements, in ``sandbox.run_sandboxed``.

Each ``VERIFIERS`` entry has the verifier signature of :class:`posttrain.rewards.VerifierReward`:
``check(completion_text, **row_columns) -> float | None`` (None: nothing to check against). docs/verifiers.md has
the extraction rules, the deadline design, the sandbox's layers and the measured error counts.

This file also runs as a script (``python verifiers.py --math-worker``): the worker process's loop. It therefore
imports only the standard library at module level.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Sequence

MAX_ANSWER_CHARS = 2_000  # a longer "answer" is not one: scored wrong without calling math-verify
FALLBACK_WINDOW = 2_000  # the last-number fallback reads only this many characters from the end (keeps it linear)
WORKER_STARTUP_S = 60.0  # a worker imports sympy and math-verify once (about 0.5-2 s; more on a loaded machine)
WORKER_MEMORY_BYTES = 2 << 30  # RLIMIT_AS of a worker: a runaway sympy expression raises MemoryError, not swap


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction


def _matching_brace(text: str, open_at: int, limit: int = MAX_ANSWER_CHARS) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (``\\{`` and ``\\}`` are literal braces), or -1 when it is
    not closed within ``limit`` characters (bounded work on truncated or pathological text)."""
    depth, i, end = 0, open_at, min(len(text), open_at + limit + 2)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: str) -> str | None:
    """The content of the last closed ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed), else None. Only the
    last 3 occurrences are tried, so unclosed boxes cannot make this quadratic."""
    end, tries = len(text), 0
    while tries < 3:
        at = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if at < 0:
            return None
        tries += 1
        start = at + (6 if text.startswith("\\boxed", at) else 5)
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            close = _matching_brace(text, start)
            if close >= 0:
                return text[start + 1:close]
        elif start < len(text) and start > at + 5 and text[start - 1] == " ":  # "\boxed 5": one token
            token = re.match(r"[^\s$.,;]+", text[start:start + 100])
            if token:
                return token.group(0)
        end = at
    return None


_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_LAST_NUMBER = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_MATH_SPAN = re.compile(r"\$\$([^$]{1,2000})\$\$|\$([^$]{1,2000})\$|\\\((.{1,2000}?)\\\)|\\\[(.{1,2000}?)\\\]", re.S)
# Words that are maths, not prose (a tail like "x = \sin(\pi/4)" is an expression; "not 5; it is 7" is prose)
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "pi", "inf", "and", "or", "mod"}


def _is_prose(text: str) -> bool:
    """True when ``text`` reads as a sentence rather than an expression: a word of 3+ letters that is neither a
    LaTeX command nor a maths word, or a semicolon."""
    if ";" in text:
        return True
    for word in re.finditer(r"(?<![\\A-Za-z])[A-Za-z]{3,}", text):
        if word.group(0).lower() not in _MATH_WORDS:
            return True
    return False


def _last_expression(text: str) -> str | None:
    """The last maths span (``$...$``, ``\\(...\\)``, ``\\[...\\]``) or number in the last ``FALLBACK_WINDOW``
    characters of ``text``, whichever ends later."""
    tail = text[-FALLBACK_WINDOW:]
    best, best_end = None, -1
    for match in _MATH_SPAN.finditer(tail):
        best, best_end = next(g for g in match.groups() if g is not None), match.end()
    for match in _LAST_NUMBER.finditer(tail):
        if match.end() > best_end:
            best, best_end = match.group(0), match.end()
    return best


def _first_expression(text: str) -> str | None:
    """The first maths span or number of ``text``, whichever starts first."""
    spans = [(m.start(), next(g for g in m.groups() if g is not None)) for m in _MATH_SPAN.finditer(text)][:1]
    numbers = [(m.start(), m.group(0)) for m in _LAST_NUMBER.finditer(text)][:1]
    found = sorted(spans + numbers)
    return found[0][1] if found else None


def _answer_after_marker(line: str) -> str | None:
    """The answer in the rest of an "answer is" line: the line itself when it is an expression; in prose, the first
    number or maths span ("5 because 2 + 3", "6, not 7"), or the last one when the line opens with a negation
    ("not 5; it is 7")."""
    if not _is_prose(_strip_text_units(line)):
        return line
    negated = re.match(r"\s*(?:not|n't|never)\b", line, re.I) is not None
    return _last_expression(line) if negated else _first_expression(line)


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, or None when it gives none. Rules, first that applies (docs/verifiers.md):

    0. a harmony reply (``<|channel|>final<|message|>...``, or as decoded without its special tokens,
       ``analysis...assistantfinal...``): only its ``final`` channel is read (no final channel: None);
    1. scope: the content of the last ``<answer>...</answer>``; else the text after the last ``</think>``; else all;
    2. the last ``\\boxed{...}`` / ``\\fbox{...}`` in the scope;
    3. GSM8K's ``#### X``: the rest of the last such line;
    4. the rest of the line after the last "answer is" / "answer:" (case-insensitive; the next line when nothing
       follows on it) — when that reads as prose, its first number or maths span ("5 because 2 + 3", "6, not 7"),
       or its last when it opens with a negation ("not 5; it is 7");
    5. an ``<answer>`` scope as a whole (or its last number when it is prose);
    6. the last number or maths span of the scope.
    """
    from posttrain.data.harmony import is_harmony, parse_harmony  # lazy: this module runs as a bare worker script

    if is_harmony(completion):
        completion = parse_harmony(completion)["final"]
        if completion is None:
            return None
    text = completion.replace("\u2212", "-")  # unicode minus
    lowered = text.lower()
    close = lowered.rfind("</answer>")
    open_ = lowered.rfind("<answer>", 0, close) if close >= 0 else -1
    tagged = open_ >= 0
    if tagged:
        scope = text[open_ + len("<answer>"):close]
    else:
        think = lowered.rfind("</think>")
        scope = text[think + len("</think>"):] if think >= 0 and text[think + len("</think>"):].strip() else text
    boxed = last_boxed(scope)
    if boxed is not None:
        return _clean(boxed)
    hashes = scope.rfind("####")
    if hashes >= 0:
        line = scope[hashes + 4:].split("\n", 1)[0]
        if line.strip():
            return _clean(line)
    low_scope = scope.lower()
    cut = max((low_scope.rfind(k) + len(k) for k in ("answer is", "answer:") if low_scope.rfind(k) >= 0),
              default=-1)
    if cut >= 0:
        rest = scope[cut:].lstrip(" :")
        line = rest.split("\n", 1)[0]
        if not _clean(line) and "\n" in rest:  # "The answer is:" with the answer on the next line
            line = rest.split("\n", 1)[1].strip().split("\n", 1)[0]
        if line.strip():
            answer = _answer_after_marker(line)
            if answer is not None:
                return _clean(answer)
    if tagged and scope.strip():
        answer = _last_expression(scope) if _is_prose(_strip_text_units(scope)) else scope
        return _clean(answer) if answer is not None else None
    answer = _last_expression(scope)
    return _clean(answer) if answer is not None else None


def _strip_text_units(text: str) -> str:
    return re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}", "", text)


def _clean(answer: str) -> str:
    """Presentation removed, value kept: enclosing ``$``/``\\(``/``\\[``, ``\\left``/``\\right``, ``\\dfrac``,
    spacing commands, degrees, a leading currency sign, a trailing unit in ``\\text{}`` and trailing punctuation."""
    if len(answer) > MAX_ANSWER_CHARS:  # not an answer (scored 0.0); the regexes below stay on short strings
        return answer
    s = answer.replace("\u2212", "-").strip().rstrip(" \t\n.,;:!")
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\[!,;: ]|\\quad|\\qquad", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"^(?:\\\$|\$)\s*", "", s)
    s = re.sub(r"(?<!\\)%", r"\\%", s)  # "50%": a bare % starts a LaTeX comment
    stripped = re.sub(r"(?:\s*\\(?:text|mbox|mathrm)\{[^{}]*\})+\s*$", "", s)
    s = stripped if stripped.strip() else s  # "\text{A}" alone is the answer, not a unit
    s = s.rstrip(" \t\n.,;:!")
    return s.strip()


def final_answer_text(completion: str) -> str:
    """The completion's final answer (``extract_answer``) as ``\\boxed{...}``, the form math-verify's ``parse``
    reads best; "" when there is none."""
    answer = extract_answer(completion)
    return f"\\boxed{{{answer}}}" if answer else ""


# ----------------------------------------------------------------------------------------------------------------
# The cheap path: identical strings and plain numbers, decided without math-verify

_PLAIN = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_FRACTION = re.compile(r"([-+]?)(?:(\d+)\s*/\s*(\d+)|\\frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\})")


def _as_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, written as a decimal) of a plain number ``-1,000.5`` / ``3/4`` / ``\\frac{3}{4}``, else None."""
    s = text.replace(" ", "")
    if _PLAIN.fullmatch(s):
        s = s.replace(",", "")
        return Fraction(s.rstrip(".") or "0"), "." in s
    match = _FRACTION.fullmatch(s)
    if match:
        sign, a, b, c, d = match.groups()
        num, den = (a, b) if a is not None else (c, d)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign == "-" else value), False
    return None


def _cheap_verdict(gold: str, pred: str, rel_tol: float) -> bool | None:
    """True/False when the cheap path decides, None to ask math-verify. Integers and fractions compare exactly; a
    relative tolerance applies only when a side was written as a decimal (0.3333333 for 1/3; 1000000001 is not
    1000000000)."""
    if re.sub(r"\s+", "", gold) == re.sub(r"\s+", "", pred):
        return True
    a, b = _as_number(gold), _as_number(pred)
    if a is None or b is None:
        return None
    (x, x_decimal), (y, y_decimal) = a, b
    if x == y:
        return True
    if (x_decimal or y_decimal) and rel_tol > 0:
        return abs(x - y) <= rel_tol * max(abs(x), abs(y))
    return False


# ----------------------------------------------------------------------------------------------------------------
# math-verify in worker processes, with a wall-clock deadline that works on any thread


class _WorkerFailed(Exception):
    """The worker timed out, died or could not start: the answer cannot be judged."""


class _MathWorker:
    """One ``python verifiers.py --math-worker`` process: JSON lines in, JSON lines out."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), "--math-worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, start_new_session=True)
        self.ready = False
        self._buffer = b""

    def _readline(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: a trainer's descriptors can exceed FD_SETSIZE (1024)
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _WorkerFailed("deadline")
            if poller.poll(max(1, math.ceil(left * 1000))):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _WorkerFailed("worker exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def check(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        if not self.ready:
            hello = self._readline(time.monotonic() + WORKER_STARTUP_S)
            if hello != b"ready":  # e.g. math-verify is not installed: every check would fail, so say so
                raise RuntimeError(f"the math-verify worker did not start: {hello.decode(errors='replace')}")
            self.ready = True
        request = memoryview((json.dumps({"gold": gold, "pred": pred, "timeout_s": timeout_s}) + "\n").encode())
        try:
            while request:  # a request (< 64 KiB) fits the idle worker's empty pipe: this does not block
                request = request[self.proc.stdin.write(request):]
        except OSError as error:
            raise _WorkerFailed("worker exited") from error
        return json.loads(self._readline(time.monotonic() + timeout_s))["verdict"]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: nothing of it survives
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _WorkerPool:
    """Idle workers kept for reuse; a borrowed worker serves one thread at a time. A worker that missed a deadline
    is killed, never returned. After a fork the child forgets the parent's workers (their pipes are the parent's)."""

    def __init__(self, max_idle: int = max(2, os.cpu_count() or 1)):
        self.max_idle = max_idle
        self._idle: list[_MathWorker] = []
        self._lock = threading.Lock()

    def borrow(self) -> _MathWorker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _MathWorker()

    def give_back(self, worker: _MathWorker) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(worker)
                return
        worker.kill()

    def forget(self) -> None:
        self._idle, self._lock = [], threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_POOL = _WorkerPool()
atexit.register(_POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget)


def _math_verify(gold: str, pred: str, timeout_s: float) -> bool | None:
    """math-verify's verdict in a worker process; None on "gold unparseable", timeout or a dead worker."""
    worker = _POOL.borrow()
    try:
        verdict = worker.check(gold, pred, timeout_s)
    except (_WorkerFailed, OSError, ValueError, KeyError):
        worker.kill()
        return None
    except BaseException:
        worker.kill()
        raise
    _POOL.give_back(worker)
    return verdict if verdict in (True, False) else None


def _math_worker_main() -> None:
    """The worker's loop: one request ``{"gold", "pred", "timeout_s"}`` per stdin line, one ``{"verdict": true |
    false | null}`` per stdout line (null: the gold answer does not parse to a maths object, or math-verify
    failed; identical strings were already matched by the caller). math-verify's
    signal-based timeouts are off; the parent's deadline kills this process. RLIMIT_CPU, moved before each request
    to the CPU used so far plus the request's budget, stops a check that outlives a parent killed mid-request."""
    import functools
    import logging
    import resource

    logging.disable(logging.WARNING)  # "timeout is disabled" and parse warnings
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    try:
        from math_verify import parse, verify
    except ImportError as error:
        print(f"cannot import math_verify ({error}); install the math-verify package", flush=True)
        return

    @functools.lru_cache(maxsize=1024)  # one gold answer is checked against a whole group of completions
    def parse_gold(text: str):
        return parse(f"\\boxed{{{text}}}", parsing_timeout=None)

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    for line in sys.stdin:
        request = json.loads(line)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime) + math.ceil(request["timeout_s"]) + 5
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        try:
            gold = parse_gold(request["gold"])
            if all(isinstance(item, str) for item in gold):  # nothing parsed, only the raw-string fallback
                verdict = None
            else:
                pred = parse(f"\\boxed{{{request['pred']}}}", parsing_timeout=None)
                verdict = bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
        except Exception:  # math-verify catches its own errors; this is a last guard (e.g. MemoryError in parse)
            verdict = None
        out.write(json.dumps({"verdict": verdict}) + "\n")
        out.flush()


# ----------------------------------------------------------------------------------------------------------------
# Math rewards


def _gold_text(answer: Any) -> str | None:
    """The gold answer as a clean string; a full solution (``#### 72`` or ``\\boxed{72}``) gives its final answer."""
    if answer is None:
        return None
    text = str(answer)
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        text = extract_answer(text) or ""
    text = _clean(text)
    return text or None


def _prepare(completion: str, answer: Any, rel_tol: float) -> tuple[str, str] | float | None:
    """A verdict when no worker is needed (None, 0.0, 1.0), else the (gold, pred) pair math-verify must judge."""
    gold = _gold_text(answer)
    if gold is None or len(gold) > MAX_ANSWER_CHARS:
        return None
    pred = extract_answer(completion)
    if not pred:
        return 0.0
    if len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    cheap = _cheap_verdict(gold, pred, rel_tol)
    if cheap is not None:
        return float(cheap)
    return gold, pred


def math_reward(completion: str, answer: Any, *, rel_tol: float = 1e-6, timeout_s: float = 5.0) -> float | None:
    """1.0 if the completion's final answer equals ``answer``, 0.0 if not, None if it cannot be judged (no or
    unparseable gold answer, or math-verify missed the ``timeout_s`` wall-clock deadline).

    ``rel_tol``: relative tolerance when either side is written as a decimal (0 for exact comparison only).
    """
    prepared = _prepare(completion, answer, rel_tol)
    if not isinstance(prepared, tuple):
        return prepared
    verdict = _math_verify(*prepared, timeout_s)
    return None if verdict is None else float(verdict)


def math_rewards(completions: Sequence[str], answers: Sequence[Any], *, workers: int | None = None,
                 rel_tol: float = 1e-6, timeout_s: float = 5.0) -> list[float | None]:
    """``math_reward`` of each (completion, answer) pair: the cheap path inline, math-verify on up to ``workers``
    processes at once (default: the CPU count), each item with its own ``timeout_s`` deadline."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    results: list[float | None] = []
    pending: dict[int, tuple[str, str]] = {}
    for i, (completion, answer) in enumerate(zip(completions, answers)):
        prepared = _prepare(completion, answer, rel_tol)
        results.append(None if isinstance(prepared, tuple) else prepared)
        if isinstance(prepared, tuple):
            pending[i] = prepared
    if pending:
        workers = max(1, min(workers or os.cpu_count() or 1, len(pending)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = pool.map(lambda pair: _math_verify(*pair, timeout_s), pending.values())
            for i, verdict in zip(pending, verdicts):
                results[i] = None if verdict is None else float(verdict)
    return results


def format_reward(completion: str) -> float:
    """1.0 if the completion is exactly ``<think>...</think><answer>...</answer>``: one of each tag, in that order,
    a non-empty answer, nothing but whitespace outside; else 0.0."""
    if any(completion.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    match = re.fullmatch(r"\s*<think>.*</think>\s*<answer>(.*)</answer>\s*", completion, re.S)
    return 1.0 if match and match.group(1).strip() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Code rewards

_RESULT_TAG = "__posttrain_tests__"


def _harness(program: str, tests: str, nonce: str) -> str:
    """The sandboxed script: the program, then each top-level statement of ``tests`` in its own try, then one line
    ``<tag>-<nonce> {"program": ok, "statements": s, "asserts": n, "passed": k, "all": ok}`` on file descriptor 1.
    The script unlinks itself (the nonce is in it) before the program runs; everything the harness calls after the
    program is bound as a default argument before it runs; the program gets its own copy of the builtins and every
    test statement a pristine one; and the caller checks that the report counts every test statement. So
    ``builtins.exec = ...``, ``ast.parse = ...``, reading the script or emptying the statement list does not skip
    or fake the tests. The program still runs in the same interpreter as the tests, so one that inspects frames or
    code objects for the nonce can forge the line (docs/verifiers.md)."""
    return f'''\
import ast as _ast, builtins as _builtins, json as _json, os as _os, sys as _sys, traceback as _traceback
try:
    _os.unlink(__file__)  # the nonce is in this file: gone before the program runs
except OSError:
    pass
def _posttrain_run(program, tests, tag, exec=exec, compile=compile, isinstance=isinstance, BaseException=BaseException,
                   SystemExit=SystemExit, parse=_ast.parse, Assert=_ast.Assert, Module=_ast.Module,
                   print_exc=_traceback.print_exc, write=_os.write, dumps=_json.dumps, stdout=_sys.stdout):
    statements = parse(tests).body  # parsed before the program runs
    pristine = dict(vars(_builtins))  # each test statement gets these builtins, whatever the program did to its own
    scope = {{"__name__": "__main__", "__builtins__": dict(pristine)}}
    report = {{"program": True, "statements": 0, "asserts": 0, "passed": 0, "all": True}}
    try:
        exec(compile(program, "<program>", "exec"), scope)
    except SystemExit as stop:
        report["program"] = stop.code in (None, 0)
    except BaseException:
        print_exc()
        report["program"] = False
    if report["program"]:
        for statement in statements:
            is_assert = isinstance(statement, Assert)
            report["statements"] += 1
            report["asserts"] += is_assert
            scope["__builtins__"] = dict(pristine)
            try:
                exec(compile(Module([statement], []), "<tests>", "exec"), scope)
                report["passed"] += is_assert
            except BaseException:
                print_exc()
                report["all"] = False
    else:
        report["all"] = False
    try:
        stdout.flush()
    except BaseException:
        pass
    write(1, ("\\n" + tag + " " + dumps(report) + "\\n").encode())
_posttrain_run({program!r}, {tests!r}, {f"{_RESULT_TAG}-{nonce}"!r})
'''


def _test_report(stdout: str, nonce: str) -> dict | None:
    tag = f"{_RESULT_TAG}-{nonce} "
    for line in reversed(stdout.splitlines()):
        if line.startswith(tag):
            try:
                return json.loads(line[len(tag):])
            except ValueError:
                return None
    return None


def code_reward(program: str, tests: str, *, timeout_s: float = 10.0, partial_credit: bool = False,
                memory_mb: int = 512, isolation: str = "auto") -> float | None:
    """Run ``program`` then ``tests`` (Python source with asserts) in the sandbox.

    1.0 when the program runs and every top-level statement of the tests runs without an exception, else 0.0; with
    ``partial_credit`` the fraction of top-level ``assert`` statements that pass (0.0 if the program itself fails;
    tests with no top-level assert score all or nothing). A program that times out, crashes or is killed scores 0.0,
    and so does one that leaves a process running when it ends (the sandbox kills it; a reward must not pay for
    it), and one during whose run the sandbox itself failed (it may have made it fail: RL drops None samples, so a
    None there would spare a hostile program its 0). None: cannot be judged (``tests`` does not parse or has no
    statement, or the sandbox failed before the program started).
    ``isolation``: "auto", "namespace" or "socket" (``posttrain.rewards.sandbox``).
    """
    from posttrain.rewards.sandbox import run_sandboxed

    try:
        if not ast.parse(tests).body:
            return None
    except (SyntaxError, ValueError):
        return None
    nonce = os.urandom(8).hex()
    result = run_sandboxed(_harness(program, tests, nonce), timeout_s=timeout_s, memory_mb=memory_mb,
                           isolation=isolation)
    if result.error is not None:
        return 0.0 if result.started else None
    report = _test_report(result.stdout, nonce)
    if result.timed_out or result.leftover_processes or report is None or not report["program"]:
        return 0.0
    statements = ast.parse(tests).body  # the report must account for every test statement (none skipped)
    if (report.get("statements"), report.get("asserts")) != (len(statements),
                                                              sum(isinstance(s, ast.Assert) for s in statements)):
        return 0.0
    if partial_credit and report["asserts"]:
        return report["passed"] / report["asserts"]
    return 1.0 if report["all"] else 0.0


def code_rewards(programs: Sequence[str], tests_list: Sequence[str], *, workers: int | None = None,
                 timeout_s: float = 10.0, partial_credit: bool = False, memory_mb: int = 512,
                 isolation: str = "auto") -> list[float | None]:
    """``code_reward`` of each (program, tests) pair, up to ``workers`` sandboxes at once (default: the CPU count)."""
    if len(programs) != len(tests_list):
        raise ValueError(f"{len(programs)} programs but {len(tests_list)} test sources")
    if not programs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: code_reward(*pair, timeout_s=timeout_s, partial_credit=partial_credit,
                                                      memory_mb=memory_mb, isolation=isolation),
                             zip(programs, tests_list)))


def extract_code(completion: str) -> str:
    """The last fenced code block of a completion (```python ... ``` or ``` ... ```), else the whole text."""
    blocks = re.findall(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", completion, re.S | re.I)
    return blocks[-1] if blocks else completion


# ----------------------------------------------------------------------------------------------------------------
# The verifier signature of VerifierReward: check(completion_text, **row_columns) -> float | None


def math_answer(completion: str, answer: Any = None, **_: Any) -> float | None:
    """``math_reward`` against the row's ``answer`` column (None when the row has none)."""
    return math_reward(completion, answer)


def code_answer(completion: str, tests: Any = None, **_: Any) -> float | None:
    """``code_reward`` of the completion's last code block against the row's ``tests`` column."""
    if tests is None:
        return None
    return code_reward(extract_code(completion), str(tests))


def format_answer(completion: str, **_: Any) -> float:
    """``format_reward``: the ``<think>...</think><answer>...</answer>`` layout."""
    return format_reward(completion)


VERIFIERS = {"math": math_answer, "code": code_answer, "format": format_answer}
"""Verifiers by name (``--reward=verifier:math``, ``verifier:code``, ``verifier:format``)."""


if __name__ == "__main__" and sys.argv[1:] == ["--math-worker"]:
    _math_worker_main()
