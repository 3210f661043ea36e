"""Evaluating a policy on the tiny world's held-out prompts against the gold reward.

Metrics (per prompt, then averaged):
  format_rate   the reply ends with ``The answer is N.`` and the model stopped with its end-of-turn token
  accuracy      the final answer equals the ground truth
  request_rate  over prompts that carry a request, the share of replies that follow it (``follows_request``);
                ``request_rate_by_style`` the same per requested style
  gold_reward   the world's gold reward (correctness + format + request + concision, see posttrain.world.gold)
  mean_length   completion length in tokens (without the stop token)
  stop_rate     the model emitted end-of-turn/eos before max_new_tokens
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data.messages import completion_text
from posttrain.data.prompts import load_prompt_rows
from posttrain.maths.stats import pearson, win_rate  # noqa: F401  (win_rate: also importable from here)
from posttrain.models.loading import load_causal_lm, load_tokenizer, resolve_device
from posttrain.models.logprobs import policy_kl, samples_kl  # noqa: F401  (policy_kl: also importable from here)
from posttrain.world.datagen import LENGTH_BIAS_DELTA
from posttrain.world.gold import follows_format, gold_components, gold_reward, parse_final_answer
from posttrain.world.requests import STYLES, follows_request, request_of


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
def load_eval_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    """Rows with ``prompt`` (messages; a string becomes one user turn) and ``answer`` (e.g. the world's
    rl_heldout.jsonl), read and checked by the one prompt loader (bad rows name file, line and field)."""
    return [{"prompt": messages, **extra} for messages, extra in load_prompt_rows(str(path), limit=limit)]
# pragma: no mutate end


def score_completions(rows: list[dict], completions) -> dict:
    """The metrics of the module docstring for ``completions[i]`` replying to ``rows[i]`` (``prompt``, ``answer``)."""
    n = len(rows)
    formatted = accurate = reward = length = stopped = 0.0
    asked = {style: 0 for style in STYLES}
    followed = {style: 0 for style in STYLES}
    for row, completion in zip(rows, completions):
        stop = completion.finish_reason == "stop"
        formatted += follows_format(completion.text) and stop
        accurate += parse_final_answer(completion.text) == int(row["answer"])
        reward += gold_reward(row["prompt"], completion.text)
        length += len(completion.content_ids)
        stopped += stop
        if (style := request_of(row["prompt"])) is not None:
            asked[style] += 1
            followed[style] += bool(follows_request(row["prompt"], completion.text))
    by_style = {style: followed[style] / asked[style] for style in STYLES if asked[style]}
    total_asked = sum(asked.values())
    return {"format_rate": formatted / n, "accuracy": accurate / n,
            "request_rate": sum(followed.values()) / total_asked if total_asked else float("nan"),
            "gold_reward": reward / n, "mean_length": length / n, "stop_rate": stopped / n,
            "request_rate_by_style": by_style, "requests": total_asked}


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
def evaluate_model(model_dir: str | Path, prompts_path: str | Path, *, limit: int = 0, max_new_tokens: int = 64,
                   batch_size: int = 512, device: str = "auto", samples_path: Path | None = None,
                   temperature: float = 0.0, n: int = 1, seed: int = 0, kl_reference: str | Path | None = None,
                   kl_prompts: int = 0) -> dict[str, float]:
    """The model's replies to held-out prompts, scored with the gold reward: greedy by default, or ``n`` samples
    per prompt at ``temperature`` (the policy as it is used: greedy decoding of a model that learned "follow the
    request half the time" picks the requested style, since it is the single most likely one). With
    ``kl_reference`` (samples at temperature 1 only) also ``kl_to_reference``: the Monte-Carlo KL to that model
    over these very samples of the first ``kl_prompts`` prompts (0 = all; :func:`samples_kl`)."""
    from posttrain.models.generation import HFEngine, SamplingParams

    if kl_reference is not None and temperature != 1.0:
        raise ValueError("kl_reference needs samples of the policy itself (temperature 1)")
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device=resolve_device(device))
    rows = load_eval_prompts(prompts_path, limit)
    params = SamplingParams(n=n if temperature > 0 else 1, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed, logprobs=kl_reference is not None)
    samples = HFEngine(model, tokenizer, batch_size=batch_size).generate([row["prompt"] for row in rows], params)
    kl = None
    if kl_reference is not None:
        kl = samples_kl(tokenizer, [row["prompt"] for row in rows][: kl_prompts or None],
                        samples[: kl_prompts or None], kl_reference, device=device)
    rows = [row for row, replies in zip(rows, samples) for _ in replies]
    completions = [c for replies in samples for c in replies]
    if samples_path is not None:
        with Path(samples_path).open("w") as f:
            for row, c in zip(rows, completions):
                f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"], "completion": c.text,
                                    "finish_reason": c.finish_reason}) + "\n")
    scores = score_completions(rows, completions)
    return scores if kl is None else {**scores, "kl_to_reference": kl}
# pragma: no mutate end


def _jsonl(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


NEAR_TIE = LENGTH_BIAS_DELTA
"""Pairs whose gold rewards differ by at most this much are near ties (the annotators' length bias decides them)."""


def pair_kind(prompt, chosen, rejected) -> str:
    """What tells a pair apart under the gold reward: ``tie`` (equal gold), ``near_tie`` (within NEAR_TIE),
    ``answer_check`` (both give an answer, exactly one right), ``request`` (both right and formatted under a prompt
    with a request, exactly one follows it) or ``surface`` (format, rambling, a missing answer)."""
    a, b = gold_components(prompt, chosen), gold_components(prompt, rejected)
    if a["reward"] == b["reward"]:
        return "tie"
    if abs(a["reward"] - b["reward"]) <= NEAR_TIE:
        return "near_tie"
    gives_answer = all(parse_final_answer(completion_text(c)) is not None for c in (chosen, rejected))
    if gives_answer and a["correct"] != b["correct"]:
        return "answer_check"
    if (a["correct"] and b["correct"] and a["format_ok"] and b["format_ok"] and a["has_request"]
            and a["request_ok"] != b["request_ok"]):
        return "request"
    return "surface"


def _accuracy(items: list[tuple[float, float]]) -> float:
    """Share of (score of the gold-preferred reply, score of the other) with the first higher; ties count half."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in items) / len(items) if items else float("nan")


def _score_pairs(reward, pairs: list[dict]) -> list[tuple[float, float, tuple]]:
    """``(score of the gold-preferred reply, score of the other, (prompt, better, worse))`` for each pair without a
    gold tie that the reward scores (whatever the file's labels say: the gold reward decides which is better)."""
    prompts = [p["prompt"] for p in pairs]
    first = reward(prompts, [p["chosen"] for p in pairs])
    second = reward(prompts, [p["rejected"] for p in pairs])
    out = []
    for a, b, pair in zip(first, second, pairs):
        gold_a, gold_b = (gold_reward(pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        if a is None or b is None or gold_a == gold_b:
            continue
        if gold_a > gold_b:
            out.append((a, b, (pair["prompt"], pair["chosen"], pair["rejected"])))
        else:
            out.append((b, a, (pair["prompt"], pair["rejected"], pair["chosen"])))
    return out


def evaluate_reward_on_world(reward, data_dir: str | Path, *, limit: int = 0) -> dict[str, float]:
    """A reward (any implementation of the reward interface) against the tiny world's gold reward.

    On the held-out preference pairs, scored against the gold reward (not the annotators' noisy labels; gold ties
    left out):
    pair_accuracy                  all pairs: reward(gold-preferred) > reward(other), ties count half
    pair_accuracy_request          pairs told apart by the request (both right and formatted, one follows it)
    pair_accuracy_request_shorter  those whose preferred reply is the shorter one (a length proxy fails these)
    pair_accuracy_surface          format, rambling, a missing answer
    pair_accuracy_answer_check     both give an answer, exactly one right (the reward must check the arithmetic)
    pair_accuracy_near_tie         gold rewards within NEAR_TIE (where the annotators' length bias decided)
    pair_accuracy_request_unseen_phrasing   request pairs whose prompts use held-out phrasings (preference_unseen)
    counterfactual_flip_rate       the same two replies under two requests that prefer opposite ones: the share
                                   where the reward prefers each request's reply (counterfactual_heldout)
    length_correlation             Pearson correlation of the reward with the reply's length in words
    top1_accuracy / random_top1    held-out rankings: the reply the reward ranks first is correct / a random one is
    ``*_pairs`` count each group.
    """
    data_dir = Path(data_dir)
    pairs = _jsonl(data_dir / "preference_heldout.jsonl", limit)
    scored = _score_pairs(reward, pairs)
    groups: dict[str, list[tuple[float, float]]] = {k: [] for k in ("request", "surface", "answer_check", "near_tie")}
    shorter: list[tuple[float, float]] = []
    lengths, values = [], []
    for a, b, (prompt, better, worse) in scored:
        kind = pair_kind(prompt, better, worse)
        groups[kind].append((a, b))
        if kind == "request" and len(completion_text(better).split()) < len(completion_text(worse).split()):
            shorter.append((a, b))
        for completion, value in ((better, a), (worse, b)):
            lengths.append(len(completion_text(completion).split()))
            values.append(value)
    report: dict[str, float] = {"pair_accuracy": _accuracy([(a, b) for a, b, _ in scored]), "pairs": len(scored)}
    for kind, items in groups.items():
        report[f"pair_accuracy_{kind}"] = _accuracy(items)
        report[f"{kind}_pairs"] = len(items)
    report["pair_accuracy_request_shorter"] = _accuracy(shorter)
    report["request_shorter_pairs"] = len(shorter)

    unseen_path = data_dir / "preference_unseen.jsonl"
    unseen = _score_pairs(reward, _jsonl(unseen_path, limit)) if unseen_path.exists() else []
    report["pair_accuracy_request_unseen_phrasing"] = _accuracy([(a, b) for a, b, _ in unseen])

    counterfactual_path = data_dir / "counterfactual_heldout.jsonl"
    rows = _jsonl(counterfactual_path, limit) if counterfactual_path.exists() else []
    flat_prompts = [p for row in rows for p in row["prompts"] for _ in range(2)]
    flat_replies = [c for row in rows for _ in range(2) for c in row["completions"]]
    scores = reward(flat_prompts, flat_replies) if rows else []
    flips = [scores[4 * i] > scores[4 * i + 1] and scores[4 * i + 3] > scores[4 * i + 2] for i in range(len(rows))
             if None not in scores[4 * i: 4 * i + 4]]
    report["counterfactual_flip_rate"] = sum(flips) / len(flips) if flips else float("nan")
    report["counterfactual_rows"] = len(flips)

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
    for completion, score in zip(flat_completions, flat_scores):
        if score is not None:
            lengths.append(len(completion_text(completion).split()))
            values.append(score)
    report.update(top1_accuracy=top1 / max(1, len(rankings)), random_top1=random_top1 / max(1, len(rankings)),
                  length_correlation=pearson(values, lengths), rankings=len(rankings))
    return report


# pragma: no mutate start (reads files or runs a model; `make mutate` covers the scoring functions only)
def sampled_gold_per_prompt(model_dir: str | Path, prompts: list[list[dict]], *, n: int, max_new_tokens: int = 64,
                            seed: int = 0, device: str = "auto", batch_size: int = 512) -> list[float]:
    """Per prompt, the mean gold reward of ``n`` samples at temperature 1: an estimate of the policy's expected gold
    reward on that prompt, E_{y ~ pi(.|x)} gold(x, y)."""
    return sampled_gold_and_kl(model_dir, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed, device=device,
                               batch_size=batch_size)[0]


def sampled_gold_and_kl(model_dir: str | Path, prompts: list[list[dict]], *, n: int, max_new_tokens: int = 64,
                        seed: int = 0, device: str = "auto", batch_size: int = 512,
                        kl_reference: str | Path | None = None, kl_prompts: int = 0,
                        kl_samples: int = 0) -> tuple[list[float], float | None]:
    """:func:`sampled_gold_per_prompt`, and with ``kl_reference`` the Monte-Carlo KL to that model over the first
    ``kl_samples`` of these samples (0 = all) of the first ``kl_prompts`` prompts (0 = all): the same samples,
    not new ones (:func:`samples_kl`; the log-probs do not change what is sampled)."""
    from posttrain.models.generation import HFEngine, SamplingParams

    engine = HFEngine.from_path(model_dir, device=device, batch_size=batch_size)
    samples = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                                                      logprobs=kl_reference is not None))
    gold = [sum(gold_reward(prompt, c.text) for c in completions) / n for prompt, completions in zip(prompts, samples)]
    if kl_reference is None:
        return gold, None
    head = [completions[: kl_samples or None] for completions in samples[: kl_prompts or None]]
    return gold, samples_kl(engine.tokenizer, prompts[: kl_prompts or None], head, kl_reference, device=device)
# pragma: no mutate end
