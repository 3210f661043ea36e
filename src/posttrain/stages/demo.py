"""``posttrain demo``: the pipeline tour on the tiny world, offline, on a CPU, in minutes.

Stages so far: build the world (cached) -> pretrain the base model (cached) -> SFT -> evaluate both on held-out
prompts against the gold reward -> a Bradley-Terry reward model from the SFT model, measured against the gold
preferences -> best-of-N on held-out prompts with the RM and with a verifier -> one round of rejection-sampling
fine-tuning (verifier-selected samples, SFT) from the SFT model -> on-policy DPO from the SFT model on pairs of its
own replies labelled by the gold reward (win-rate against the SFT model under the gold reward, KL to it). Every
stage's run directory lives under ``--out``; ``summary.json`` holds ``{"stages": {"base": {...}, "sft": {...},
"rs": {...}, "dpo": {...}}, "reward_model": {...}, "best_of_n": {...}, "rejection_sampling": {...}, "dpo": {...}}``:
per policy format_rate, accuracy, gold_reward, mean_length, stop_rate (greedy); for the RM held-out pair accuracy,
top-1 selection and length correlation; for best-of-N the gold reward of single samples and of each selector's
picks; for rejection sampling the held-out gold reward of the policy's samples before and after the round; for DPO
the win-rate against SFT (per-prompt expected gold from samples, and greedy), the mean sampled gold of both, the KL
to the SFT model and the implicit-reward pair accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.maths.stats import mean_or_nan
from posttrain.plumbing.config import config_to_dict, device_option, option, progress_option
from posttrain.plumbing.harness import is_complete

METRICS = ("format_rate", "accuracy", "gold_reward", "mean_length", "stop_rate")


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "directory for every stage's run directory and summary.json")
    sft_steps: int = option(150, "SFT optimizer steps")
    sft_batch_size: int = option(16, "SFT conversations per step")
    sft_lr: float = option(1e-3, "SFT peak learning rate")
    rm_steps: int = option(250, "Bradley-Terry reward-model optimizer steps (16 pairs each; 250 = one epoch of the "
                                "world's preference pairs); 0 = skip the RM stage")
    bon_n: int = option(16, "best-of-N: samples per held-out prompt; 0 = skip the stage")
    bon_prompts: int = option(100, "best-of-N: held-out prompts")
    rs_prompts: int = option(600, "rejection sampling: training prompts sampled (8 samples each); 0 = skip the stage")
    dpo_prompts: int = option(2000, "on-policy DPO: training prompts sampled from the SFT model (8 replies each, "
                                    "gold-labelled, up to 4 pairs per prompt); 0 = skip the stage")
    dpo_eval_samples: int = option(32, "DPO win-rate: samples per held-out prompt for each policy's expected gold")
    eval_prompts: int = option(200, "held-out prompts to evaluate each stage on")
    max_new_tokens: int = option(48, "generation budget per reply")
    device: str = device_option()
    progress: bool = progress_option()


def format_table(stages: dict[str, dict[str, float]]) -> str:
    header = f"{'stage':<8}" + "".join(f"{m:>13}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for name, metrics in stages.items():
        lines.append(f"{name:<8}" + "".join(f"{metrics[m]:>13.3f}" for m in METRICS))
    return "\n".join(lines)


def _discard_if_config_changed(run_dir: Path, config) -> None:
    """Reuse (or resume) a stage run only if it was made with the same settings; otherwise start it afresh."""
    import shutil

    saved = run_dir / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != config_to_dict(config):
        print(f"{run_dir}: settings changed since the last demo, retraining this stage")
        shutil.rmtree(run_dir)


def _reward_model_stage(config: DemoConfig, paths, sft_model: Path, out: Path) -> dict:
    from posttrain.rewards import ScalarRewardModel
    from posttrain.stages.rm import RMConfig, train_rm
    from posttrain.world.evaluate import evaluate_reward_on_world

    rm_dir = out / "rm"
    rm_config = RMConfig(
        loss="bt", model=str(sft_model), data=str(paths.data / "preference_train.jsonl"),
        eval_data=str(paths.data / "preference_heldout.jsonl"), out=str(rm_dir), max_steps=config.rm_steps,
        batch_size=16, lr=3e-4, save_every=100, device=config.device, progress=config.progress, resume=True,
    )
    _discard_if_config_changed(rm_dir, rm_config)
    rm_model = rm_dir / "model" if is_complete(rm_dir) else train_rm(rm_config)
    report = evaluate_reward_on_world(ScalarRewardModel(rm_model, device=config.device), paths.data)
    return {"loss": "bt", "model": str(rm_model), **report}


def _best_of_n_stage(config: DemoConfig, paths, sft_model: Path, rm_model: Path | None) -> dict:
    """Sample N per held-out prompt once; pick by the BT RM and by the math verifier; report the picks' gold."""
    from posttrain.data.prompts import load_prompt_rows
    from posttrain.maths.selection import pass_at_k, select_top_per_prompt
    from posttrain.models.generation import SamplingParams, load_engine
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.bestofn import reward_matrix, sample

    prompt_rows = load_prompt_rows(str(paths.data / "rl_heldout.jsonl"), limit=config.bon_prompts)
    engine = load_engine(sft_model, backend="hf", device=config.device)
    params = SamplingParams(n=config.bon_n, max_new_tokens=config.max_new_tokens, temperature=1.0, seed=0)
    rows = sample(engine, prompt_rows, params)
    gold = reward_matrix(reward_from_spec("gold"), rows)
    correct = reward_matrix(reward_from_spec("verifier:math"), rows)
    selectors = {"verifier": correct}
    if rm_model is not None:
        selectors["reward_model"] = reward_matrix(reward_from_spec(f"rm:{rm_model}", device=config.device), rows)
    report = {"n": config.bon_n, "prompts": len(rows), "single_gold": mean_or_nan([g for row in gold for g in row]),
              "pass_at_n": mean_or_nan([pass_at_k(config.bon_n, int(sum(c)), config.bon_n) for c in correct])}
    for name, R in selectors.items():
        report[f"{name}_pick_gold"] = mean_or_nan([gold[i][j] for i, j in enumerate(select_top_per_prompt(R)) if j >= 0])
    return report


def _rejection_sampling_stage(config: DemoConfig, paths, sft_model: Path, out: Path) -> tuple[dict, Path]:
    """One round: 8 samples per training prompt, keep each prompt's verified-correct best, SFT on them."""
    from posttrain.stages.rs import RSConfig, run_rs

    rs_config = RSConfig(
        model=str(sft_model), prompts=str(paths.data / "rl_train.jsonl"), limit=config.rs_prompts,
        reward="verifier:math", min_reward=1.0, out=str(out / "rs"), rounds=1, n=8,
        max_new_tokens=config.max_new_tokens, sft_lr=3e-4, sft_epochs=3.0, eval_prompts=str(
            paths.data / "rl_heldout.jsonl"), eval_reward="gold", eval_limit=config.eval_prompts, eval_n=4,
        backend="hf", device=config.device, progress=config.progress)
    _discard_if_config_changed(out / "rs", rs_config)
    model = run_rs(rs_config)
    rounds = {r["round"]: r for r in map(json.loads, (out / "rs" / "rounds.jsonl").read_text().splitlines())}
    return {"selector": "verifier:math (correct only)", "prompts": rounds[1]["prompts"],
            "selected": rounds[1]["selected"], "eval_gold_before": rounds[0]["eval_reward"],
            "eval_gold_after": rounds[1]["eval_reward"]}, model


def _dpo_stage(config: DemoConfig, paths, sft_model: Path, out: Path) -> tuple[dict, Path]:
    """On-policy DPO from the SFT model (Tülu 3 / Iterative RPO style): sample 8 replies per training prompt from the
    SFT model, label them with the gold reward, pair better with worse replies (up to 4 distinct pairs per prompt),
    train dpo_nll (DPO + NLL on the chosen reply) for one epoch."""
    from posttrain.data.io import write_jsonl
    from posttrain.data.prompts import load_prompt_rows
    from posttrain.models.generation import SamplingParams, load_engine
    from posttrain.rewards import reward_from_spec
    from posttrain.stages.bestofn import reward_matrix, sample, select_rows
    from posttrain.stages.dpo import DPOConfig, train_dpo

    pairs_path = out / "dpo_pairs.jsonl"
    settings = {"model": str(sft_model), "prompts": config.dpo_prompts, "n": 8, "pairs_per_prompt": 4}
    settings_path = out / "dpo_pairs.settings.json"
    if not pairs_path.exists() or not settings_path.exists() or json.loads(settings_path.read_text()) != settings:
        prompt_rows = load_prompt_rows(str(paths.data / "rl_train.jsonl"), limit=config.dpo_prompts)
        engine = load_engine(sft_model, backend="hf", device=config.device)
        rows = sample(engine, prompt_rows, SamplingParams(n=8, max_new_tokens=config.max_new_tokens,
                                                          temperature=1.0, seed=1))
        for row, rewards in zip(rows, reward_matrix(reward_from_spec("gold"), rows)):
            row["rewards"] = rewards
        write_jsonl(select_rows(rows, "top_per_prompt", pairs="all", pairs_per_prompt=4), pairs_path)
        settings_path.write_text(json.dumps(settings))
    n_pairs = len(pairs_path.read_text().splitlines())
    dpo_config = DPOConfig(
        loss="dpo_nll", model=str(sft_model), data=str(pairs_path),
        eval_data=str(paths.data / "preference_heldout.jsonl"), out=str(out / "dpo"), epochs=1.0, batch_size=16,
        lr=5e-5, beta=0.1, warmup_steps=10, save_every=100, device=config.device, progress=config.progress,
        resume=True)
    _discard_if_config_changed(out / "dpo", dpo_config)
    model = out / "dpo" / "model" if is_complete(out / "dpo") else train_dpo(dpo_config)
    done = json.loads((model / "complete.json").read_text())
    return {"loss": "dpo_nll", "beta": 0.1, "prompts": config.dpo_prompts, "pairs": n_pairs, "steps": done["steps"],
            "implicit_reward_accuracy": done["eval"]["rewards/accuracy"],
            "implicit_reward_margin": done["eval"]["rewards/margin"]}, model


def _greedy_gold(samples_path: Path) -> list[float]:
    from posttrain.world.gold import gold_reward

    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    return [gold_reward(row["prompt"], row["completion"]) for row in rows]


def run_demo(config: DemoConfig) -> dict:
    from posttrain.stages import world as build
    from posttrain.stages.sft import SFTConfig, train_sft
    from posttrain.world.evaluate import evaluate_model

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stage_count = 3 + bool(config.rm_steps) + bool(config.bon_n) + bool(config.rs_prompts) + bool(config.dpo_prompts)
    print(f"[1/{stage_count}] tiny world: tokenizer, datasets, base model (cached after the first run)")
    paths = build.ensure_world(base_model=True, progress=config.progress)
    prompts = paths.data / "rl_heldout.jsonl"
    evaluate = lambda model_dir, name: evaluate_model(  # noqa: E731
        model_dir, prompts, limit=config.eval_prompts, max_new_tokens=config.max_new_tokens, device=config.device,
        samples_path=out / f"samples_{name}.jsonl")
    stages: dict[str, dict[str, float]] = {}

    print(f"[2/{stage_count}] evaluating the base model")
    stages["base"] = evaluate(paths.base_model, "base")

    print(f"[3/{stage_count}] SFT ({config.sft_steps} steps)")
    sft_dir = out / "sft"
    sft_config = SFTConfig(
        model=str(paths.base_model), data=str(paths.data / "sft_train.jsonl"),
        eval_data=str(paths.data / "sft_heldout.jsonl"), out=str(sft_dir), max_steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, warmup_steps=10, save_every=50, log_every=5,
        device=config.device, progress=config.progress, resume=True,
    )
    _discard_if_config_changed(sft_dir, sft_config)
    sft_model = sft_dir / "model" if is_complete(sft_dir) else train_sft(sft_config)
    stages["sft"] = evaluate(sft_model, "sft")

    summary = {"stages": stages}
    stage = 3
    if config.rm_steps:
        stage += 1
        print(f"[{stage}/{stage_count}] Bradley-Terry reward model from the SFT model ({config.rm_steps} steps)")
        summary["reward_model"] = _reward_model_stage(config, paths, sft_model, out)
    if config.bon_n:
        stage += 1
        print(f"[{stage}/{stage_count}] best-of-{config.bon_n} on {config.bon_prompts} held-out prompts")
        rm_model = Path(summary["reward_model"]["model"]) if "reward_model" in summary else None
        summary["best_of_n"] = _best_of_n_stage(config, paths, sft_model, rm_model)
    if config.rs_prompts:
        stage += 1
        print(f"[{stage}/{stage_count}] one round of rejection-sampling fine-tuning ({config.rs_prompts} prompts)")
        summary["rejection_sampling"], rs_model = _rejection_sampling_stage(config, paths, sft_model, out)
        stages["rs"] = evaluate(rs_model, "rs")
    if config.dpo_prompts:
        from posttrain.maths.stats import win_rate
        from posttrain.models.logprobs import policy_kl
        from posttrain.world.evaluate import load_eval_prompts, sampled_gold_per_prompt

        stage += 1
        print(f"[{stage}/{stage_count}] on-policy DPO from the SFT model ({config.dpo_prompts} prompts x 8 "
              f"gold-labelled samples)")
        summary["dpo"], dpo_model = _dpo_stage(config, paths, sft_model, out)
        stages["dpo"] = evaluate(dpo_model, "dpo")
        eval_prompts = [row["prompt"] for row in load_eval_prompts(prompts, config.eval_prompts)]
        expected = {name: sampled_gold_per_prompt(model, eval_prompts, n=config.dpo_eval_samples,
                                                  max_new_tokens=config.max_new_tokens, seed=2, device=config.device)
                    for name, model in (("dpo", dpo_model), ("sft", sft_model))}
        summary["dpo"].update(
            win_rate_vs_sft=win_rate(expected["dpo"], expected["sft"]),
            win_rate_vs_sft_greedy=win_rate(_greedy_gold(out / "samples_dpo.jsonl"),
                                            _greedy_gold(out / "samples_sft.jsonl")),
            sampled_gold_dpo=mean_or_nan(expected["dpo"]), sampled_gold_sft=mean_or_nan(expected["sft"]),
            kl_to_reference=policy_kl(dpo_model, sft_model, eval_prompts[:100], n=4,
                                      max_new_tokens=config.max_new_tokens, device=config.device))
    summary.update(world=str(paths.root), seconds=round(time.time() - started, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(format_table(stages))
    if rm := summary.get("reward_model"):
        print(f"\nreward model (bt): held-out pair accuracy {rm['pair_accuracy']:.3f} (pairs that need the answer "
              f"checked: {rm['pair_accuracy_answer_check']:.3f}; the rest: {rm['pair_accuracy_rest']:.3f}), top-1 "
              f"selection {rm['top1_accuracy']:.3f} (random {rm['random_top1']:.3f}), length correlation "
              f"{rm['length_correlation']:+.3f}")
    if bon := summary.get("best_of_n"):
        picks = ", ".join(f"{name[:-10].replace('_', ' ')} picks {value:.3f}" for name, value in bon.items()
                          if name.endswith("_pick_gold"))
        print(f"best-of-{bon['n']} (held-out, T=1): gold of single samples {bon['single_gold']:.3f}; {picks}; "
              f"pass@{bon['n']} {bon['pass_at_n']:.3f}")
    if rs := summary.get("rejection_sampling"):
        print(f"rejection sampling, 1 round ({rs['selected']} verified samples): held-out gold of the policy's "
              f"samples {rs['eval_gold_before']:.3f} -> {rs['eval_gold_after']:.3f}")
    if dpo := summary.get("dpo"):
        print(f"on-policy DPO ({dpo['loss']}, {dpo['pairs']} pairs, {dpo['steps']} steps, beta {dpo['beta']}): "
              f"win-rate vs SFT under the gold reward {dpo['win_rate_vs_sft']:.3f} of held-out prompts (expected "
              f"gold from {config.dpo_eval_samples} samples each; ties half; greedy replies: "
              f"{dpo['win_rate_vs_sft_greedy']:.3f}), sampled gold {dpo['sampled_gold_sft']:.3f} -> "
              f"{dpo['sampled_gold_dpo']:.3f}, KL to the SFT reference {dpo['kl_to_reference']:.3f} nats, held-out "
              f"implicit-reward pair accuracy {dpo['implicit_reward_accuracy']:.3f}")
    print(f"\nsummary: {out / 'summary.json'}   ({summary['seconds']} s)")
    return summary
