"""LLM-as-a-judge (RLHF book, "Synthetic data & AI feedback"; the prompts of MT-Bench, Zheng et al. 2023).

Two modes, both with the MT-Bench prompts verbatim:
  pairwise  the judge compares answers A and B and ends with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie);
  single    the judge rates one answer from 1 to 10 and ends with ``Rating: [[N]]``.
Optional written principles (Constitutional AI style) are appended to the system prompt as a numbered list.

Position-swap debiasing (MT-Bench, section 3.4): every pair is judged in both orders (A, B) and (B, A). A verdict
that survives the swap stands; one that flips (or turns into a tie) is a tie; an unreadable reply in either order
makes the pair None (cannot judge). Nothing here raises on a bad judge reply: unparseable replies and inconsistent
pairs are counted in a ``JudgeStats``.

Backends share one tiny protocol, ``complete(conversations) -> replies``, with greedy/temperature-0 decoding:
  LocalBackend   a local Hugging Face model through ``posttrain.models.generation.generate`` (the one rendering path);
  OpenAIBackend  any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, ``posttrain serve``), with a thread
                 pool, retries with exponential backoff, a per-request timeout and an on-disk JSONL cache.
Judges fit the reward interface through ``JudgeReward`` (pointwise ratings); ``win_rate`` compares two policies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from posttrain.data.messages import message_text
from posttrain.plumbing.config import ConfigError

Verdict = Literal["A", "B", "tie"]

# MT-Bench "pair-v2" (pairwise) and "single-v1" (single-answer grading) prompts.
PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".'
)
SINGLE_USER = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

_VERDICT_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING_RE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICTS: dict[str, Verdict] = {"A": "A", "B": "B", "C": "tie"}
_SWAPPED: dict[Verdict, Verdict] = {"A": "B", "B": "A", "tie": "tie"}


# ---------------------------------------------------------------------------------------------------------------
# Prompts and parsing (pure).


def with_principles(system: str, principles: Sequence[str] = ()) -> str:
    """The system prompt followed by the principles as a numbered list (none: the prompt unchanged)."""
    principles = [p.strip() for p in principles if p and p.strip()]
    if not principles:
        return system
    numbered = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, start=1))
    return f"{system}\n\nJudge according to these principles:\n{numbered}"


def question_text(prompt: Any) -> str:
    """What the judge sees as the question: a string as is, the single user turn of a one-turn prompt, or the
    transcript ("User: ...\\n\\nAssistant: ...") of a multi-turn one. System turns are not shown (as in MT-Bench)."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return message_text(turns, turns[0].get("role", "user"))
    return "\n\n".join(f"{str(m.get('role', '')).capitalize()}: {message_text(m, '')}" for m in turns)


def answer_text(completion: Any) -> str:
    """The reply being judged: a string, or the last assistant message of a message list."""
    return message_text(completion, "assistant")


def pairwise_messages(question: str, answer_a: str, answer_b: str, principles: Sequence[str] = ()) -> list[dict]:
    """The MT-Bench pairwise judge conversation for one ordering of the two answers."""
    user = PAIRWISE_USER.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": with_principles(PAIRWISE_SYSTEM, principles)},
            {"role": "user", "content": user}]


def single_messages(question: str, answer: str, principles: Sequence[str] = ()) -> list[dict]:
    """The MT-Bench single-answer grading conversation (rating 1-10)."""
    return [{"role": "system", "content": with_principles(SINGLE_SYSTEM, principles)},
            {"role": "user", "content": SINGLE_USER.format(question=question, answer=answer)}]


def parse_pairwise_verdict(text: Any) -> Verdict | None:
    """The last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` in ``text`` as "A" / "B" / "tie"; None when there is none.

    The last one wins because judges often restate the format ("... [[A]] if A is better ...") before deciding.
    """
    if not isinstance(text, str):
        return None
    found = _VERDICT_RE.findall(text)
    return _VERDICTS[found[-1]] if found else None


def parse_rating(text: Any) -> float | None:
    """The last ``[[N]]`` in ``text`` (``Rating: [[7]]``, ``[[7.5]]``) when 1 <= N <= 10, else None."""
    if not isinstance(text, str):
        return None
    found = _RATING_RE.findall(text)
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1.0 <= rating <= 10.0 else None


def combine_swapped(first: Verdict | None, swapped: Verdict | None) -> tuple[Verdict | None, bool]:
    """(verdict, inconsistent) from the verdict on (A, B) and the verdict on (B, A) (whose "A" means our B).

    Agreeing verdicts stand; disagreeing ones are a tie (MT-Bench's conservative rule); None if either is None.
    """
    if first is None or swapped is None:
        return None, False
    unswapped = _SWAPPED[swapped]
    if first == unswapped:
        return first, False
    return "tie", True


@dataclass
class JudgeStats:
    """Counts over a judge's lifetime: replies requested, replies without a verdict/rating, pairs that flipped."""

    calls: int = 0
    unparseable: int = 0
    inconsistent: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"judge/{k}": v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------------------------
# Judging with any backend.


class JudgeBackend(Protocol):
    def complete(self, conversations: list[list[dict]]) -> list[str]:
        """One reply per conversation (same order), temperature 0; "" when a request failed for good."""
        ...


def judge_pairs(backend: JudgeBackend, prompts: Sequence[Any], completions_a: Sequence[Any],
                completions_b: Sequence[Any], *, principles: Sequence[str] = (),
                stats: JudgeStats | None = None) -> list[Verdict | None]:
    """Swap-debiased pairwise verdicts ("A" = ``completions_a[i]`` is better) for every pair, in one backend call.

    Prompts are strings or message lists; completions strings or message lists (the last assistant message).
    """
    stats = stats if stats is not None else JudgeStats()
    conversations = []
    for prompt, a, b in zip(prompts, completions_a, completions_b, strict=True):
        question, a, b = question_text(prompt), answer_text(a), answer_text(b)
        conversations += [pairwise_messages(question, a, b, principles), pairwise_messages(question, b, a, principles)]
    replies = backend.complete(conversations) if conversations else []
    parsed = [parse_pairwise_verdict(reply) for reply in replies]
    stats.calls += len(parsed)
    stats.unparseable += sum(v is None for v in parsed)
    verdicts = []
    for first, swapped in zip(parsed[0::2], parsed[1::2]):
        verdict, inconsistent = combine_swapped(first, swapped)
        stats.inconsistent += inconsistent
        verdicts.append(verdict)
    return verdicts


def judge_pair(backend: JudgeBackend, prompt: Any, completion_a: Any, completion_b: Any, *,
               principles: Sequence[str] = (), stats: JudgeStats | None = None) -> Verdict | None:
    """``judge_pairs`` for a single pair."""
    return judge_pairs(backend, [prompt], [completion_a], [completion_b], principles=principles, stats=stats)[0]


def rate(backend: JudgeBackend, prompts: Sequence[Any], completions: Sequence[Any], *,
         principles: Sequence[str] = (), stats: JudgeStats | None = None) -> list[float | None]:
    """MT-Bench single-answer ratings in [1, 10] (None when the reply holds no valid rating)."""
    stats = stats if stats is not None else JudgeStats()
    conversations = [single_messages(question_text(p), answer_text(c), principles)
                     for p, c in zip(prompts, completions, strict=True)]
    ratings = [parse_rating(reply) for reply in (backend.complete(conversations) if conversations else [])]
    stats.calls += len(ratings)
    stats.unparseable += sum(r is None for r in ratings)
    return ratings


@dataclass
class JudgeReward:
    """A pointwise judge as a reward: ``(prompts, completions, **columns) -> [rating in 1..10 or None]``."""

    backend: JudgeBackend
    principles: Sequence[str] = ()
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return rate(self.backend, prompts, completions, principles=self.principles, stats=self.stats)


def win_rate(backend: JudgeBackend, prompts: Sequence[Any], completions_a: Sequence[Any],
             completions_b: Sequence[Any], *, principles: Sequence[str] = (),
             stats: JudgeStats | None = None) -> dict[str, float]:
    """How often policy A beats policy B under the swap-debiased judge; a tie counts half (AlpacaEval/MT-Bench).

    ``win_rate`` is over the judged pairs (unparseable ones are left out and counted in ``unjudged``).
    """
    verdicts = judge_pairs(backend, prompts, completions_a, completions_b, principles=principles, stats=stats)
    wins, losses, ties = (sum(v == x for v in verdicts) for x in ("A", "B", "tie"))
    judged = wins + losses + ties
    return {"win_rate": (wins + 0.5 * ties) / judged if judged else float("nan"),
            "wins": wins, "losses": losses, "ties": ties, "unjudged": len(verdicts) - judged}


# ---------------------------------------------------------------------------------------------------------------
# Backends.


class LocalBackend:
    """A local Hugging Face model as the judge, greedy, through the same rendering path as training."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 512, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str = "auto", chat_template: str | None = None,
                 max_new_tokens: int = 512, batch_size: int = 8) -> "LocalBackend":
        from posttrain.models import load_causal_lm, load_tokenizer, resolve_device

        tokenizer = load_tokenizer(path, chat_template)
        model = load_causal_lm(path, device=resolve_device(device))
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        from posttrain.models.generation import generate

        completions = generate(self.model, self.tokenizer, conversations, max_new_tokens=self.max_new_tokens,
                               temperature=0.0, batch_size=self.batch_size)
        return [c.text for c in completions]


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    """sha256 of the request's content: the same question to the same judge is asked once."""
    payload = json.dumps([model, messages, temperature, max_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def backoff_delays(retries: int, base_s: float, cap_s: float = 30.0) -> list[float]:
    """Seconds to wait before retry 1..retries: base, 2 base, 4 base, ... capped at ``cap_s``."""
    return [min(cap_s, base_s * 2**attempt) for attempt in range(retries)]


class JsonlCache:
    """Replies on disk, one ``{"key", "reply"}`` line each; appended as they arrive, so an interrupted run resumes.

    A torn last line (a crash mid-write) is skipped on load.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self._replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            self._replies[key] = reply
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


class JudgeRequestError(ConfigError):
    """The endpoint refused the judge's credentials, model or URL (401/403/404): no point trying other requests."""


def _status(err: Exception) -> int | None:
    return getattr(err, "status_code", None)


def _retryable(err: Exception) -> bool:
    """Connection errors, timeouts, 408/409/429 and 5xx are worth another try; other 4xx are not."""
    import openai

    status = _status(err)
    if status is None:
        return isinstance(err, openai.APIConnectionError)  # includes APITimeoutError
    return status in (408, 409, 429) or status >= 500


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint as the judge.

    ``base_url`` / ``api_key`` default to ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY`` (a placeholder key when unset,
    which local servers such as vLLM and ``posttrain serve`` accept). Up to ``concurrency`` requests run at once;
    each has ``timeout_s`` and up to ``retries`` retries with exponential backoff (``backoff_delays``). A request
    that still fails, or gets a non-retryable 4xx, yields "" (counted in ``failed``, first errors in ``errors``) so a
    long labelling run survives; 401/403/404 raise ``JudgeRequestError`` at once (wrong key, model or URL).
    With ``cache`` (a JSONL path) replies are stored by ``cache_key`` and never requested twice.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 temperature: float = 0.0, max_tokens: int = 512, concurrency: int = 8, retries: int = 4,
                 backoff_s: float = 1.0, timeout_s: float = 60.0, cache: str | Path | None = None,
                 progress: bool = False, client=None):
        if client is None:
            import openai

            client = openai.OpenAI(
                base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                timeout=timeout_s,
                max_retries=0,  # we retry ourselves, with our own counts and backoff
            )
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s
        self.concurrency, self.retries, self.backoff_s = max(1, concurrency), retries, backoff_s
        self.cache = JsonlCache(cache) if cache else None
        self.progress = progress
        self.requests = 0  # HTTP requests sent, retries included (what the cache saves)
        self.failed = 0
        self.errors: list[str] = []
        self._sleep = time.sleep  # replaced in tests to record the backoff
        self._count_lock = threading.Lock()

    def _request(self, messages: list[dict]) -> str:
        delays = backoff_delays(self.retries, self.backoff_s)
        for attempt in range(self.retries + 1):
            with self._count_lock:
                self.requests += 1
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                    timeout=self.timeout_s)
                return response.choices[0].message.content or ""
            except Exception as err:  # noqa: BLE001 - sorted by _status/_retryable; anything else is re-raised
                status = _status(err)
                if status in (401, 403, 404):
                    raise JudgeRequestError(f"judge endpoint refused the request ({status}): {err}") from err
                if status is None and not _retryable(err):
                    raise  # not an API error: a bug, not a flaky endpoint
                if _retryable(err) and attempt < self.retries:
                    self._sleep(delays[attempt])
                    continue
                with self._count_lock:
                    self.failed += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(err).__name__}: {err}")
                return ""
        raise AssertionError("unreachable")

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        from tqdm.auto import tqdm

        keys = [cache_key(self.model, m, self.temperature, self.max_tokens) for m in conversations]
        replies: dict[str, str] = {}
        missing: dict[str, list[dict]] = {}  # key -> messages, each distinct request once
        for key, messages in zip(keys, conversations):
            cached = self.cache.get(key) if self.cache else None
            if cached is not None:
                replies[key] = cached
            else:
                missing.setdefault(key, messages)

        def ask(key: str) -> None:
            reply = self._request(missing[key])
            replies[key] = reply
            if self.cache and reply:  # failures are not cached: the next run asks again
                self.cache.put(key, reply)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            bar = tqdm(total=len(missing), desc="judge", disable=not self.progress, dynamic_ncols=True)
            for _ in pool.map(ask, list(missing)):
                bar.update()
            bar.close()
        return [replies[key] for key in keys]
