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

from posttrain.data.messages import completion_text
from posttrain.data.prompts import load_prompt_rows
from posttrain.maths.stats import pearson, win_rate  # noqa: F401  (win_rate: also importable from here)
from posttrain.models.generation import generate
from posttrain.models.loading import load_causal_lm, load_tokenizer, resolve_device
from posttrain.models.logprobs import policy_kl  # noqa: F401  (also importable from here, its first home)
from posttrain.world.gold import follows_format, gold_reward, parse_final_answer


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
def load_eval_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    """Rows with ``prompt`` (messages; a string becomes one user turn) and ``answer`` (e.g. the world's
    rl_heldout.jsonl), read and checked by the one prompt loader (bad rows name file, line and field)."""
    return [{"prompt": messages, **extra} for messages, extra in load_prompt_rows(str(path), limit=limit)]
# pragma: no mutate end


def score_completions(rows: list[dict], completions) -> dict[str, float]:
    n = len(rows)
    formatted = accurate = reward = length = stopped = 0.0
    for row, completion in zip(rows, completions):
        stop = completion.finish_reason == "stop"
        formatted += follows_format(completion.text) and stop
        accurate += parse_final_answer(completion.text) == int(row["answer"])
        reward += gold_reward(row["prompt"], completion.text)
        length += len(completion.content_ids)
        stopped += stop
    return {"format_rate": formatted / n, "accuracy": accurate / n, "gold_reward": reward / n,
            "mean_length": length / n, "stop_rate": stopped / n}


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
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
# pragma: no mutate end


def _jsonl(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def evaluate_reward_on_world(reward, data_dir: str | Path, *, limit: int = 0) -> dict[str, float]:
    """A reward (any implementation of the reward interface) against the tiny world's gold reward.

    pair_accuracy      held-out preference pairs where reward(chosen) > reward(rejected) (ties count half)
    pair_accuracy_answer_check   the same on the pairs where both replies give an answer and exactly one is right
                       (the reward must check the answer; ``answer_check_pairs`` of them), and
    pair_accuracy_rest on the others (format, verbosity, a missing answer tell them apart)
    top1_accuracy      held-out rankings: the completion the reward ranks first is correct
    random_top1        the same for a uniformly random pick (the fraction of correct completions)
    length_correlation Pearson correlation of the reward with the completion's length in words (length bias)
    """
    from posttrain.world.gold import gold_components

    data_dir = Path(data_dir)
    pairs = _jsonl(data_dir / "preference_heldout.jsonl", limit)
    prompts = [p["prompt"] for p in pairs]
    chosen = reward(prompts, [p["chosen"] for p in pairs])
    rejected = reward(prompts, [p["rejected"] for p in pairs])
    def answer_check(pair: dict) -> bool:
        gives_answer = [parse_final_answer(completion_text(pair[k])) is not None for k in ("chosen", "rejected")]
        correct = [gold_components(pair["prompt"], pair[k])["correct"] for k in ("chosen", "rejected")]
        return all(gives_answer) and correct[0] != correct[1]

    def accuracy(items: list[tuple[float, float]]) -> float:
        return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in items) / max(1, len(items))

    scored = [(c, r, answer_check(p)) for c, r, p in zip(chosen, rejected, pairs) if c is not None and r is not None]
    pair_accuracy = accuracy([(c, r) for c, r, _ in scored])
    checking = [(c, r) for c, r, check in scored if check]
    rest = [(c, r) for c, r, check in scored if not check]

    rankings = _jsonl(data_dir / "rankings_heldout.jsonl", limit)
    flat_prompts = [r["prompt"] for r in rankings for _ in r["completions"]]
    flat_completions = [c for r in rankings for c in r["completions"]]
    flat_scores = reward(flat_prompts, flat_completions)
    top1 = random_top1 = 0.0
    offset = 0
    for r in rankings:
        k = len(r["completions"])
        scores = flat_scores[offset : offset + k]
        correct = [gold_components(r["prompt"], c)["correct"] for c in r["completions"]]
        offset += k
        candidates = [i for i, s in enumerate(scores) if s is not None]
        if candidates:
            best = max(candidates, key=lambda i: scores[i])
            top1 += correct[best]
        random_top1 += sum(correct) / k
    lengths, values = [], []
    for completion, score in zip(flat_completions + [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                 flat_scores + chosen + rejected):
        if score is not None:
            lengths.append(len(completion_text(completion).split()))
            values.append(score)
    return {"pair_accuracy": pair_accuracy, "pair_accuracy_answer_check": accuracy(checking),
            "pair_accuracy_rest": accuracy(rest), "answer_check_pairs": len(checking),
            "top1_accuracy": top1 / max(1, len(rankings)),
            "random_top1": random_top1 / max(1, len(rankings)), "length_correlation": pearson(values, lengths),
            "pairs": len(scored), "rankings": len(rankings)}


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
def sampled_gold_per_prompt(model_dir: str | Path, prompts: list[list[dict]], *, n: int, max_new_tokens: int = 64,
                            seed: int = 0, device: str = "auto") -> list[float]:
    """Per prompt, the mean gold reward of ``n`` samples at temperature 1: an estimate of the policy's expected gold
    reward on that prompt, E_{y ~ pi(.|x)} gold(x, y)."""
    from posttrain.models.generation import HFEngine, SamplingParams

    engine = HFEngine.from_path(model_dir, device=device)
    samples = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    return [sum(gold_reward(prompt, c.text) for c in completions) / n
            for prompt, completions in zip(prompts, samples)]
# pragma: no mutate end
