"""Inference-time scaling: ``posttrain scaling`` (best-of-n, pass@k and maj@k against log n).

Samples N completions per prompt once, then for every n in 1, 2, 4, ..., N evaluates, over the first n samples of
each prompt (samples are i.i.d., so the first n are a random draw of n):

  best-of-n reward     the --reward (an RM, say) picks one of n; its --gold reward (and its own) is averaged
  pass@n               the unbiased estimator 1 - C(N-c, n)/C(N, n) over all N samples (c correct ones)
  maj@n                majority vote over the final answers of the first n samples (ties: the first answer wins)
  KL(best-of-n)        the analytic log n - (n-1)/n nats from the sampling policy

and plots them against log2 n (the o1-style test-time-scaling plot). Correctness and answers come from the
``answer`` column with math-verify (``posttrain.rewards.verifiers``).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data.io import write_jsonl
from posttrain.data.prompts import load_prompt_rows
from posttrain.maths.selection import (
    best_of_n_kl,
    maj_at_k,
    mean_or_nan,
    pass_at_k,
    powers_of_two,
    select_top_per_prompt,
)
from posttrain.models.generation import load_engine
from posttrain.plumbing.config import SamplingConfig, option, stage_config
from posttrain.stages.bestofn import REWARD_SPEC_HELP, reward_matrix, sample, sampling_params


@stage_config
class ScalingConfig(SamplingConfig):
    prompts: str = option("", "verifiable prompts: `prompt` + `answer` columns (e.g. the tiny world's rl_heldout)")
    reward: str = option("gold", "the best-of-n selector: " + REWARD_SPEC_HELP)
    gold: str = option("verifier:math", "the reward that judges the picks (e.g. gold on the tiny world)")
    out: str = option("runs/scaling", "output directory: samples.jsonl, scaling.json, scaling.png")
    n: int = 16
    max_new_tokens: int = 64
    limit: int = 200


def scaling_table(selector: list[list[float | None]], gold: list[list[float | None]],
                  correct: list[list[bool]], answers: list[list[object]], truths: list[object]) -> list[dict]:
    """One row per n in 1, 2, 4, ..., N of the metrics in the module docstring (all lists are M x N)."""
    n_max = len(selector[0])
    table = []
    for n in powers_of_two(n_max):
        picks = select_top_per_prompt([row[:n] for row in selector])
        picked_gold = [gold[i][j] for i, j in enumerate(picks) if j >= 0 and gold[i][j] is not None]
        picked_selector = [selector[i][j] for i, j in enumerate(picks) if j >= 0]
        table.append({
            "n": n,
            "best_of_n_gold": mean_or_nan(picked_gold),
            "best_of_n_reward": mean_or_nan(picked_selector),
            "pass_at_n": mean_or_nan([pass_at_k(n_max, sum(c), n) for c in correct]),
            "maj_at_n": mean_or_nan([maj_at_k(a, t, n) for a, t in zip(answers, truths)]),
            "kl_best_of_n": best_of_n_kl(n),
        })
    return table


def plot_scaling(table: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [row["n"] for row in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in [("pass_at_n", "pass@n"), ("maj_at_n", "maj@n"), ("best_of_n_gold", "best-of-n: gold")]:
        left.plot(ns, [row[key] for row in table], marker="o", label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("n (samples, log scale)")
    left.set_title(title)
    left.legend()
    right.plot(ns, [row["best_of_n_reward"] for row in table], marker="o", label="best-of-n: selector reward")
    right.set_xscale("log", base=2)
    right.set_xlabel("n (samples, log scale)")
    twin = right.twinx()
    twin.plot(ns, [row["kl_best_of_n"] for row in table], color="gray", linestyle="--", label="KL = log n - (n-1)/n")
    twin.set_ylabel("KL from the policy (nats)")
    right.legend(loc="upper left")
    twin.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_scaling(config: ScalingConfig) -> dict:
    from posttrain.rewards import reward_from_spec
    from posttrain.rewards.verifiers import final_answer_text, math_answer

    if not config.model or not config.prompts:
        raise ValueError("posttrain scaling needs --model=DIR and --prompts=FILE (with an `answer` column)")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt_rows = load_prompt_rows(config.prompts, columns=config.columns, skip_invalid=config.skip_invalid,
                                   limit=config.limit)
    if any("answer" not in extra for _, extra in prompt_rows):
        raise ValueError(f"{config.prompts}: every row needs an `answer` column for pass@n and maj@n")
    engine = load_engine(config.model, backend=config.backend, device=config.device,
                         chat_template=config.chat_template, batch_size=config.batch_size)
    rows = sample(engine, prompt_rows, sampling_params(config))
    del engine
    selector = reward_matrix(reward_from_spec(config.reward, device=config.device), rows)
    gold = reward_matrix(reward_from_spec(config.gold, device=config.device), rows)
    correct = [[math_answer(c, r["answer"]) == 1.0 for c in r["completions"]] for r in rows]
    answers = [[_answer_key(final_answer_text(c)) for c in r["completions"]] for r in rows]
    truths = [_answer_key(str(r["answer"])) for r in rows]
    for row, s, g in zip(rows, selector, gold):
        row["rewards"], row["gold"] = s, g
    write_jsonl(rows, out / "samples.jsonl")
    table = scaling_table(selector, gold, correct, answers, truths)
    result = {"model": config.model, "reward": config.reward, "gold": config.gold, "prompts": len(rows),
              "table": table}
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    model_name = "/".join(Path(config.model).resolve().parts[-2:])
    selector_name = config.reward.split(":")[0]
    plot_scaling(table, out / "scaling.png", f"{model_name}, {len(rows)} prompts, selector {selector_name}")
    print(f"{'n':>4} {'best-of-n gold':>15} {'selector':>9} {'pass@n':>7} {'maj@n':>7} {'KL':>6}")
    for row in table:
        print(f"{row['n']:>4} {row['best_of_n_gold']:>15.4f} {row['best_of_n_reward']:>9.4f} {row['pass_at_n']:>7.3f} "
              f"{row['maj_at_n']:>7.3f} {row['kl_best_of_n']:>6.3f}")
    print(f"plot: {out / 'scaling.png'}")
    return result


def _answer_key(text: str):
    """A hashable, equivalence-normalised form of an answer for voting: math-verify's parsed value, else None."""
    from math_verify import parse

    parsed = parse(text)
    return str(parsed[0]) if parsed else None
