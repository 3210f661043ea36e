"""Evaluation of a model on a prompt set: ``posttrain eval``.

Samples n completions per prompt once, then reports (docs/evaluation.md has every formula):

  pass@k      the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al., 2021), c the samples whose --reward is
              >= --threshold (unscored samples count as wrong and are counted in ``correctness.unscored``)
  maj@k       the expected majority-vote accuracy over every k-subset of the n samples (ties split evenly): the
              final answers (the math verifier's extraction) grouped under math-verify equivalence, the winning
              group checked against the row's ``answer``; only for rows with an ``answer`` column
              (``maj_at_k_first_k``: the vote of the first k samples, ties to the answer seen first, as lighteval)
  win-rate    against --baseline (sampled with the same settings), both scored by --judge_reward: per prompt the
              mean over sample pairs j of win 1 / tie 0.5 / loss 0, then the mean over prompts, with a Wilson,
              normal and paired-bootstrap interval (--ci picks the one shown)
  KL          Monte-Carlo KL(model || --reference) per completion in nats (``policy_kl``: its own n samples per
              prompt at temperature 1)
  length      mean / median / p90 of completion tokens and words, stop rate and truncation rate
  contamination  word n-gram overlap of the prompts with --train_data (``posttrain.data.decontam``); with
              --decontaminate only the clean rows are evaluated, and written to OUT.clean.jsonl

Writes --out (JSON: the settings and every metric) and OUT.samples.jsonl (the completions, rewards, correctness
and answers), and prints a table. Without --model it only reports contamination (needs --train_data).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from posttrain.data.io import DataError, read_rows, validate_rows, write_jsonl
from posttrain.data.prompts import GENERATED_KEYS, prompt_messages
from posttrain.maths.selection import maj_at_k, maj_at_k_unbiased, pass_at_k, powers_of_two
from posttrain.maths.stats import bootstrap_interval, normal_interval, quantile, wilson_interval, win_scores
from posttrain.plumbing.config import SamplingConfig, config_to_dict, option, overwrite_option, stage_config
from posttrain.stages.bestofn import REWARD_SPEC_HELP, reward_matrix, sample, sampling_params

CI_METHODS = ("wilson", "normal", "bootstrap")


@stage_config
class EvalConfig(SamplingConfig):
    model: str = option("", "model directory (local) to evaluate; empty = only the contamination check (with "
                            "--train_data)")
    prompts: str = option("", "eval prompt rows: `prompt` (text or messages) or `messages`, and an `answer` column "
                              "for verifiable tasks (verifier:math, maj@k)")
    k: str = option("", "comma-separated k for pass@k and maj@k, each <= n (e.g. 1,4,16); empty = 1, 2, 4, ..., n")
    reward: str = option("verifier:math", "the correctness reward of pass@k: " + REWARD_SPEC_HELP + "; empty = no "
                                          "pass@k")
    threshold: float = option(1.0, "a sample is correct when its --reward is >= this (a verifier gives 1 or 0)",
                              minimum=None)
    baseline: str = option("", "baseline model directory for the win-rate (sampled with the same settings); "
                               "empty = no win-rate")
    judge_reward: str = option("", "the reward that compares the model's and the baseline's replies, sample by "
                                   "sample: rm:DIR | judge:DIR | gold | any reward spec (required with --baseline)")
    ci: str = option("wilson", "the win-rate interval shown and stored as `ci`: wilson (default: inside [0, 1], "
                               "conservative with ties) | normal | bootstrap (all three are in the JSON)",
                     choices=CI_METHODS)
    confidence: float = option(0.95, "confidence level of the win-rate intervals", above=0, below=1)
    bootstrap_resamples: int = option(2000, "resamples of the paired bootstrap (seeded by --seed)", minimum=1)
    reference: str = option("", "reference model directory for KL(model || reference); empty = no KL")
    train_data: str = option("", "training rows (any format; every string field is compared) for the n-gram "
                                 "contamination check; empty = no check")
    ngram: int = option(8, "n of the word n-grams of the contamination check", minimum=1)
    min_overlap: float = option(0.0, "a row is contaminated when it shares an n-gram with --train_data and at least "
                                     "this share of its n-grams (0 = any shared n-gram)", maximum=1)
    decontaminate: bool = option(False, "evaluate only the uncontaminated rows and write them to OUT.clean.jsonl "
                                        "(needs --train_data)")
    out: str = option("eval.json", "output JSON; the samples go to OUT.samples.jsonl beside it")
    overwrite: bool = overwrite_option()


def parse_ks(text: str, n: int) -> list[int]:
    """The k values of ``--k`` (``"1,4,16"``), sorted and unique, each in 1..n; empty = 1, 2, 4, ..., n."""
    if not text.strip():
        return powers_of_two(n)
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers like 1,4,16, got {text!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"--k: every k must be in 1..n (n={n}), got {text!r}; raise --n or lower --k")
    return ks


def pass_at_ks(correct: list[list[bool]], ks: list[int]) -> dict[str, float]:
    """The mean over prompts of pass@k for each k (``correct``: M x n flags)."""
    return {str(k): statistics.fmean(pass_at_k(len(row), sum(row), k) for row in correct) for k in ks}


def answer_groups(answers: list[str | None], same) -> list[int | None]:
    """A group id per answer: answers that ``same(representative, answer)`` puts with an earlier group's first
    answer (its representative) share its id; identical strings always do; None (no answer) stays None. Greedy
    and in order, so a group is the answers equivalent to its first member."""
    representatives: list[str] = []
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        group = next((g for g, rep in enumerate(representatives) if rep == answer or same(rep, answer)), None)
        if group is None:
            representatives.append(answer)
            group = len(representatives) - 1
        ids.append(group)
    return ids


def maj_at_ks(groups: list[list[int | None]], truths: list[int | None], ks: list[int], *,
              first_k: bool = False) -> dict[str, float]:
    """The mean over prompts of :func:`maj_at_k_unbiased` for each k (``truths[i]``: the correct group of prompt
    i, None when no sample found the answer); ``first_k``: of :func:`maj_at_k` instead, the vote of the first k
    samples with ties to the answer seen first (lighteval's maj@k)."""
    if first_k:  # -1 is no group: a prompt without a right answer never counts, even when nothing was answered
        return {str(k): statistics.fmean(maj_at_k(g, -1 if t is None else t, k) for g, t in zip(groups, truths))
                for k in ks}
    return {str(k): statistics.fmean(maj_at_k_unbiased(g, t, k) for g, t in zip(groups, truths)) for k in ks}


def win_rate_report(scores: list[float | None], confidence: float, resamples: int, seed: int, ci: str) -> dict:
    """The win-rate over the prompts with a score, its three intervals and the one chosen as ``ci``."""
    kept = [s for s in scores if s is not None]
    if not kept:
        return {"win_rate": float("nan"), "prompts": 0, "unscored_prompts": len(scores)}
    intervals = {"wilson": wilson_interval(sum(kept), len(kept), confidence),
                 "normal": normal_interval(kept, confidence),
                 "bootstrap": bootstrap_interval(kept, confidence, resamples=resamples, seed=seed)}
    return {"win_rate": statistics.fmean(kept), "prompts": len(kept), "unscored_prompts": len(scores) - len(kept),
            "prompts_won": sum(s > 0.5 for s in kept), "prompts_tied": sum(s == 0.5 for s in kept),
            "prompts_lost": sum(s < 0.5 for s in kept),
            "ci": {"method": ci, "confidence": confidence, "low": intervals[ci][0], "high": intervals[ci][1]},
            "intervals": {name: list(bounds) for name, bounds in intervals.items()}}


def length_stats(rows: list[dict]) -> dict:
    """Completion tokens and words (mean, median, p90), the stop rate (ended with end-of-turn / EOS) and the
    truncation rate (ran out of max_new_tokens)."""
    tokens = [float(x) for r in rows for x in r["lengths"]]
    word_counts = [float(len(c.split())) for r in rows for c in r["completions"]]
    reasons = [f for r in rows for f in r["finish_reasons"]]

    def summary(values):
        return {"mean": statistics.fmean(values), "median": statistics.median(values), "p90": quantile(values, 0.9)}

    return {"tokens": summary(tokens), "words": summary(word_counts),
            "stop_rate": sum(f == "stop" for f in reasons) / len(reasons),
            "truncation_rate": sum(f == "length" for f in reasons) / len(reasons)}


def _load_rows(config: EvalConfig):
    rows = read_rows(config.prompts, columns=config.columns or None)
    kept, report = validate_rows(rows, prompt_messages, skip_invalid=config.skip_invalid, source=config.prompts)
    if report.dropped:
        print(report.summary())
    kept = kept[:config.limit] if config.limit else kept
    if not kept:
        raise DataError(config.prompts, "", None, "no usable prompt rows")
    return kept


def _same_answer(a: str, b: str) -> bool:
    from posttrain.rewards.verifiers import math_reward

    return math_reward(f"\\boxed{{{b}}}", f"\\boxed{{{a}}}") == 1.0


def run_eval(config: EvalConfig) -> dict:
    from posttrain.data.decontam import contamination, write_clean
    from posttrain.models.generation import load_engine
    from posttrain.rewards import reward_from_spec
    from posttrain.rewards.verifiers import extract_answer, math_reward

    if not config.prompts:
        raise ValueError("posttrain eval needs --prompts=FILE (and --model=DIR, or --train_data=FILE alone for the "
                         "contamination check)")
    if not config.model and not config.train_data:
        raise ValueError("posttrain eval needs --model=DIR (or --train_data=FILE for a contamination check only)")
    if config.decontaminate and not config.train_data:
        raise ValueError("--decontaminate needs --train_data=FILE (the training rows to compare against)")
    if config.baseline and not config.judge_reward:
        raise ValueError("--baseline needs --judge_reward (rm:DIR, judge:DIR, gold, ...) to compare the replies")
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite=true to replace it")
    ks = parse_ks(config.k, config.n) if config.model else []
    kept = _load_rows(config)
    result: dict = {"settings": config_to_dict(config)}
    if config.train_data:
        result["contamination"], flags = contamination(kept, config.train_data, config.ngram, config.min_overlap)
        if config.decontaminate:
            clean = write_clean(kept, flags, out.with_suffix(".clean.jsonl"))
            kept = [item for item, dirty in zip(kept, flags) if not dirty]
            result["contamination"]["clean_rows_file"] = str(clean)
            if not kept:
                raise DataError(config.prompts, "", None, "every row is contaminated: nothing left to evaluate")
    prompt_rows = [(messages, {k: v for k, v in row.data.items() if k not in ("prompt", "messages") + GENERATED_KEYS})
                   for row, messages in kept]
    if config.model:
        params = sampling_params(config)
        engine = load_engine(config.model, backend=config.backend, device=config.device,
                             chat_template=config.chat_template, batch_size=config.batch_size)
        rows = sample(engine, prompt_rows, params)
        del engine
        result.update({"model": config.model, "prompts": len(rows), "samples_per_prompt": config.n})
        if config.reward:
            R = reward_matrix(reward_from_spec(config.reward, device=config.device), rows)
            correct = [[x is not None and x >= config.threshold for x in row] for row in R]
            for row, rewards, flags in zip(rows, R, correct):
                row["rewards"], row["correct"] = rewards, flags
            result["correctness"] = {"reward": config.reward, "threshold": config.threshold,
                                     "unscored": sum(x is None for row in R for x in row),
                                     "mean": statistics.fmean(f for row in correct for f in row)}
            result["pass_at_k"] = pass_at_ks(correct, ks)
        if all("answer" in r for r in rows):
            groups, truths = [], []
            for row in rows:
                row["answers"] = [extract_answer(c) or None for c in row["completions"]]
                ids = answer_groups(row["answers"], _same_answer)
                representative: dict[int, str] = {}  # each group's first answer (the one it was formed around)
                for g, a in zip(ids, row["answers"]):
                    if g is not None:
                        representative.setdefault(g, a)
                truth = next((g for g, a in sorted(representative.items())
                              if math_reward(f"\\boxed{{{a}}}", row["answer"]) == 1.0), None)
                row["answer_groups"] = ids
                groups.append(ids)
                truths.append(truth)
            result["maj_at_k"] = maj_at_ks(groups, truths, ks)
            result["maj_at_k_first_k"] = maj_at_ks(groups, truths, ks, first_k=True)
        if config.baseline:
            baseline_engine = load_engine(config.baseline, backend=config.backend, device=config.device,
                                          chat_template=config.chat_template, batch_size=config.batch_size)
            baseline_rows = sample(baseline_engine, prompt_rows, params)
            del baseline_engine
            judge = reward_from_spec(config.judge_reward, device=config.device)
            mine, theirs = reward_matrix(judge, rows), reward_matrix(judge, baseline_rows)
            scores = win_scores(mine, theirs)
            for row, base, m, t, s in zip(rows, baseline_rows, mine, theirs, scores):
                row.update({"judge_rewards": m, "baseline_completions": base["completions"],
                            "baseline_judge_rewards": t, "win_score": s})
            result["win_rate"] = {"baseline": config.baseline, "judge_reward": config.judge_reward,
                                  **win_rate_report(scores, config.confidence, config.bootstrap_resamples,
                                                    config.seed, config.ci)}
        if config.reference:
            from posttrain.models.logprobs import policy_kl

            kl = policy_kl(config.model, config.reference, [messages for messages, _ in prompt_rows], n=config.n,
                           max_new_tokens=config.max_new_tokens, seed=config.seed, device=config.device,
                           sample_batch_size=config.batch_size)
            result["kl"] = {"reference": config.reference, "kl_nats": kl, "samples_per_prompt": config.n}
        result["length"] = length_stats(rows)
        result["samples_file"] = str(write_jsonl(rows, out.with_suffix(".samples.jsonl")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    print_table(result)
    print(f"results: {out}")
    return result


def print_table(result: dict) -> None:
    """The metrics of ``result`` as a two-column console table."""
    lines = []
    if "model" in result:
        lines.append(("model", f"{result['model']} ({result['prompts']} prompts x {result['samples_per_prompt']})"))
    for k, value in result.get("pass_at_k", {}).items():
        lines.append((f"pass@{k}", f"{value:.4f}"))
    for k, value in result.get("maj_at_k", {}).items():
        lines.append((f"maj@{k}", f"{value:.4f}"))
    if win := result.get("win_rate"):
        label = f"win-rate vs baseline ({win['judge_reward']})"
        if win["prompts"]:
            ci = win["ci"]
            lines.append((label, f"{win['win_rate']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] ({ci['method']} "
                                 f"{ci['confidence']:.0%}; prompts won/tied/lost {win['prompts_won']}/"
                                 f"{win['prompts_tied']}/{win['prompts_lost']})"))
        else:
            lines.append((label, "nothing scored"))
    if kl := result.get("kl"):
        lines.append(("KL to reference (nats)", f"{kl['kl_nats']:.4f}"))
    if length := result.get("length"):
        for unit in ("tokens", "words"):
            stats = length[unit]
            lines.append((f"length ({unit}) mean/median/p90",
                          f"{stats['mean']:.1f} / {stats['median']:.1f} / {stats['p90']:.1f}"))
        lines.append(("stop rate / truncation rate", f"{length['stop_rate']:.3f} / {length['truncation_rate']:.3f}"))
    if found := result.get("contamination"):
        lines.append((f"contaminated ({found['ngram']}-gram)",
                      f"{found['contaminated']} of {found['rows']} rows ({found['rate']:.1%})"))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
