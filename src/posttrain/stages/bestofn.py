"""Sample, score, select: ``posttrain generate | score | select | bon``.

The RLHF book's rejection-sampling pipeline as separate, inspectable steps on JSONL files:

  generate   prompts -> N completions per prompt (the generation engine)         {prompt, completions, lengths, ...}
  score      + a reward from the reward interface -> the reward matrix R (M x N)  ... + rewards
  select     R -> the best completion per prompt (top_per_prompt), the K best pairs overall (top_k), or
             best-vs-worst preference pairs (--pairs best_worst) for on-policy DPO data
  bon        best-of-N at inference: generate + score + top_per_prompt in one command

Other columns of the prompt rows (e.g. ``answer`` for a verifier) are carried through every step.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.harmony import completion_message
from posttrain.data.io import write_jsonl
from posttrain.data.prompts import GENERATED_KEYS, load_generated, load_prompt_rows
from posttrain.maths.selection import best_worst_pairs, mean_or_nan, ordered_pairs, select_top_k, select_top_per_prompt
from posttrain.models.generation import SamplingParams, load_engine
from posttrain.plumbing.config import SamplingConfig, device_option, option, overwrite_option, stage_config


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite=true to replace it")


# ---------------------------------------------------------------------------------------------------------------
# generate


@stage_config
class GenerateConfig(SamplingConfig):
    out: str = option("generations.jsonl", "output JSONL: prompt, completions, lengths, finish_reasons (+ logprobs)")
    logprobs: bool = option(False, "also write per-token log-probs of the sampled tokens (the end-of-turn token's "
                                   "last when the reply stopped; `lengths` count the reply's tokens without it)")
    overwrite: bool = overwrite_option()


def sample(engine, prompt_rows: list[tuple[list[dict], dict]], params: SamplingParams) -> list[dict]:
    """Generated rows for ``prompt_rows`` (see the module docstring)."""
    outputs = engine.generate([messages for messages, _ in prompt_rows], params)
    rows = []
    for (messages, extra), samples in zip(prompt_rows, outputs):
        row = {"prompt": messages, **extra, "completions": [c.text for c in samples],
               "lengths": [len(c.content_ids) for c in samples], "finish_reasons": [c.finish_reason for c in samples]}
        if params.logprobs:
            row["logprobs"] = [c.logprobs for c in samples]
        rows.append(row)
    return rows


REWARD_SPEC_HELP = ("gold | verifier:math | rm:DIR | orm:DIR[:last|mean|min] | prm:DIR[:min|mean|last|product] | "
                    "judge:DIR | weighted sums like 0.5*rm:DIR+0.5*gold")


def sampling_params(config: SamplingConfig) -> SamplingParams:
    return SamplingParams(n=config.n, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                          top_p=config.top_p, top_k=config.top_k, min_p=config.min_p, seed=config.seed,
                          logprobs=getattr(config, "logprobs", False))


def run_generate(config: GenerateConfig) -> Path:
    if not config.model or not config.prompts:
        raise ValueError("posttrain generate needs --model=DIR and --prompts=FILE")
    _check_out(config.out, config.overwrite)
    params = sampling_params(config)
    prompt_rows = load_prompt_rows(config.prompts, columns=config.columns, skip_invalid=config.skip_invalid,
                                   limit=config.limit)
    engine = load_engine(config.model, backend=config.backend, device=config.device,
                         chat_template=config.chat_template, batch_size=config.batch_size)
    rows = sample(engine, prompt_rows, params)
    path = write_jsonl(rows, config.out)
    lengths = [n for r in rows for n in r["lengths"]]
    stopped = sum(f == "stop" for r in rows for f in r["finish_reasons"])
    print(f"{path}: {len(rows)} prompts x {params.n} completions, mean length {statistics.mean(lengths):.1f} "
          f"tokens, {stopped / len(lengths):.1%} stopped at end-of-turn")
    return path


# ---------------------------------------------------------------------------------------------------------------
# score


@dataclass
class ScoreConfig:
    data: str = option("", "rows written by `posttrain generate`")
    reward: str = option("gold", REWARD_SPEC_HELP)
    out: str = option("scored.jsonl", "output JSONL: the input rows plus `rewards` (the reward matrix R, row by row)")
    device: str = device_option()
    overwrite: bool = overwrite_option()


def reward_matrix(reward, rows: list[dict]) -> list[list[float | None]]:
    """R (M x N): every completion of every row scored in one call to the reward (which batches and length-sorts)."""
    n = len(rows[0]["completions"])
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    completions = [c for r in rows for c in r["completions"]]
    extra_keys = sorted({k for r in rows for k in r} - set(GENERATED_KEYS))
    columns = {k: [r.get(k) for r in rows for _ in range(n)] for k in extra_keys}
    flat = reward(prompts, completions, **columns)
    return [flat[i * n : (i + 1) * n] for i in range(len(rows))]


def run_score(config: ScoreConfig) -> Path:
    from posttrain.rewards import reward_from_spec

    if not config.data:
        raise ValueError("posttrain score needs --data=FILE (from posttrain generate)")
    _check_out(config.out, config.overwrite)
    rows = load_generated(config.data)
    R = reward_matrix(reward_from_spec(config.reward, device=config.device), rows)
    for row, rewards in zip(rows, R):
        row["rewards"] = rewards
    path = write_jsonl(rows, config.out)
    scored = [x for r in R for x in r if x is not None]
    unscored = sum(x is None for r in R for x in r)
    print(f"{path}: reward {config.reward!r} on {len(rows)} x {len(R[0])} completions; mean "
          f"{mean_or_nan(scored):.4f}; unscored {unscored}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# select


@dataclass
class SelectConfig:
    data: str = option("", "rows written by `posttrain score` (with `rewards`)")
    strategy: str = option("top_per_prompt", "top_per_prompt (best completion of each prompt) | top_k (the K best "
                                              "prompt-completion pairs overall)", choices=("top_per_prompt", "top_k"))
    k: int = option(0, "top_k: how many pairs to keep (required)")
    min_reward: float = option(float("-inf"), "drop picks whose reward is below this (e.g. 1 with a verifier: keep "
                                             "only correct completions, as in rejection-sampling fine-tuning)",
                               minimum=None, finite=False)
    pairs: str = option("", "write prompt/chosen/rejected pairs instead of SFT rows: best_worst (best vs worst "
                            "completion of each prompt, prompts without a strict preference skipped) | all (every "
                            "pair of distinct completions with different rewards, up to --pairs_per_prompt)",
                        choices=("", "best_worst", "all"))
    pairs_per_prompt: int = option(4, "--pairs all: at most this many pairs per prompt (seeded draw); 0 = every pair")
    seed: int = option(0, "--pairs all: seed of the draw")
    out: str = option("selected.jsonl", "output JSONL: SFT `messages` rows (+ reward), or preference pairs")
    overwrite: bool = overwrite_option()


def _without_empty(rows: list[dict], R) -> list[list]:
    """``R`` with empty replies unscored: nothing to train on (SFT and DPO refuse them), so never picked or paired."""
    return [[x if _trainable(c) else None for c, x in zip(r["completions"], rewards)] for r, rewards in zip(rows, R)]


def _trainable(completion: str) -> bool:
    """The reply has something to train on: a content (a harmony reply's final answer) or a tool call."""
    message = completion_message(completion)
    return bool(message["content"].strip() or message.get("tool_calls"))


def pair_rows(rows: list[dict], R, chosen_pairs) -> list[dict]:
    """Preference rows (``prompt``/``chosen``/``rejected``, the rows' extra columns, both rewards) for
    ``(prompt, better, worse)`` index triples into ``rows``' completions."""
    return [{"prompt": rows[i]["prompt"], **{key: v for key, v in rows[i].items() if key not in GENERATED_KEYS},
             "chosen": [completion_message(rows[i]["completions"][better])],
             "rejected": [completion_message(rows[i]["completions"][worse])],
             "reward_chosen": R[i][better], "reward_rejected": R[i][worse]}
            for i, better, worse in chosen_pairs]


def verified_best_worst_rows(rows: list[dict], R, correct) -> list[dict]:
    """Best-vs-worst preference rows under :func:`~posttrain.maths.selection.verifier_plus_standardized`: ``R`` a
    reward model's matrix for ``rows``, ``correct`` a verifier's (1.0 = correct, None = could not check)."""
    from posttrain.maths.selection import best_worst_pairs, verifier_plus_standardized

    flags = [[None if c is None else c == 1.0 for c in row] for row in correct]
    combined = verifier_plus_standardized(_without_empty(rows, R), flags)
    return pair_rows(rows, combined, best_worst_pairs(combined, keys=[r["completions"] for r in rows]))


def select_rows(rows: list[dict], strategy: str, k: int = 0, pairs: str = "",
                min_reward: float = float("-inf"), pairs_per_prompt: int = 4, seed: int = 0) -> list[dict]:
    """SFT rows (``messages`` = prompt + chosen completion) or preference rows, from scored rows; SFT picks with a
    reward below ``min_reward`` are dropped, and empty replies never enter a pair or a pick (nothing to train on:
    SFT and DPO refuse them)."""
    R = [r["rewards"] for r in rows]
    extra = [{key: v for key, v in r.items() if key not in GENERATED_KEYS} for r in rows]
    if pairs:
        R = _without_empty(rows, R)
        if pairs == "best_worst":
            chosen_pairs = best_worst_pairs(R, keys=[r["completions"] for r in rows])
        elif pairs == "all":
            chosen_pairs = ordered_pairs(R, pairs_per_prompt, keys=[r["completions"] for r in rows], seed=seed)
        else:
            raise ValueError(f"unknown pairs rule {pairs!r} (best_worst | all)")
        return pair_rows(rows, R, chosen_pairs)
    if strategy == "top_per_prompt":
        picks = [(i, j) for i, j in enumerate(select_top_per_prompt(R)) if j >= 0]
    elif strategy == "top_k":
        if k < 1:
            raise ValueError("--strategy=top_k needs --k >= 1")
        n = len(R[0])
        picks = [divmod(index, n) for index in select_top_k(R, k)]
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return [{"messages": rows[i]["prompt"] + [completion_message(rows[i]["completions"][j])],
             **extra[i], "reward": R[i][j]} for i, j in picks
            if R[i][j] >= min_reward and _trainable(rows[i]["completions"][j])]


def run_select(config: SelectConfig) -> Path:
    if not config.data:
        raise ValueError("posttrain select needs --data=FILE (from posttrain score)")
    _check_out(config.out, config.overwrite)
    rows = load_generated(config.data, need_rewards=True)
    selected = select_rows(rows, config.strategy, config.k, config.pairs, config.min_reward,
                           config.pairs_per_prompt, config.seed)
    path = write_jsonl(selected, config.out)
    what = f"preference pairs ({config.pairs})" if config.pairs else f"SFT rows ({config.strategy})"
    print(f"{path}: {len(selected)} {what} from {len(rows)} prompts")
    return path


# ---------------------------------------------------------------------------------------------------------------
# best-of-N


@stage_config
class BonConfig(SamplingConfig):
    reward: str = option("gold", "the selector: " + REWARD_SPEC_HELP)
    report_reward: str = option("", "optionally also score the picks with this reward (e.g. gold) in the summary")
    out: str = option("bon.jsonl", "output JSONL: prompt, completion (the pick), reward, index, n (+ report_reward)")
    overwrite: bool = overwrite_option()
    n: int = 16


def best_of_n(engine, reward, prompt_rows, params: SamplingParams) -> tuple[list[dict], list[dict]]:
    """Sample ``params.n`` completions per prompt, score them, keep each prompt's best.

    Returns (picks, scored rows); a pick is ``{prompt, ..., completion, reward, index, n}`` (completion None when
    nothing could be scored)."""
    rows = sample(engine, prompt_rows, params)
    for row, rewards in zip(rows, reward_matrix(reward, rows)):
        row["rewards"] = rewards
    picks = []
    for row, j in zip(rows, select_top_per_prompt([r["rewards"] for r in rows])):
        extra = {k: v for k, v in row.items() if k not in GENERATED_KEYS}
        picks.append({"prompt": row["prompt"], **extra, "completion": row["completions"][j] if j >= 0 else None,
                      "reward": row["rewards"][j] if j >= 0 else None, "index": j, "n": params.n})
    return picks, rows


def run_bon(config: BonConfig) -> Path:
    from posttrain.rewards import reward_from_spec

    if not config.model or not config.prompts:
        raise ValueError("posttrain bon needs --model=DIR and --prompts=FILE")
    _check_out(config.out, config.overwrite)
    reward = reward_from_spec(config.reward, device=config.device)
    prompt_rows = load_prompt_rows(config.prompts, columns=config.columns, skip_invalid=config.skip_invalid,
                                   limit=config.limit)
    engine = load_engine(config.model, backend=config.backend, device=config.device,
                         chat_template=config.chat_template, batch_size=config.batch_size)
    picks, rows = best_of_n(engine, reward, prompt_rows, sampling_params(config))
    path = write_jsonl(picks, config.out)
    single = [x for r in rows for x in r["rewards"] if x is not None]
    best = [p["reward"] for p in picks if p["reward"] is not None]
    print(f"{path}: best-of-{config.n} by {config.reward!r}: mean selector reward {mean_or_nan(best):.4f} "
          f"(single samples {mean_or_nan(single):.4f})")
    if config.report_reward:
        report = reward_matrix(reward_from_spec(config.report_reward, device=config.device), rows)
        on_picks = [report[i][p["index"]] for i, p in enumerate(picks) if p["index"] >= 0]
        for i, pick in enumerate(picks):
            pick["report_reward"] = report[i][pick["index"]] if pick["index"] >= 0 else None
        write_jsonl(picks, config.out)
        print(f"  {config.report_reward!r}: best-of-{config.n} picks {mean_or_nan([x for x in on_picks if x is not None]):.4f}"
              f" vs single samples {mean_or_nan([x for r in report for x in r if x is not None]):.4f}")
    return path
