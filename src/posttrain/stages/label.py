"""``posttrain label``: AI-feedback preference labelling (RLHF book, "Synthetic data & AI feedback"; RLAIF).

    posttrain label --data pairs.jsonl --out prefs.jsonl --judge_base_url http://127.0.0.1:8000/v1 \\
        --judge_model_name judge [--principles principles.txt]

Input rows: ``prompt`` (a string or messages) and ``completion_a`` / ``completion_b`` (strings or assistant message
lists). Each pair is judged by the MT-Bench pairwise judge in both orders (``posttrain.rewards.judge.judge_pairs``); the
winner becomes ``chosen``. Output rows are conversational preference data like the tiny world's: ``prompt`` a
message list, ``chosen`` / ``rejected`` assistant message lists. Ties (including verdicts that flip with the order)
and unparseable verdicts are dropped and counted. When a prompt is a tiny-world question, the judge's choice is also
compared with the gold reward's preference and the agreement reported: a direct measure of the judge's label noise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from posttrain.data.io import Row, as_messages, read_rows
from posttrain.data.messages import message_text
from posttrain.plumbing.config import ConfigError, chat_template_option, device_option, option, progress_option
from posttrain.rewards.judge import JudgeBackend, JudgeStats, LocalBackend, OpenAIBackend, Verdict, judge_pairs
from posttrain.world.gold import gold_reward
from posttrain.world.tasks import solve


@dataclass
class LabelConfig:
    data: str = option("", "input .jsonl/.json/.parquet: prompt, completion_a, completion_b (required)")
    out: str = option("", "output JSONL of prompt/chosen/rejected rows (required)")
    judge_model: str = option("", "local Hugging Face judge directory (or use judge_base_url/judge_model_name)")
    judge_base_url: str = option("", "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; empty = "
                                     "$OPENAI_BASE_URL, else api.openai.com (key from $OPENAI_API_KEY)")
    judge_model_name: str = option("", "model name sent to the endpoint (required with an endpoint)")
    principles: str = option("", "text file of principles, one per line, appended to the judge's system prompt")
    concurrency: int = option(8, "requests in flight at once (endpoint judge)", minimum=1)
    cache: str = option("", "JSONL cache of the endpoint's replies (reruns ask nothing twice); empty = none")
    max_tokens: int = option(512, "judge reply budget in tokens (explanation + verdict)", minimum=1)
    timeout: float = option(60.0, "seconds per request (endpoint judge)", above=0)
    retries: int = option(4, "retries per request with exponential backoff (endpoint judge)")
    batch_size: int = option(8, "prompts per generation batch (local judge)", minimum=1)
    chat_template: str = chat_template_option()
    device: str = device_option()
    limit: int = option(0, "label only the first N rows; 0 = all")
    progress: bool = progress_option()


def read_principles(path: str | Path) -> list[str]:
    """Non-empty lines of a principles file (a leading "1." / "-" is dropped: the judge numbers them itself)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [re.sub(r"^(?:\d+[.)]|[-*])\s+", "", line) for line in lines if line]


def pair_from_row(row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, completion_a, completion_b) as message lists; raises ``DataError`` naming a bad field."""
    prompt = as_messages(row, "prompt", "user")
    a = as_messages(row, "completion_a", "assistant")
    b = as_messages(row, "completion_b", "assistant")
    return prompt, a, b


def gold_preference(prompt: Any, completion_a: Any, completion_b: Any) -> Verdict | None:
    """"A" / "B" by the gold reward when the (last) user turn is a tiny-world question, "tie" when equal, else None."""
    if solve(message_text(prompt, "user")) is None:
        return None
    reward_a, reward_b = gold_reward(prompt, completion_a), gold_reward(prompt, completion_b)
    return "A" if reward_a > reward_b else "B" if reward_b > reward_a else "tie"


def label_pairs(backend: JudgeBackend, pairs: Sequence[tuple[list[dict], list[dict], list[dict]]], *,
                principles: Sequence[str] = (), stats: JudgeStats | None = None) -> tuple[list[dict], dict]:
    """Preference rows from judged pairs (ties and unparseable dropped) and a report of the counts.

    Report: ``pairs``, ``labelled``, ``dropped_tie``, ``dropped_unparseable``, the judge's stats, and on tiny-world
    prompts ``gold/compared`` (judge and gold both strict), ``gold/agree`` and ``gold/agreement``.
    """
    stats = stats if stats is not None else JudgeStats()
    prompts, completions_a, completions_b = ([p[i] for p in pairs] for i in range(3))
    verdicts = judge_pairs(backend, prompts, completions_a, completions_b, principles=principles, stats=stats)
    rows = []
    compared = agree = 0
    for (prompt, a, b), verdict in zip(pairs, verdicts):
        if verdict in ("A", "B"):
            chosen, rejected = (a, b) if verdict == "A" else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            gold = gold_preference(prompt, a, b)
            if gold in ("A", "B"):
                compared += 1
                agree += gold == verdict
    report = {
        "pairs": len(pairs),
        "labelled": len(rows),
        "dropped_tie": sum(v == "tie" for v in verdicts),
        "dropped_unparseable": sum(v is None for v in verdicts),
        **stats.as_dict(),
        "gold/compared": compared,
        "gold/agree": agree,
        "gold/agreement": agree / compared if compared else float("nan"),
    }
    return rows, report


def check_judge_options(config: LabelConfig) -> None:
    """Exactly one judge: a local directory, or a model name at an endpoint."""
    if config.judge_model and config.judge_base_url:
        raise ConfigError("give either judge_model (a local directory) or judge_base_url, not both")
    if not config.judge_model and not config.judge_model_name:
        raise ConfigError("posttrain label needs --judge_model DIR or --judge_model_name NAME (with an endpoint)")


def make_backend(config: LabelConfig) -> JudgeBackend:
    """The local judge when ``judge_model`` is set, else the OpenAI-compatible endpoint."""
    check_judge_options(config)
    if config.judge_model:
        return LocalBackend.from_dir(config.judge_model, device=config.device,
                                     chat_template=config.chat_template or None, max_new_tokens=config.max_tokens,
                                     batch_size=config.batch_size)
    return OpenAIBackend(config.judge_model_name, base_url=config.judge_base_url or None, max_tokens=config.max_tokens,
                         concurrency=config.concurrency, retries=config.retries, timeout_s=config.timeout,
                         cache=config.cache or None, progress=config.progress)


def run_label(config: LabelConfig, backend: JudgeBackend | None = None) -> dict:
    """Label ``config.data`` into ``config.out``; returns (and prints) the report."""
    if not config.data or not config.out:
        raise ConfigError("posttrain label needs --data FILE and --out FILE")
    if backend is None:
        check_judge_options(config)  # before reading anything
    rows = read_rows(config.data)
    rows = rows[: config.limit] if config.limit else rows
    for row in rows:
        if row.parse_error is not None:
            raise row.parse_error
    pairs = [pair_from_row(row) for row in rows]
    principles = read_principles(config.principles) if config.principles else []
    backend = backend if backend is not None else make_backend(config)
    labelled, report = label_pairs(backend, pairs, principles=principles)
    if isinstance(backend, OpenAIBackend):
        report["judge/requests"], report["judge/failed_requests"] = backend.requests, backend.failed
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in labelled:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"labelled {report['labelled']} of {report['pairs']} pairs -> {out} "
          f"(dropped {report['dropped_tie']} ties, {report['dropped_unparseable']} unparseable; "
          f"{report['judge/inconsistent']} verdicts flipped with the order)")
    if report["gold/compared"]:
        print(f"agreement with the gold reward on {report['gold/compared']} tiny-world pairs: "
              f"{report['gold/agreement']:.1%}")
    if isinstance(backend, OpenAIBackend) and backend.errors:
        print(f"{backend.failed} requests failed; first error: {backend.errors[0]}")
    return report
