"""Evaluating a policy on the tiny world's held-out prompts against the gold reward.

Metrics (per prompt, then averaged):
  format_rate  the reply ends with ``The answer is N.`` and the model stopped with its end-of-turn token
  accuracy     the final answer equals the ground truth
  gold_reward  the world's gold reward (correctness + format + brevity, see posttrain.world.gold)
  mean_length  completion length in tokens (without the stop token)
  stop_rate    the model emitted end-of-turn/eos before max_new_tokens
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.generation import generate
from posttrain.modeling import load_causal_lm, load_tokenizer, resolve_device
from posttrain.world.gold import follows_format, gold_reward, parse_final_answer


def load_eval_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    """Rows with ``prompt`` (messages or string) and ``answer`` (e.g. the world's rl_heldout.jsonl)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        if isinstance(row["prompt"], str):
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    return rows[:limit] if limit else rows


def score_completions(rows: list[dict], completions) -> dict[str, float]:
    n = len(rows)
    formatted = accurate = reward = length = stopped = 0.0
    for row, completion in zip(rows, completions):
        stop = completion.finish_reason == "stop"
        formatted += follows_format(completion.text) and stop
        accurate += parse_final_answer(completion.text) == int(row["answer"])
        reward += gold_reward(row["prompt"], completion.text)
        length += len(completion.token_ids)
        stopped += stop
    return {"format_rate": formatted / n, "accuracy": accurate / n, "gold_reward": reward / n,
            "mean_length": length / n, "stop_rate": stopped / n}


def evaluate_model(model_dir: str | Path, prompts_path: str | Path, *, limit: int = 0, max_new_tokens: int = 64,
                   batch_size: int = 64, device: str = "auto", samples_path: Path | None = None) -> dict[str, float]:
    """Greedy replies of the model to held-out prompts, scored with the gold reward."""
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device=resolve_device(device))
    rows = load_eval_prompts(prompts_path, limit)
    completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    if samples_path is not None:
        with Path(samples_path).open("w") as f:
            for row, c in zip(rows, completions):
                f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"], "completion": c.text,
                                    "finish_reason": c.finish_reason}) + "\n")
    return score_completions(rows, completions)
