"""Rejection-sampling fine-tuning: ``posttrain rs`` (RLHF book, rejection sampling).

For each round r = 1..R, starting from the previous round's model:

  1. generate  N completions for every training prompt           out/round_r/generations.jsonl
  2. score     the reward matrix R with the chosen reward          out/round_r/scored.jsonl
  3. select    top_per_prompt (best per prompt) or top_k (K best)  out/round_r/selected.jsonl
  4. SFT       on the selected completions                         out/round_r/sft/ (model in sft/model)
  5. log       mean reward of the samples and of the selection (and, with --eval_prompts, of the new policy's
               samples on held-out prompts) to out/rounds.jsonl

A finished round is skipped when the command is run again, so an interrupted run resumes at the round it was in
(and SFT itself resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from posttrain.data.io import write_jsonl
from posttrain.data.prompts import load_generated, load_prompt_rows
from posttrain.models.generation import SamplingParams, load_engine
from posttrain.plumbing.config import SamplingConfig, option, progress_option, save_config, stage_config
from posttrain.plumbing.harness import is_complete
from posttrain.stages.bestofn import REWARD_SPEC_HELP, reward_matrix, sample, sampling_params, select_rows


@stage_config
class RSConfig(SamplingConfig):
    reward: str = option("gold", "the selector: " + REWARD_SPEC_HELP)
    generations: str = option("", "round 1 scores these completions of --model instead of sampling (a `posttrain "
                                  "generate` file, e.g. shared by two selectors; --limit applies); empty = sample")
    out: str = option("runs/rs", "run directory: round_1/, round_2/, ... and rounds.jsonl")
    rounds: int = option(1, "rejection-sampling rounds (round r samples with seed + r)", minimum=1)
    strategy: str = option("top_per_prompt", "top_per_prompt | top_k", choices=("top_per_prompt", "top_k"))
    k: int = option(0, "top_k: completions kept per round")
    min_reward: float = option(float("-inf"), "drop picks below this reward (e.g. 1 with verifier:math: only correct "
                                             "completions, as in RFT / STaR)", minimum=None, finite=False)
    sft_epochs: float = option(2.0, "SFT passes over each round's selection", above=0)
    sft_lr: float = option(1e-4, "SFT peak learning rate")
    sft_batch_size: int = option(16, "SFT examples per step", minimum=1)
    eval_prompts: str = option("", "held-out prompts: after each round, the mean --eval_reward of the policy's samples")
    eval_reward: str = option("", "reward for --eval_prompts; empty = --reward")
    eval_n: int = option(4, "samples per held-out prompt", minimum=1)
    deterministic: bool = option(False, "each round's SFT in deterministic mode (see `posttrain sft --help`)")
    eval_limit: int = option(200, "held-out prompts used; 0 = all")
    progress: bool = progress_option()
    n: int = 8
    max_new_tokens: int = 64


def policy_reward(model: str | Path, prompt_rows, reward, params: SamplingParams, config: RSConfig) -> float:
    """Mean reward of the policy's samples on ``prompt_rows`` (the quantity rejection sampling improves)."""
    engine = load_engine(model, backend=config.backend, device=config.device, chat_template=config.chat_template,
                         batch_size=config.batch_size)
    R = reward_matrix(reward, sample(engine, prompt_rows, params))
    values = [x for row in R for x in row if x is not None]
    return statistics.mean(values) if values else float("nan")


def run_rs(config: RSConfig) -> Path:
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.sft import SFTConfig, train_sft

    if not config.model or not (config.prompts or config.generations):
        raise ValueError("posttrain rs needs --model=DIR and --prompts=FILE (or --generations=FILE)")
    if not config.prompts and config.rounds > 1:
        raise ValueError("posttrain rs: rounds after the first sample --prompts=FILE; give it with --rounds > 1")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").exists():
        save_config(config, out / "config.yaml")
    reward = reward_from_spec(config.reward, device=config.device)
    prompt_rows = load_prompt_rows(config.prompts, columns=config.columns, skip_invalid=config.skip_invalid,
                                   limit=config.limit) if config.prompts else []
    eval_rows, eval_reward = None, None
    if config.eval_prompts:
        eval_rows = load_prompt_rows(config.eval_prompts, columns=config.columns, skip_invalid=config.skip_invalid,
                                     limit=config.eval_limit)
        eval_reward = reward_from_spec(config.eval_reward, device=config.device) if config.eval_reward else reward
    # held-out samples come from the same sampling settings as training's (top_k and min_p included)
    eval_params = dataclasses.replace(sampling_params(config), n=config.eval_n, seed=10_000 + config.seed)
    log_path = out / "rounds.jsonl"
    done = {r["round"]: r for r in map(json.loads, log_path.read_text().splitlines())} if log_path.exists() else {}

    policy = Path(config.model)
    if eval_rows is not None and 0 not in done:
        record = {"round": 0, "model": str(policy),
                  "eval_reward": policy_reward(policy, eval_rows, eval_reward, eval_params, config)}
        _append(log_path, record)
        print(f"round 0 (start): held-out {config.eval_reward or config.reward} {record['eval_reward']:.4f}")
    for r in range(1, config.rounds + 1):
        round_dir = out / f"round_{r}"
        sft_dir = round_dir / "sft"
        if r in done and done[r]["selected"] == 0:  # nothing passed: the policy stayed as it was
            continue
        if r in done and is_complete(sft_dir):
            policy = sft_dir / "model"
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        params = sampling_params(config)
        params.seed = config.seed + r
        scored_path = round_dir / "scored.jsonl"
        if not scored_path.exists():
            if r == 1 and config.generations:
                rows = load_generated(config.generations)
                rows = rows[: config.limit] if config.limit else rows
                for row in rows:
                    row.pop("rewards", None)
            else:
                engine = load_engine(policy, backend=config.backend, device=config.device,
                                     chat_template=config.chat_template, batch_size=config.batch_size)
                rows = sample(engine, prompt_rows, params)
                del engine
            write_jsonl(rows, round_dir / "generations.jsonl")
            for row, rewards in zip(rows, reward_matrix(reward, rows)):
                row["rewards"] = rewards
            write_jsonl(rows, scored_path)
        rows = load_generated(str(scored_path), need_rewards=True)
        selected = select_rows(rows, config.strategy, config.k, min_reward=config.min_reward)
        write_jsonl(selected, round_dir / "selected.jsonl")
        samples = [x for row in rows for x in row["rewards"] if x is not None]
        if not selected:  # e.g. no sample reached --min_reward: nothing to train on, the policy stays
            record = {"round": r, "model": str(policy), "prompts": len(rows), "selected": 0,
                      "sample_reward": statistics.mean(samples) if samples else float("nan"),
                      "selected_reward": float("nan"), "sft_steps": 0}
            if eval_rows is not None:
                record["eval_reward"] = policy_reward(policy, eval_rows, eval_reward, eval_params, config)
            _append(log_path, record)
            print(f"round {r}: no sample selected (min_reward {config.min_reward}); the policy is unchanged")
            continue
        steps = max(1, round(config.sft_epochs * len(selected) / config.sft_batch_size))
        sft_model = train_sft(SFTConfig(
            model=str(policy), data=str(round_dir / "selected.jsonl"), out=str(sft_dir), max_steps=steps,
            batch_size=config.sft_batch_size, lr=config.sft_lr, warmup_steps=min(10, steps // 10),
            chat_template=config.chat_template, strategy="final_turn_only", save_every=50, device=config.device,
            progress=config.progress, resume=True, log_every=5, deterministic=config.deterministic))
        record = {"round": r, "model": str(sft_model), "prompts": len(rows), "selected": len(selected),
                  "sample_reward": statistics.mean(samples) if samples else float("nan"),
                  "selected_reward": statistics.mean(s["reward"] for s in selected) if selected else float("nan"),
                  "sft_steps": steps}
        if eval_rows is not None:
            record["eval_reward"] = policy_reward(sft_model, eval_rows, eval_reward, eval_params, config)
        _append(log_path, record)
        print(f"round {r}: samples {record['sample_reward']:.4f} -> selected {record['selected_reward']:.4f}"
              + (f"; held-out policy {record['eval_reward']:.4f}" if "eval_reward" in record else ""))
        policy = sft_model
    return policy


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
