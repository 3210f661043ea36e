"""``posttrain demo``: the pipeline tour on the tiny world, offline, on a CPU, in minutes.

Stages: build the world (cached) -> pretrain the base model (cached) -> SFT -> evaluate both on held-out prompts
against the gold reward -> a Bradley-Terry reward model from the SFT model (trained on the annotators' noisy,
length-biased pairs), scored against the gold reward -> the SFT model's samples, drawn once (16 per held-out prompt,
8 per training prompt) and shared by what follows -> best-of-N on the held-out samples with the RM and with a
verifier -> one round of rejection-sampling fine-tuning on the training samples selected by the RM, and one selected
by the verifier -> on-policy DPO from the SFT model on pairs of its own training samples (per prompt the best against
the worst under the verifier plus the RM's standardized score; win-rate against the SFT model under the gold reward,
KL to it) -> GRPO with the math verifier from the SFT model (RLVR) -> PPO against the RM with a KL penalty (RLHF)
-> the over-optimization run: GRPO against the same RM without one, its proxy and gold reward against the KL. The
reward model trains in a second process while the samples are drawn, the verifier's round runs and GRPO trains;
the RM's round, its evaluation and the over-optimization run in one beside PPO, DPO and best-of-N
(``_Background``). Every stage's run directory lives under ``--out``; ``summary.json`` holds ``{"stages": {"base",
"sft", "rs_rm", "rs", "dpo", "grpo", "ppo"}, "reward_model", "best_of_n", "rejection_sampling": {"rm", "verifier"},
"dpo", "ppo", "over_optimization", "seconds", "stage_seconds"}``: per
policy format_rate, accuracy, request_rate (and per style), gold_reward, mean_length, stop_rate of greedy replies to
held-out prompts (sft and grpo also ``sampled_accuracy``: the share of right answers among 4 samples at T = 1 per
prompt); for the RM the pair accuracies by kind against the gold reward (request, surface, answer check,
near ties, unseen phrasings), the counterfactual flip rate and length correlation; for best-of-N the gold reward and
request rate of single samples and of each selector's picks; for rejection sampling the held-out gold reward of the
policy's samples before (the SFT model's 16 per prompt) and after each round (8 per prompt); for DPO the win-rate
against SFT (per-prompt expected gold from 16 samples each), the mean sampled gold of both, the KL to the SFT model
and the implicit-reward pair accuracy; for PPO its reward, beta, the rollouts' KL to the SFT model and the RM's
score of both policies' greedy replies; for the over-optimization run its curve and the peak and final gold reward
with their KL (:func:`over_optimization_curve`). Every stage also has ``proxy_reward`` (the RM's mean score of its
greedy held-out replies), ``kl_to_sft`` (Monte-Carlo KL to the SFT model on the first 100 held-out prompts, 4
samples each at T = 1: the first 4 of the samples a stage's sampled evaluation draws anyway, or 4 drawn for it;
base: null) and ``win_rate_vs_sft`` (greedy reply against the SFT model's greedy reply under the gold reward, ties
half);
best-of-N also has ``curve`` (the inference-time scaling curve, n = 1, 2, 4, ..., N) and ``picks`` (each selector's
picks measured as a stage). At the end ``report.html`` (self-contained) and ``report.md`` are written beside
``summary.json`` (:mod:`posttrain.stages.report`; ``--report_only`` rebuilds them; docs/demo.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.maths.stats import mean_or_nan
from posttrain.plumbing.config import device_option, option, progress_option
from posttrain.plumbing.runlog import StageClock
from posttrain.plumbing.harness import CHANGEABLE_ON_RESUME, is_complete, settings_changed


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "directory for every stage's run directory and summary.json")
    sft_steps: int = option(300, "SFT optimizer steps (300 x 32 = 2.4 epochs of the world's 4000 conversations)")
    sft_batch_size: int = option(32, "SFT conversations per step", minimum=1)
    sft_lr: float = option(1e-3, "SFT peak learning rate")
    rm_steps: int = option(1000, "Bradley-Terry reward-model optimizer steps (16 pairs each, constant lr; 1000 = one "
                                 "epoch of the world's 16000 preference pairs); 0 = skip the RM stage")
    bon_n: int = option(16, "best-of-N: samples per held-out prompt; 0 = skip the stage")
    bon_prompts: int = option(200, "best-of-N: held-out prompts")
    rs_prompts: int = option(1000, "rejection sampling: training prompts (8 SFT samples each), one round selected "
                                   "by the reward model and one by the math verifier; 0 = skip the stage")
    dpo_prompts: int = option(1000, "on-policy DPO: training prompts (8 SFT samples each; per prompt the best against "
                                    "the worst under the math verifier plus the reward model's standardized score; "
                                    "needs the RM stage); 0 = skip the stage")
    dpo_eval_samples: int = option(16, "DPO win-rate: samples per held-out prompt for each policy's expected gold")
    grpo_steps: int = option(120, "GRPO with the math verifier from the SFT model (RLVR): rollout steps of 8 training "
                                  "prompts x 8 samples, run while the reward model trains; 0 = skip the stage")
    ppo_steps: int = option(20, "PPO (RLHF) from the SFT model against the reward model, KL-penalised (beta 0.2): "
                                "rollout steps of 16 training prompts x 4 samples; 0 = skip (needs the RM stage)")
    overopt_steps: int = option(30, "over-optimization: GRPO steps (8 prompts x 8 samples) against the same reward "
                                    "model at beta 0, the KL to the SFT model tracked; 0 = skip (needs the RM stage)")
    sft_processes: int = option(1, "data-parallel processes of the SFT stage on a CPU (torchrun over gloo, one thread "
                                   "each): 2 nearly halve a step of the tiny model (0.38 -> 0.22 s), but sum the "
                                   "gradients in another order, so the SFT model and every stage after it come out "
                                   "differently (docs/demo.md); 1 = in this process", minimum=1)
    sampled_eval_n: int = option(4, "samples (T = 1) per held-out prompt for a stage's sampled_accuracy", minimum=1)
    eval_prompts: int = option(200, "held-out prompts to evaluate each stage on", minimum=1)
    max_new_tokens: int = option(64, "generation budget per reply", minimum=1)
    report_only: bool = option(False, "rebuild report.html and report.md from --out's summary.json and run "
                                      "directories, training nothing")
    device: str = device_option()
    progress: bool = progress_option()


TABLE_COLUMNS = (("format_rate", "format"), ("accuracy", "accuracy"), ("request_rate", "request"),
                 ("gold_reward", "gold"), ("proxy_reward", "proxy (RM)"), ("kl_to_sft", "KL to SFT"),
                 ("mean_length", "length"), ("win_rate_vs_sft", "win vs SFT"), ("stop_rate", "stop"))


def format_table(stages: dict[str, dict[str, float]]) -> str:
    """The console's stage table (the report's columns); a number a stage does not have prints as ``-``."""
    header = f"{'stage':<8}" + "".join(f"{title:>11}" for _, title in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, metrics in stages.items():
        cells = (metrics.get(key) for key, _ in TABLE_COLUMNS)
        lines.append(f"{name:<8}" + "".join(f"{'-':>11}" if v is None else f"{v:>11.3f}" for v in cells))
    return "\n".join(lines)


def _discard_if_config_changed(run_dir: Path, config) -> None:
    """Reuse (or resume) a stage run only if it was made with the same settings (those a resume may change aside,
    e.g. --progress or --device, and options added since); otherwise start it afresh."""
    import shutil

    saved = run_dir / "config.yaml"
    if saved.exists():
        changed = set(settings_changed(yaml.safe_load(saved.read_text()) or {}, config)) - set(CHANGEABLE_ON_RESUME)
        if changed:
            print(f"{run_dir}: settings changed since the last demo ({', '.join(sorted(changed))}), retraining "
                  "this stage")
            shutil.rmtree(run_dir)


def _in_child(target, args: tuple) -> None:
    """Entry point of a :class:`_Background` process (spawned: a fresh interpreter): ``target(*args)`` on one thread."""
    import torch

    torch.set_num_threads(1)
    target(*args)


class _Background:
    """``target(*args)`` in a second process while the main one goes on with one thread fewer: the reward model's
    training while the SFT model's samples are drawn and the verifier selects, then the RM-selected
    rejection-sampling round, the RM's evaluation and the over-optimization run while PPO, DPO and best-of-N run.
    On 2 cores this is the cheaper schedule: the tiny models barely use a second thread (one RM run on 1 thread, two
    side by side, each runs as fast as one on 2 threads), so a job beside another costs the demo almost no
    wall-clock time of its own. ``join()`` waits for it; ``cancel()`` stops it (SIGTERM: a training run
    checkpoints at a step boundary, so a rerun resumes it)."""

    def __init__(self, name: str, run_dir: Path, target, *args):
        import multiprocessing

        import torch

        self.name, self.run_dir = name, run_dir
        self.threads = torch.get_num_threads()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_in_child, args=(target, args), name=f"posttrain-demo-{name.replace(' ', '-')}")
        self.process.start()
        torch.set_num_threads(max(1, self.threads - 1))  # the other core is the job's

    def join(self) -> None:
        import torch

        self.process.join()
        torch.set_num_threads(self.threads)
        if self.process.exitcode != 0:
            raise RuntimeError(f"the {self.name} process failed (exit code {self.process.exitcode}); its run "
                               f"directory is {self.run_dir}")

    def cancel(self) -> None:
        import torch

        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        torch.set_num_threads(self.threads)


def _reward_model_config(config: "DemoConfig", paths, sft_model: Path, out: Path):
    """The demo's Bradley-Terry RM from the SFT model: one epoch of the world's preference pairs at a constant lr."""
    from posttrain.stages.rm import RMConfig

    return RMConfig(
        loss="bt", model=str(sft_model), data=str(paths.data / "preference_train.jsonl"), out=str(out / "rm"),
        max_steps=config.rm_steps,  # no eval_data: the world evaluation scores the held-out pairs
        # constant lr: with a cosine decay the RM's request reading came late and was cut short
        # (docs/reward-models.md)
        batch_size=16, lr=3e-4, lr_schedule="constant", save_every=100, device=config.device, progress=False,
        resume=True,
    )


def _train_rm(rm_config) -> None:
    from posttrain.stages.rm import train_rm

    train_rm(rm_config)


SAMPLE_BATCH = 512  # sequences per generate call: the tiny model's KV cache is small, bigger batches run faster


def _remove(out: Path, names: tuple[str, ...]) -> None:
    """Remove the run directories and files ``names`` under ``out``: they were made from a stage's previous output."""
    import shutil

    for stale in map(out.joinpath, names):
        if stale.is_dir():
            print(f"{stale}: made from a previous stage's output, redoing it")
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)


# What each stage's output feeds: redone when that stage is (re)trained or its samples are redrawn.
DOWNSTREAM = {
    "sft": ("rm", "rs_rm", "rs", "dpo", "grpo", "ppo", "overopt", "dpo_pairs.jsonl", "sft_samples_heldout.jsonl",
            "sft_samples_train.jsonl"),
    "rm": ("rs_rm", "dpo", "ppo", "overopt", "dpo_pairs.jsonl"),
    "sft_samples_train.jsonl": ("rs_rm", "rs", "dpo", "dpo_pairs.jsonl"),
    "dpo_pairs.jsonl": ("dpo",),
}


def _identity(model_dir: Path) -> list:
    """What a cached product of ``model_dir`` depends on: its path and its weights file's size and mtime (a retrained
    stage rewrites the weights in the same place)."""
    weights = next(iter(sorted(Path(model_dir).glob("*.safetensors"))), None)
    stat = weights.stat() if weights is not None else None
    return [str(model_dir), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]


def _sft_samples(config: DemoConfig, prompts: Path, sft_model: Path, path: Path, *, limit: int, n: int,
                 seed: int) -> list[dict]:
    """``n`` samples (T=1) of the SFT model for the first ``limit`` rows of ``prompts``, as ``posttrain generate``
    writes them; made once and shared by the stages that start from the SFT model (cached in ``path``; when they
    are made anew, what :data:`DOWNSTREAM` lists for ``path.name`` is removed)."""
    from posttrain.data.io import write_jsonl
    from posttrain.data.prompts import load_generated, load_prompt_rows
    from posttrain.models.generation import SamplingParams, load_engine
    from posttrain.stages.bestofn import sample

    settings = {"model": _identity(sft_model), "prompts": str(prompts), "limit": limit, "n": n, "seed": seed,
                "max_new_tokens": config.max_new_tokens}
    settings_path = path.with_suffix(".settings.json")
    if not path.exists() or not settings_path.exists() or json.loads(settings_path.read_text()) != settings:
        _remove(path.parent, DOWNSTREAM.get(path.name, ()))  # first: a crash below must not leave them looking current
        settings_path.unlink(missing_ok=True)
        engine = load_engine(sft_model, backend="hf", device=config.device, batch_size=SAMPLE_BATCH)
        params = SamplingParams(n=n, max_new_tokens=config.max_new_tokens, temperature=1.0, seed=seed)
        write_jsonl(sample(engine, load_prompt_rows(str(prompts), limit=limit), params), path)
        settings_path.write_text(json.dumps(settings))
    return load_generated(str(path))


def _best_of_n_stage(config: DemoConfig, rows: list[dict], rm_model: Path | None, sft_model: Path,
                     out: Path) -> dict:
    """Best-of-N on the SFT model's held-out samples: pick by the BT RM and by the math verifier; report the picks'
    gold reward and request rate against single samples', ``curve``: the inference-time scaling curve (n = 1, 2, 4,
    ..., N: each selector's picks among the first n samples, their gold reward, RM score and accuracy, pass@n and
    the analytic KL bound of best-of-n, log n - (n-1)/n), and ``picks``: each selector's picks at N measured as the
    stage table measures a policy (:func:`_pick_metrics`)."""
    from posttrain.maths.selection import best_of_n_kl, pass_at_k, powers_of_two, select_top_per_prompt
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.bestofn import reward_matrix
    from posttrain.world.requests import follows_request, request_of

    rows = [{**row, "completions": row["completions"][: config.bon_n]} for row in rows[: config.bon_prompts or None]]
    gold = reward_matrix(reward_from_spec("gold"), rows)
    correct = reward_matrix(reward_from_spec("verifier:math"), rows)
    selectors = {"verifier": correct}
    if rm_model is not None:
        selectors["reward_model"] = reward_matrix(reward_from_spec(f"rm:{rm_model}", device=config.device), rows)
    follows = [[follows_request(row["prompt"], c) for c in row["completions"]] for row in rows]
    asked = [i for i, row in enumerate(rows) if request_of(row["prompt"]) is not None]
    report = {"n": config.bon_n, "prompts": len(rows), "single_gold": mean_or_nan([g for row in gold for g in row]),
              "single_request_rate": mean_or_nan([float(f) for i in asked for f in follows[i]]),
              "pass_at_n": mean_or_nan([pass_at_k(config.bon_n, int(sum(c)), config.bon_n) for c in correct])}
    for name, R in selectors.items():
        picks = select_top_per_prompt(R)
        report[f"{name}_pick_gold"] = mean_or_nan([gold[i][j] for i, j in enumerate(picks) if j >= 0])
        report[f"{name}_pick_request_rate"] = mean_or_nan([float(follows[i][picks[i]]) for i in asked if picks[i] >= 0])
    proxy = selectors.get("reward_model")
    report["curve"] = []
    for n in powers_of_two(config.bon_n):
        point = {"n": n, "kl_bound": best_of_n_kl(n),
                 "pass_at_n": mean_or_nan([pass_at_k(config.bon_n, int(sum(c)), n) for c in correct])}
        for name, R in selectors.items():
            chosen = [(i, j) for i, j in enumerate(select_top_per_prompt([row[:n] for row in R])) if j >= 0]
            point[f"{name}_gold"] = mean_or_nan([gold[i][j] for i, j in chosen])
            point[f"{name}_accuracy"] = mean_or_nan([float(correct[i][j] == 1.0) for i, j in chosen])
            if proxy is not None:
                point[f"{name}_proxy"] = mean_or_nan([proxy[i][j] for i, j in chosen])
        report["curve"].append(point)
    report["picks"] = {name: _pick_metrics(rows, select_top_per_prompt(R), gold, proxy, sft_model, out)
                       for name, R in selectors.items()}
    for picked in report["picks"].values():
        picked["kl_to_sft"] = best_of_n_kl(config.bon_n)  # the analytic bound, from the SFT model sampled at T = 1
    return report


def _pick_metrics(rows: list[dict], picks: list[int], gold: list[list[float | None]],
                  proxy: list[list[float | None]] | None, sft_model: Path, out: Path) -> dict:
    """The stage table's numbers for one reply per row (``rows[i]["completions"][picks[i]]``, e.g. best-of-N's
    picks): format, accuracy, request following, gold and proxy reward, mean length in tokens (the SFT model's
    tokenizer, end-of-turn left out as in evaluation), and the win-rate under the gold reward against the SFT
    model's greedy reply to the same prompt (``out/samples_sft.jsonl``; ties half)."""
    from posttrain.maths.stats import win_rate
    from posttrain.models import load_tokenizer
    from posttrain.world.gold import follows_format, gold_reward, parse_final_answer
    from posttrain.world.requests import follows_request

    tokenizer = load_tokenizer(sft_model)
    chosen = [(i, j, rows[i]["completions"][j]) for i, j in enumerate(picks) if j >= 0]
    followed = [f for f in (follows_request(rows[i]["prompt"], text) for i, _, text in chosen) if f is not None]
    greedy = _read_samples(out, "sft")
    pairs = [(gold[i][j], gold_reward(greedy[i]["prompt"], greedy[i]["completion"]))
             for i, j, _ in chosen if i < len(greedy)]
    return {"format_rate": mean_or_nan([float(follows_format(text)) for _, _, text in chosen]),
            "accuracy": mean_or_nan([float(parse_final_answer(text) == int(rows[i]["answer"]))
                                     for i, _, text in chosen]),
            "request_rate": mean_or_nan([float(f) for f in followed]),
            "gold_reward": mean_or_nan([gold[i][j] for i, j, _ in chosen]),
            "proxy_reward": None if proxy is None else mean_or_nan([proxy[i][j] for i, j, _ in chosen]),
            "mean_length": mean_or_nan([len(tokenizer(text, add_special_tokens=False).input_ids)
                                        for _, _, text in chosen]),
            "win_rate_vs_sft": win_rate(*zip(*pairs)) if pairs else None}


def _read_samples(out: Path, name: str) -> list[dict]:
    """The greedy held-out replies evaluation wrote for stage ``name`` (``out/samples_{name}.jsonl``)."""
    return [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines() if line.strip()]


KL_PROMPTS, KL_SAMPLES = 100, 4  # a stage's KL to the SFT model: 4 samples on each of 100 held-out prompts


def kl_to_sft(config: DemoConfig, model: Path, sft_model: Path, eval_prompts: list) -> float:
    """A stage's Monte-Carlo KL(pi || pi_SFT) per reply (nats; :func:`policy_kl`), on the first :data:`KL_PROMPTS`
    held-out prompts with :data:`KL_SAMPLES` samples each at T = 1 (every stage sees the same prompts). For a
    stage that samples those prompts at T = 1 anyway, :func:`kl_to_sft_on_samples` measures it on its samples."""
    from posttrain.models.logprobs import policy_kl

    return policy_kl(model, sft_model, eval_prompts[:KL_PROMPTS], n=KL_SAMPLES, max_new_tokens=config.max_new_tokens,
                     device=config.device)


def kl_to_sft_on_samples(sft_model: Path) -> dict:
    """Keyword arguments of ``sampled_gold_and_kl`` that measure :func:`kl_to_sft`'s KL on the first
    :data:`KL_SAMPLES` samples of the first :data:`KL_PROMPTS` prompts a stage's own sampled evaluation draws
    (the same estimator on the same prompts, without drawing 400 more replies)."""
    return {"kl_reference": sft_model, "kl_prompts": KL_PROMPTS, "kl_samples": KL_SAMPLES}


def score_greedy_replies(out: Path, names: list[str], rm_model: Path | None, device: str) -> dict[str, dict]:
    """Per stage in ``names``, from its greedy held-out replies (``samples_{name}.jsonl``): ``proxy_reward``, the
    reward model's mean score (all stages in one batched call; None without an RM), and ``win_rate_vs_sft``, the
    share of prompts where its reply's gold reward beats the SFT model's greedy reply's (ties half)."""
    from posttrain.maths.stats import win_rate
    from posttrain.world.gold import gold_reward

    replies = {name: _read_samples(out, name) for name in names}
    sft_gold = [gold_reward(row["prompt"], row["completion"]) for row in _read_samples(out, "sft")]
    proxy: dict[str, float | None] = dict.fromkeys(names)
    if rm_model is not None:
        from posttrain.rewards import reward_from_spec

        everything = [row for name in names for row in replies[name]]
        scores = reward_from_spec(f"rm:{rm_model}", device=device)(
            [row["prompt"] for row in everything], [row["completion"] for row in everything])
        start = 0
        for name in names:
            proxy[name] = mean_or_nan(scores[start: start + len(replies[name])])
            start += len(replies[name])
    return {name: {"proxy_reward": proxy[name], "win_rate_vs_sft": win_rate(
        [gold_reward(row["prompt"], row["completion"]) for row in replies[name]], sft_gold)} for name in names}


def _rejection_sampling_round(config: DemoConfig, prompts: Path, sft_model: Path, train_samples: Path, out: Path,
                              selector: str, name: str, gold_before: float) -> dict:
    """One round from the SFT model on its shared samples (8 per training prompt): keep each prompt's best by
    ``selector``, SFT on them (``posttrain rs --generations``), then measure the new policy on the held-out prompts
    ``prompts`` (greedy metrics, and the mean gold of 8 samples per prompt against ``gold_before``, the SFT
    model's). Returns ``{"report", "stage"}``."""
    from posttrain.stages.rs import RSConfig, run_rs
    from posttrain.world.evaluate import evaluate_model, load_eval_prompts, sampled_gold_and_kl

    verifier = selector == "verifier:math"
    rs_config = RSConfig(
        model=str(sft_model), generations=str(train_samples), limit=config.rs_prompts, reward=selector,
        min_reward=1.0 if verifier else float("-inf"), out=str(out / name), rounds=1, n=8,
        max_new_tokens=config.max_new_tokens, sft_lr=3e-4, sft_epochs=3.0, backend="hf", device=config.device,
        progress=config.progress)
    _discard_if_config_changed(out / name, rs_config)
    model = run_rs(rs_config)
    done = [json.loads(line) for line in (out / name / "rounds.jsonl").read_text().splitlines()][-1]
    eval_prompts = [row["prompt"] for row in load_eval_prompts(prompts, config.eval_prompts)]
    stage = evaluate_model(model, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens,
                           device=config.device, samples_path=out / f"samples_{name}.jsonl")
    gold_after, kl = sampled_gold_and_kl(model, eval_prompts, n=8, max_new_tokens=config.max_new_tokens, seed=3,
                                         device=config.device, **kl_to_sft_on_samples(sft_model))
    return {
        "report": {"selector": "verifier:math (correct only)" if verifier else "reward model (bt)",
                   "prompts": done["prompts"], "selected": done["selected"], "eval_gold_before": gold_before,
                   "eval_gold_after": mean_or_nan(gold_after)},
        "stage": {**stage, "kl_to_sft": kl}}


def _rm_scores_of_the_rs_round(out: Path, rows: list[dict]) -> list[list[float | None]] | None:
    """The reward matrix the RM-selected rejection-sampling round wrote for ``rows`` (its ``scored.jsonl``), when it
    scored exactly these samples: that round scores the SFT model's shared training samples with the same RM first
    thing in the second process, so DPO reuses its scores instead of computing them again. None otherwise."""
    from posttrain.data.prompts import load_generated

    path = out / "rs_rm" / "round_1" / "scored.jsonl"
    if not path.exists():
        return None
    scored = load_generated(str(path), need_rewards=True)
    if len(scored) < len(rows) or any(s["prompt"] != r["prompt"] or s["completions"] != r["completions"]
                                      for s, r in zip(scored, rows)):
        return None
    return [s["rewards"] for s in scored[: len(rows)]]


def _dpo_stage(config: DemoConfig, paths, sft_model: Path, rows: list[dict], rm_model: Path,
               out: Path) -> tuple[dict, Path]:
    """On-policy DPO from the SFT model: of its 8 samples per training prompt, the best against the worst under the
    math verifier plus the reward model's standardized score (``verifier_plus_standardized``: the verifier checks
    the arithmetic, which the RM cannot; the RM judges the request and style, which the verifier cannot); dpo_nll
    (DPO + NLL on the chosen reply, as RPO), 2 epochs (3 broke the format of 10 % of the greedy replies in one
    of four runs: docs/direct-alignment.md)."""
    from posttrain.data.io import write_jsonl
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.bestofn import reward_matrix, verified_best_worst_rows
    from posttrain.stages.dpo import DPOConfig, train_dpo

    pairs_path = out / "dpo_pairs.jsonl"
    settings = {"model": _identity(sft_model), "rm": _identity(rm_model), "prompts": len(rows),
                "pairs": "verifier_plus_standardized best-worst"}
    settings_path = out / "dpo_pairs.settings.json"
    if not pairs_path.exists() or not settings_path.exists() or json.loads(settings_path.read_text()) != settings:
        _remove(out, DOWNSTREAM["dpo_pairs.jsonl"])
        settings_path.unlink(missing_ok=True)
        scores = _rm_scores_of_the_rs_round(out, rows) or reward_matrix(
            reward_from_spec(f"rm:{rm_model}", device=config.device), rows)
        correct = reward_matrix(reward_from_spec("verifier:math"), rows)
        write_jsonl(verified_best_worst_rows(rows, scores, correct), pairs_path)
        settings_path.write_text(json.dumps(settings))
    n_pairs = len(pairs_path.read_text().splitlines())
    # the implicit reward's accuracy on 500 of the world's held-out pairs (all 2000 cost the stage ~20 s more)
    eval_pairs = out / "dpo_eval_pairs.jsonl"
    heldout = (paths.data / "preference_heldout.jsonl").read_text().splitlines(keepends=True)
    eval_pairs.write_text("".join(heldout[:DPO_EVAL_PAIRS]))
    dpo_config = DPOConfig(
        loss="dpo_nll", model=str(sft_model), data=str(pairs_path), eval_data=str(eval_pairs), out=str(out / "dpo"),
        epochs=2.0, batch_size=16, lr=2e-4, beta=0.1, warmup_steps=10, save_every=100, device=config.device,
        progress=config.progress, resume=True)
    _discard_if_config_changed(out / "dpo", dpo_config)
    model = out / "dpo" / "model" if is_complete(out / "dpo") else train_dpo(dpo_config)
    done = json.loads((model / "complete.json").read_text())
    return {"loss": "dpo_nll", "beta": 0.1, "prompts": len(rows), "pairs": n_pairs, "steps": done["steps"],
            "implicit_reward_accuracy": done["eval"]["rewards/accuracy"],
            "implicit_reward_margin": done["eval"]["rewards/margin"]}, model


def _grpo_stage(config: DemoConfig, paths, sft_model: Path, out: Path, on_step_end=None) -> Path:
    """GRPO with the math verifier from the SFT model (RLVR): 8 training prompts x 8 samples a step, no KL (beta 0,
    as DAPO and Dr. GRPO; the KL to the SFT model is only tracked, for the report's reward-vs-KL plot), token-mean
    loss, DAPO's clip-higher (0.2 / 0.28) and dynamic sampling (groups whose answers are all right or all wrong carry
    no signal and are refilled), lr 1e-4 constant. Returns the model. ``on_step_end``: train_rl's hook."""
    from posttrain.stages.rl import RLConfig, resolve, train_rl

    rl_config = resolve(RLConfig(
        algo="grpo", model=str(sft_model), reward="verifier:math", data=str(paths.data / "rl_train.jsonl"),
        eval_data="", out=str(out / "grpo"), max_steps=config.grpo_steps, batch_size=8, group_size=8, beta=0.0,
        track_kl=True, lr=1e-4, clip_high=0.28, dynamic_sampling=True, loss_aggregation="token_mean",
        max_new_tokens=config.max_new_tokens, save_every=50, device=config.device, progress=config.progress,
        resume=True))
    _discard_if_config_changed(out / "grpo", rl_config)
    return out / "grpo" / "model" if is_complete(out / "grpo") else train_rl(rl_config, on_step_end=on_step_end)


def _ppo_stage(config: DemoConfig, data: Path, prompts: Path, sft_model: Path, rm_model: Path, out: Path) -> dict:
    """PPO (RLHF) from the SFT model against the BT RM with a KL penalty: 16 training prompts x 4 samples a step,
    k1 in the per-token reward at beta 0.2, the critic initialised from the RM, GAE (gamma 1, lambda 0.95), one
    epoch of two minibatches (the second is off-policy by one update, so the clip acts), lr 1e-4; the same RM as
    the over-optimization run, which has no KL penalty. Returns ``{"stage": greedy metrics on the held-out prompts,
    "report": {reward, beta, steps, kl (the last 5 steps' mean per-sequence KL of the rollouts to the SFT model),
    rollout_reward_first, rollout_reward_last (the rollouts' mean RM reward over the first and the last 5 steps: what
    PPO maximises), rm_score_sft, rm_score_ppo (the RM's mean score of each policy's greedy held-out replies)}}``."""
    from posttrain.plumbing.runlog import read_metrics
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.rl import RLConfig, resolve, train_rl
    from posttrain.world.evaluate import evaluate_model, load_eval_prompts

    rl_config = resolve(RLConfig(
        algo="ppo", model=str(sft_model), reward=f"rm:{rm_model}", value_model=str(rm_model),
        data=str(data / "rl_train.jsonl"), eval_data="", out=str(out / "ppo"), max_steps=config.ppo_steps,
        batch_size=16, group_size=4, beta=0.2, lr=1e-4, value_lr=1e-4, ppo_epochs=1, num_minibatches=2,
        max_new_tokens=config.max_new_tokens, save_every=50, device=config.device, progress=config.progress,
        resume=True))
    _discard_if_config_changed(out / "ppo", rl_config)
    model = out / "ppo" / "model" if is_complete(out / "ppo") else train_rl(rl_config)
    stage = evaluate_model(model, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens,
                           device=config.device, samples_path=out / "samples_ppo.jsonl")
    stage["kl_to_sft"] = kl_to_sft(config, model, sft_model,
                                   [row["prompt"] for row in load_eval_prompts(prompts, config.eval_prompts)])
    rm = reward_from_spec(f"rm:{rm_model}", device=config.device)

    def rm_score(name: str) -> float:
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        return mean_or_nan(rm([row["prompt"] for row in rows], [row["completion"] for row in rows]))

    records = read_metrics(out / "ppo")
    kls = [r["policy/kl"] for r in records if isinstance(r.get("policy/kl"), (int, float))]
    rewards = [r["rollout/reward_mean"] for r in records if isinstance(r.get("rollout/reward_mean"), (int, float))]
    return {"stage": stage, "report": {
        "reward": rl_config.reward, "beta": rl_config.beta, "steps": rl_config.max_steps, "kl": mean_or_nan(kls[-5:]),
        "rollout_reward_first": mean_or_nan(rewards[:5]), "rollout_reward_last": mean_or_nan(rewards[-5:]),
        "rm_score_sft": rm_score("sft"), "rm_score_ppo": rm_score("ppo")}}


def over_optimization_curve(records: list[dict], window: int) -> dict:
    """The over-optimization run's proxy (RM) and gold rewards against its KL to the reference, as the demo
    reports them: the steps' metrics (``rollout/reward_mean``, ``rollout/gold_reward``, ``policy/kl``) averaged
    over consecutive windows of ``window`` steps, the last window ending at the last step (one step's rollouts are
    few and noisy), then the peak of the gold curve and its final point.

    Returns ``{"window", "curve": [{"steps": [first, last], "kl", "proxy", "gold"}, ...], "peak_gold",
    "peak_kl", "peak_steps", "final_gold", "final_kl", "first_proxy", "final_proxy", "proxy_rise"}``.
    ``proxy_rise``: the least-squares line of every step's proxy against the step, over the run's span (last step
    minus first): how much the proxy rose, read off all the steps rather than two windows (a window's mean
    of 5 x 64 samples moves by ~0.2 from one to the next; measured over 6 seeds of the demo's run: first to last
    window 0.11-0.72, the fitted rise 0.26-0.98).
    """
    import statistics

    keys = ("policy/kl", "rollout/reward_mean", "rollout/gold_reward")
    rows = [r for r in records if all(isinstance(r.get(key), (int, float)) for key in keys)]
    if window < 1 or len(rows) < window:
        raise ValueError(f"over-optimization curve: {len(rows)} logged steps with {', '.join(keys)}, fewer than "
                         f"one window of {window}")
    curve = []
    for start in range(len(rows) % window, len(rows), window):
        chunk = rows[start: start + window]
        curve.append({"steps": [chunk[0]["step"], chunk[-1]["step"]],
                      "kl": mean_or_nan([r["policy/kl"] for r in chunk]),
                      "proxy": mean_or_nan([r["rollout/reward_mean"] for r in chunk]),
                      "gold": mean_or_nan([r["rollout/gold_reward"] for r in chunk])})
    peak = max(curve, key=lambda point: point["gold"])
    steps = [r["step"] for r in rows]
    rise = (statistics.linear_regression(steps, [r["rollout/reward_mean"] for r in rows]).slope
            * (steps[-1] - steps[0]) if len(set(steps)) > 1 else 0.0)
    return {"window": window, "curve": curve, "peak_gold": peak["gold"], "peak_kl": peak["kl"],
            "peak_steps": peak["steps"], "final_gold": curve[-1]["gold"], "final_kl": curve[-1]["kl"],
            "first_proxy": curve[0]["proxy"], "final_proxy": curve[-1]["proxy"], "proxy_rise": rise}


OVEROPT_WINDOW = 5


def _over_optimization_stage(config: DemoConfig, data: Path, sft_model: Path, rm_model: Path, out: Path) -> dict:
    """The book's over-optimization curve, measured: GRPO from the SFT model against the length-biased BT RM alone
    at beta 0 (the reference loaded only to measure the KL: ``track_kl``), 8 prompts x 8 samples a step, lr 2e-4
    (at 1e-4 the gold fell 0.14 from its peak in 40 steps in one run of two: the proxy and the gold part later);
    :func:`over_optimization_curve` of its rollouts, and the plot ``plots/reward_vs_kl.png`` of its run."""
    from posttrain.plumbing.runlog import read_metrics
    from posttrain.stages.rl import RLConfig, resolve, train_rl

    rl_config = resolve(RLConfig(
        algo="grpo", model=str(sft_model), reward=f"rm:{rm_model}", data=str(data / "rl_train.jsonl"), eval_data="",
        out=str(out / "overopt"), max_steps=config.overopt_steps, batch_size=8, group_size=8, beta=0.0,
        track_kl=True, lr=2e-4, loss_aggregation="token_mean", max_new_tokens=config.max_new_tokens, save_every=50,
        device=config.device, progress=config.progress, resume=True))
    _discard_if_config_changed(out / "overopt", rl_config)
    if not is_complete(out / "overopt"):
        train_rl(rl_config)
    return {"reward": rl_config.reward, "beta": 0.0, "steps": rl_config.max_steps,
            **over_optimization_curve(read_metrics(out / "overopt"), OVEROPT_WINDOW),
            "plot": str(out / "overopt" / "plots" / "reward_vs_kl.png")}


def sampled_accuracy(rows: list[dict], completions: list[list[str]]) -> float:
    """The share of sampled replies whose final answer is right, over every prompt's samples."""
    from posttrain.world.gold import parse_final_answer

    return mean_or_nan([float(parse_final_answer(c) == int(row["answer"]))
                        for row, samples in zip(rows, completions) for c in samples])


SIDE_REPORT = "reward_model_stages.json"  # what _with_the_reward_model reports
DPO_EVAL_PAIRS = 500


def _with_the_reward_model(config: DemoConfig, data: Path, prompts: Path, sft_model: Path, rm_model: Path,
                           train_samples: Path, out: Path, sft_gold: float) -> None:
    """What follows the reward model, run beside PPO, DPO and best-of-N in a :class:`_Background` process: the
    RM-selected rejection-sampling round (on the SFT model's shared training samples ``train_samples``), the RM
    scored against the gold reward on the world's held-out pairs and rankings, and the over-optimization run.
    Written to ``out/SIDE_REPORT`` as ``{"rs_rm", "reward_model", "over_optimization"}`` (those that ran)."""
    from posttrain.rewards import ScalarRewardModel
    from posttrain.world.evaluate import evaluate_reward_on_world

    side: dict = {}
    if config.rs_prompts:  # first: DPO reuses its RM scores (_rm_scores_of_the_rs_round)
        side["rs_rm"] = _rejection_sampling_round(config, prompts, sft_model, train_samples, out,
                                                  f"rm:{rm_model}", "rs_rm", sft_gold)
    side["reward_model"] = {"loss": "bt", "model": str(rm_model), **evaluate_reward_on_world(
        ScalarRewardModel(rm_model, device=config.device), data)}
    if config.overopt_steps:
        side["over_optimization"] = _over_optimization_stage(config, data, sft_model, rm_model, out)
    (out / SIDE_REPORT).write_text(json.dumps(side))


def demo_sft_config(config: DemoConfig, paths, out: Path):
    """The demo's SFT run on the tiny world (also used by tests that need the same SFT model without the demo)."""
    from posttrain.stages.sft import SFTConfig

    return SFTConfig(
        model=str(paths.base_model), data=str(paths.data / "sft_train.jsonl"),
        eval_data=str(paths.data / "sft_heldout.jsonl"), out=str(out), max_steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, warmup_steps=10, save_every=50, log_every=5,
        device=config.device, progress=config.progress, resume=True,
    )


def train_demo_sft(config: DemoConfig, paths, out: Path) -> Path:
    """The demo's SFT run (``demo_sft_config``) into ``out``; returns its model directory. On a CPU with
    ``sft_processes`` > 1 (and as many cores) it runs data-parallel under ``torchrun``, one thread per process (the
    global batch, the order of the examples and the losses are those of one process: tests/test_distributed.py):
    the tiny model's kernels barely use a second thread, a second process does. Else in this process.

    Ctrl-C reaches torchrun too (same process group), which stops its workers; a SIGTERM to this process is passed
    on to it. Either way the run keeps its last checkpoint and the next demo resumes it."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from posttrain.models.loading import resolve_device
    from posttrain.plumbing.config import save_config
    from posttrain.plumbing.distributed import launched_world_size
    from posttrain.stages.sft import train_sft

    sft_config = demo_sft_config(config, paths, out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = min(config.sft_processes, cores)
    if (processes < 2 or config.sft_batch_size % processes or launched_world_size() > 1
            or resolve_device(config.device).type != "cpu"):
        return train_sft(sft_config)
    with tempfile.TemporaryDirectory() as scratch:
        options = Path(scratch) / "sft.yaml"
        save_config(sft_config, options)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "posttrain.cli", "sft", f"--config={options}"]
        child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        terminated = []

        def pass_on(signum, frame):
            terminated.append(signum)
            child.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, pass_on) if _main_thread() else None
        try:
            code = child.wait()
        except BaseException:  # Ctrl-C: torchrun got it too and stops its workers; give it the time to
            _stop(child)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise SystemExit(128 + terminated[0])
    if code != 0 or not is_complete(out):
        raise ChildProcessError(f"the demo's SFT run under torchrun ({processes} processes) failed with exit code "
                                f"{code}; its output is above (--sft_processes=1 trains in this process)")
    return out / "model"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop(child, grace_s: float = 60.0) -> None:
    """Wait for a child that was told to stop; terminate it, then kill it, if it does not."""
    import subprocess

    for action in (None, child.terminate, child.kill):
        if action is not None:
            action()
        try:
            child.wait(timeout=grace_s if action is None else 30)
            return
        except subprocess.TimeoutExpired:
            continue


def run_demo(config: DemoConfig) -> dict:
    from posttrain.stages import world as build
    from posttrain.world.evaluate import evaluate_model

    from posttrain.stages.report import write_report

    out = Path(config.out)
    if config.report_only:
        summary = json.loads((out / "summary.json").read_text())
        print(f"report: {write_report(out, summary)[0]}")
        return summary
    out.mkdir(parents=True, exist_ok=True)
    timed = StageClock(echo=True)
    stage_seconds = timed.seconds

    stage_count = (3 + bool(config.rm_steps) + bool(config.bon_n) + bool(config.rs_prompts)
                   + bool(config.dpo_prompts and config.rm_steps) + bool(config.grpo_steps)
                   + bool(config.ppo_steps and config.rm_steps) + bool(config.overopt_steps and config.rm_steps))
    print(f"[1/{stage_count}] tiny world: tokenizer, datasets, base model (cached after the first run)")
    paths = build.ensure_world(base_model=True, progress=config.progress)
    timed("world")
    prompts = paths.data / "rl_heldout.jsonl"
    from posttrain.world.gold import gold_reward

    evaluate = lambda model_dir, name: evaluate_model(  # noqa: E731
        model_dir, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens, device=config.device,
        samples_path=out / f"samples_{name}.jsonl")
    stages: dict[str, dict[str, float]] = {}

    print(f"[2/{stage_count}] evaluating the base model")
    stages["base"] = evaluate(paths.base_model, "base")
    stages["base"]["kl_to_sft"] = None  # the base model never saw the chat format: its KL to SFT is not a budget
    timed("base evaluation")

    print(f"[3/{stage_count}] SFT ({config.sft_steps} steps)")
    sft_dir = out / "sft"
    sft_config = demo_sft_config(config, paths, sft_dir)
    _discard_if_config_changed(sft_dir, sft_config)
    if is_complete(sft_dir):
        sft_model = sft_dir / "model"
    else:
        _remove(out, DOWNSTREAM["sft"])
        sft_model = train_demo_sft(config, paths, sft_dir)

    summary = {"stages": stages}
    stage = 3
    rm_config = _reward_model_config(config, paths, sft_model, out)
    rm_job = side_job = None
    rm_model = Path(rm_config.out) / "model" if config.rm_steps else None

    def start_the_side_job_once_the_rm_is_trained(*_) -> None:
        """Start the side process (the RM-selected rejection-sampling round, the RM's evaluation, the
        over-optimization run) as soon as the reward model is trained and the SFT samples are drawn: called after
        the samples, after every GRPO step (the RM usually finishes during GRPO, and its core is free from then on)
        and after GRPO."""
        nonlocal rm_job, side_job, stage
        if side_job is not None or rm_model is None or (rm_job is not None and rm_job.process.is_alive()):
            return
        if rm_job is not None:
            rm_job.join()  # finished: restores this process's threads (raises if the training failed)
            rm_job = None
        if config.overopt_steps:
            stage += 1
            print(f"[{stage}/{stage_count}] over-optimization: GRPO against the reward model alone at beta 0 "
                  f"({config.overopt_steps} steps of 8 prompts x 8 samples), proxy and gold reward against the KL; "
                  "with the RM-selected rejection-sampling round and the RM's evaluation, in a second process")
        (out / SIDE_REPORT).unlink(missing_ok=True)
        side_job = _Background("RM-selected rejection sampling, reward model's evaluation and the "
                               "over-optimization run", out,
                               _with_the_reward_model, dataclasses.replace(config, progress=False), paths.data,
                               prompts, sft_model, rm_model, train_samples, out, sft_gold)

    if config.rm_steps:
        _discard_if_config_changed(out / "rm", rm_config)
        if not is_complete(out / "rm"):
            _remove(out, DOWNSTREAM["rm"])
            rm_job = _Background("reward model's training", out / "rm", _train_rm, rm_config)
    rm_trained_here = rm_job is not None
    try:
        stages["sft"] = {**evaluate(sft_model, "sft"), "kl_to_sft": 0.0}
        timed("sft")
        if config.rm_steps:
            stage += 1
            print(f"[{stage}/{stage_count}] Bradley-Terry reward model from the SFT model ({config.rm_steps} steps), "
                  "trained in a second process while the SFT model's samples are drawn and the verifier selects")
        # The SFT model's samples, made once: held-out ones serve best-of-N and the sampled gold reward that
        # rejection sampling and DPO are measured against; training ones are what rejection sampling selects from and
        # DPO pairs.
        from posttrain.world.evaluate import load_eval_prompts, sampled_gold_and_kl

        eval_prompts = [row["prompt"] for row in load_eval_prompts(prompts, config.eval_prompts)]
        heldout_n = max(config.bon_n, config.dpo_eval_samples, 1)
        heldout_samples = out / "sft_samples_heldout.jsonl"
        heldout_rows = _sft_samples(config, prompts, sft_model, heldout_samples,
                                    limit=0 if 0 in (config.eval_prompts, config.bon_prompts) else max(
                                        config.eval_prompts, config.bon_prompts), n=heldout_n, seed=2)

        def sft_expected_gold(n: int | None = None) -> list[float]:
            """The SFT policy's expected gold per held-out prompt: the mean over its first ``n`` shared samples."""
            return [mean_or_nan([gold_reward(row["prompt"], c) for c in row["completions"][:n]])
                    for row in heldout_rows[: config.eval_prompts or None]]

        sft_gold = mean_or_nan(sft_expected_gold())
        evaluated = heldout_rows[: config.eval_prompts or None]
        stages["sft"]["sampled_accuracy"] = sampled_accuracy(
            evaluated, [row["completions"][: config.sampled_eval_n] for row in evaluated])
        train_samples = out / "sft_samples_train.jsonl"
        train_rows = []
        if config.rs_prompts or config.dpo_prompts:
            train_rows = _sft_samples(config, paths.data / "rl_train.jsonl", sft_model, train_samples,
                                      limit=max(config.rs_prompts, config.dpo_prompts), n=8, seed=1)
        timed("sft samples")
        start_the_side_job_once_the_rm_is_trained()  # a cached RM: at once

        def record_round(name: str, result: dict) -> None:
            summary.setdefault("rejection_sampling", {})[name] = result["report"]
            stages["rs" if name == "verifier" else f"rs_{name}"] = result["stage"]

        if config.rs_prompts:
            stage += 1
            print(f"[{stage}/{stage_count}] rejection-sampling fine-tuning, one round each selected by the verifier "
                  f"and by the reward model ({config.rs_prompts} prompts)")
            record_round("verifier", _rejection_sampling_round(config, prompts, sft_model, train_samples, out,
                                                               "verifier:math", "rs", sft_gold))
            timed("rejection sampling (verifier)")
        if config.grpo_steps:
            stage += 1
            print(f"[{stage}/{stage_count}] GRPO with the math verifier from the SFT model ({config.grpo_steps} steps "
                  "of 8 prompts x 8 samples; dynamic sampling, clip-higher)")
            grpo_model = _grpo_stage(config, paths, sft_model, out,
                                     on_step_end=start_the_side_job_once_the_rm_is_trained)
            sampled = evaluate_model(  # 4 samples per prompt at T = 1: sampled accuracy, and the KL on them
                grpo_model, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens,
                device=config.device, temperature=1.0, n=config.sampled_eval_n, seed=5, kl_reference=sft_model,
                kl_prompts=KL_PROMPTS)
            stages["grpo"] = {**evaluate(grpo_model, "grpo"), "sampled_accuracy": sampled["accuracy"],
                              "kl_to_sft": sampled["kl_to_reference"]}  # over --sampled_eval_n samples per prompt
            timed("grpo (verifier)")
        if rm_trained_here:  # 0 s when it finished during GRPO
            if rm_job is not None:
                rm_job.join()
                rm_job = None
            timed("reward model (rest of its training)")
        start_the_side_job_once_the_rm_is_trained()
    except BaseException:
        for job in (rm_job, side_job):
            if job is not None:
                job.cancel()
        raise
    try:
        if config.ppo_steps and rm_model is not None:
            stage += 1
            print(f"[{stage}/{stage_count}] PPO (RLHF) from the SFT model against the reward model, KL-penalised "
                  f"(beta 0.2; {config.ppo_steps} steps of 16 prompts x 4 samples)")
            ppo = _ppo_stage(config, paths.data, prompts, sft_model, rm_model, out)
            stages["ppo"], summary["ppo"] = ppo["stage"], ppo["report"]
            timed("ppo")
        if config.dpo_prompts and rm_model is not None:
            from posttrain.maths.stats import win_rate

            stage += 1
            print(f"[{stage}/{stage_count}] on-policy DPO from the SFT model ({config.dpo_prompts} prompts x 8 "
                  f"samples; pairs: best vs worst under the verifier plus the standardized reward model)")
            summary["dpo"], dpo_model = _dpo_stage(config, paths, sft_model, train_rows[: config.dpo_prompts],
                                                   rm_model, out)
            stages["dpo"] = evaluate(dpo_model, "dpo")
            dpo_gold, dpo_kl = sampled_gold_and_kl(dpo_model, eval_prompts, n=config.dpo_eval_samples,
                                                   max_new_tokens=config.max_new_tokens, seed=4,
                                                   device=config.device, **kl_to_sft_on_samples(sft_model))
            sft_gold_n = sft_expected_gold(config.dpo_eval_samples)
            summary["dpo"].update(
                win_rate_vs_sft=win_rate(dpo_gold, sft_gold_n), sampled_gold_dpo=mean_or_nan(dpo_gold),
                sampled_gold_sft=mean_or_nan(sft_gold_n), kl_to_reference=dpo_kl)
            stages["dpo"]["kl_to_sft"] = summary["dpo"]["kl_to_reference"]
            timed("dpo")
        if config.bon_n:
            stage += 1
            print(f"[{stage}/{stage_count}] best-of-{config.bon_n} on {config.bon_prompts} held-out prompts")
            summary["best_of_n"] = _best_of_n_stage(config, heldout_rows, rm_model, sft_model, out)
            timed("best-of-n")
        scored = {}
        if side_job is not None:  # while the side process finishes: the stages evaluated so far
            scored = score_greedy_replies(out, list(stages), rm_model, config.device)
            side_job.join()
            side = json.loads((out / SIDE_REPORT).read_text())
            summary.update({key: side[key] for key in ("reward_model",) if key in side})
            if "rs_rm" in side:
                record_round("rm", side["rs_rm"])
            if "over_optimization" in side:
                summary["over_optimization"] = side["over_optimization"]
            timed("rejection sampling (reward model), reward model evaluation, over-optimization")
    except BaseException:
        if side_job is not None:
            side_job.cancel()
        raise
    summary["stages"] = {name: stages[name] for name in ("base", "sft", "rs", "rs_rm", "dpo", "grpo", "ppo")
                         if name in stages}
    rest = [name for name in summary["stages"] if name not in scored]  # rs_rm (the side process's), or all
    scored.update(score_greedy_replies(out, rest, rm_model, config.device) if rest else {})
    for name, numbers in scored.items():
        summary["stages"][name].update(numbers)
    timed("proxy reward and win-rates of the greedy replies")
    summary.update(world=str(paths.data.parent), base_model=str(paths.base_model),
                   seconds=timed.total(), stage_seconds=stage_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    html_path, _ = write_report(out, summary)
    print()
    print(format_table(summary["stages"]))
    if rm := summary.get("reward_model"):
        print(f"\nreward model (bt), held-out pairs against the gold reward: all {rm['pair_accuracy']:.3f}; request "
              f"{rm['pair_accuracy_request']:.3f} (preferred reply shorter: {rm['pair_accuracy_request_shorter']:.3f}; "
              f"unseen phrasings: {rm['pair_accuracy_request_unseen_phrasing']:.3f}); surface "
              f"{rm['pair_accuracy_surface']:.3f}; answer check {rm['pair_accuracy_answer_check']:.3f}; near ties "
              f"{rm['pair_accuracy_near_tie']:.3f}; counterfactual flips {rm['counterfactual_flip_rate']:.3f}; "
              f"length correlation {rm['length_correlation']:+.3f}")
    if bon := summary.get("best_of_n"):
        picks = ", ".join(f"{name[:-10].replace('_', ' ')} picks {value:.3f}" for name, value in bon.items()
                          if name.endswith("_pick_gold"))
        rates = ", ".join(f"{name[:-18].replace('_', ' ')} picks {value:.3f}" for name, value in bon.items()
                          if name.endswith("_pick_request_rate"))
        print(f"best-of-{bon['n']} (held-out, T=1): gold of single samples {bon['single_gold']:.3f}; {picks}; "
              f"request rate of single samples {bon['single_request_rate']:.3f}; {rates}; "
              f"pass@{bon['n']} {bon['pass_at_n']:.3f}")
    for name, rs in summary.get("rejection_sampling", {}).items():
        print(f"rejection sampling, 1 round selected by the {rs['selector']} ({rs['selected']} samples): held-out "
              f"gold of the policy's samples {rs['eval_gold_before']:.3f} -> {rs['eval_gold_after']:.3f}")
    if dpo := summary.get("dpo"):
        print(f"on-policy DPO ({dpo['loss']}, {dpo['pairs']} pairs, {dpo['steps']} steps, beta {dpo['beta']}): "
              f"win-rate vs SFT under the gold reward {dpo['win_rate_vs_sft']:.3f} of held-out prompts (expected "
              f"gold from {config.dpo_eval_samples} samples each; ties half), sampled gold "
              f"{dpo['sampled_gold_sft']:.3f} -> "
              f"{dpo['sampled_gold_dpo']:.3f}, KL to the SFT reference {dpo['kl_to_reference']:.3f} nats, held-out "
              f"implicit-reward pair accuracy {dpo['implicit_reward_accuracy']:.3f}")
    if grpo := summary["stages"].get("grpo"):
        sft = summary["stages"]["sft"]
        print(f"GRPO with the math verifier ({config.grpo_steps} steps): held-out accuracy greedy "
              f"{sft['accuracy']:.3f} -> {grpo['accuracy']:.3f}, sampled (T=1) {sft['sampled_accuracy']:.3f} -> "
              f"{grpo['sampled_accuracy']:.3f}")
    if ppo := summary.get("ppo"):
        sft, stage_ppo = summary["stages"]["sft"], summary["stages"]["ppo"]
        print(f"PPO against {ppo['reward']} ({ppo['steps']} steps, beta {ppo['beta']}): the rollouts' RM reward "
              f"{ppo['rollout_reward_first']:.3f} -> {ppo['rollout_reward_last']:.3f} (first and last 5 steps); "
              f"held-out gold {sft['gold_reward']:.3f} -> {stage_ppo['gold_reward']:.3f}, request rate "
              f"{sft['request_rate']:.3f} -> "
              f"{stage_ppo['request_rate']:.3f}, accuracy {sft['accuracy']:.3f} -> {stage_ppo['accuracy']:.3f}; the "
              f"RM's score of the greedy replies {ppo['rm_score_sft']:.3f} -> {ppo['rm_score_ppo']:.3f}; KL to the "
              f"SFT model {ppo['kl']:.2f} nats")
    if over := summary.get("over_optimization"):
        print(f"over-optimization (GRPO at beta 0 against the RM alone, {over['steps']} steps): proxy reward "
              f"{over['first_proxy']:.3f} -> {over['final_proxy']:.3f} (fitted rise {over['proxy_rise']:+.3f}); gold {over['curve'][0]['gold']:.3f} -> peak "
              f"{over['peak_gold']:.3f} at KL {over['peak_kl']:.2f} -> {over['final_gold']:.3f} at KL "
              f"{over['final_kl']:.2f} nats ({over['plot']})")
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stage_seconds.items())
    print(f"\nsummary: {out / 'summary.json'}   ({summary['seconds']:.0f} s: {times})")
    print(f"report: {html_path} (and report.md beside it)")
    return summary
