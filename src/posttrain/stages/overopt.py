"""``posttrain overopt``: reward-model over-optimization on the tiny world, measured against its gold reward.

The RLHF book's Goodhart chapter as Gao et al. (2022, "Scaling laws for reward model overoptimization") measured it:
proxy reward models trained on more or less preference data, a policy optimised against each, and both the proxy's
reward and the gold reward plotted against sqrt(KL) from the starting policy. The tiny world knows its gold reward,
so no gold RM has to stand in for it. Steps:

  1. the SFT model (``--model``, or the demo's SFT recipe trained into ``out/sft`` and reused);
  2. one Bradley-Terry proxy RM from the SFT model per ``--rm_pairs`` size K, trained for one epoch on the first K
     of the annotators' preference pairs (noisy and length-biased: docs/reward-models.md), as the demo's RM;
  3. best-of-n: ``bon_n`` samples per held-out prompt drawn ONCE from the SFT model and shared by every proxy; for
     each n in 1, 2, 4, ..., bon_n the proxy's pick, its gold and proxy reward estimated without bias from all
     ``bon_n`` samples (:func:`best_of_n_expectation`), at KL(best-of-n || SFT) = log n - (n-1)/n;
  4. RL (PPO by default) from the SFT model against each proxy alone, the reference loaded only to measure the
     rollouts' KL (``track_kl``); the rollouts' proxy and gold reward against their KL, averaged over windows of
     ``window`` steps (the demo's :func:`~posttrain.stages.demo.over_optimization_curve`).

Proxy scores are not on the gold scale. Each proxy is mapped affinely onto it by matching its mean and standard
deviation to the gold reward's over the shared SFT samples (:func:`calibration`), so at KL 0 both curves start at
the SFT policy's gold reward and a proxy point says "the gold this policy would get if the proxy were right", in
gold units. Outputs in ``out``: ``overopt.json`` (every curve point and each curve's gold peak and final point),
``overopt.png`` and a console table. Completed RMs, RL runs and the shared samples are reused on a rerun; an RM that
is (re)trained has its RL run redone, and a retrained SFT model has everything after it redone.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from posttrain.maths.selection import best_of_n_kl, powers_of_two
from posttrain.maths.stats import mean_or_nan, pearson
from posttrain.plumbing.config import device_option, option, progress_option
from posttrain.plumbing.runlog import StageClock


@dataclass
class OveroptConfig:
    out: str = option("runs/overopt", "directory for the SFT model (when trained here), the RM and RL runs, the "
                                      "shared samples, overopt.json and overopt.png")
    model: str = option("", "the SFT model to start from (a tiny-world policy); empty = the demo's SFT recipe on the "
                            "tiny world, trained into out/sft (reused once complete)")
    rm_pairs: str = option("500,2000,8000", "proxy RMs, one per size K (comma-separated): Bradley-Terry from the SFT "
                                            "model, one epoch on the first K of the world's 16000 preference pairs")
    rm_batch_size: int = option(16, "RM pairs per step", minimum=1)
    rm_lr: float = option(3e-4, "RM learning rate (constant, as the demo's RM)", above=0)
    bon_n: int = option(16, "best-of-n: samples per held-out prompt from the SFT model (n = 1, 2, 4, ..., bon_n); "
                            "0 = skip best-of-n")
    bon_prompts: int = option(200, "best-of-n: held-out prompts (rl_heldout.jsonl), also those the proxies are "
                                   "calibrated on", minimum=1)
    rl_algo: str = option("ppo", "RL against each proxy: ppo (critic from the proxy RM) | grpo | rloo | reinforce",
                          choices=("ppo", "grpo", "rloo", "reinforce"))
    rl_steps: int = option(30, "RL rollout steps per proxy; 0 = skip RL")
    rl_beta: float = option(0.0, "RL KL coefficient; at 0 the reference is loaded only to measure the KL")
    rl_lr: float = option(2e-4, "RL learning rate (policy and critic)", above=0)
    rl_batch_size: int = option(16, "RL prompts per rollout step", minimum=1)
    rl_group_size: int = option(4, "RL samples per prompt", minimum=1)
    window: int = option(5, "RL curve: steps averaged into one point (one step's rollouts are few and noisy)",
                         minimum=1)
    max_new_tokens: int = option(64, "generation budget per reply", minimum=1)
    sft_processes: int = option(1, "data-parallel processes of the SFT run on a CPU (the demo's --sft_processes); "
                                   "1 = in this process", minimum=1)
    seed: int = option(0, "seed of the RM and RL runs")
    device: str = device_option()
    progress: bool = progress_option()


# ---------------------------------------------------------------------------------------------------------------
# The curves' arithmetic (pure)


def parse_sizes(text: str) -> list[int]:
    """``"2000,500"`` -> ``[500, 2000]``: distinct positive sizes, ascending."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--rm_pairs: expected comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--rm_pairs: expected positive sizes, got {text!r}")
    return sizes


def best_of_n_expectation(selector: list[float], values: list[float], n: int) -> float:
    """E[values of the selector's pick among n samples drawn without replacement from the N given], exactly: with
    the N samples in ascending selector order (ties broken by position), the i-th (1-based) is the pick when it is
    drawn and the other n - 1 come from the i - 1 below it, with probability C(i-1, n-1) / C(N, n). The unbiased
    best-of-n estimator of Gao et al. (2022, appendix); it uses all N samples, not just the first n."""
    N = len(selector)
    if not 1 <= n <= N or len(values) != N:
        raise ValueError(f"best-of-{n} of {N} samples ({len(values)} values)")
    order = sorted(range(N), key=lambda j: (selector[j], -j))  # equal scores: the earlier sample ranks higher
    total = math.comb(N, n)
    return sum(math.comb(i, n - 1) / total * values[j] for i, j in enumerate(order))


def calibration(proxy: list[float], gold: list[float]) -> tuple[float, float]:
    """``(scale, shift)`` so that ``scale * proxy + shift`` has the gold's mean and standard deviation over the same
    samples (moment matching; a regression would shrink the proxy by its correlation with the gold, which is what
    the curves are meant to show). A constant proxy or gold has no scale to match: then scale 1, and only the mean
    is matched."""
    mean_p, mean_g = mean_or_nan(proxy), mean_or_nan(gold)
    std_p = math.sqrt(mean_or_nan([(p - mean_p) ** 2 for p in proxy]))
    std_g = math.sqrt(mean_or_nan([(g - mean_g) ** 2 for g in gold]))
    scale = std_g / std_p if std_p > 0 and std_g > 0 else 1.0
    return scale, mean_g - scale * mean_p


def best_of_n_curve(selector: list[list[float]], gold: list[list[float]], scale: float, shift: float) -> list[dict]:
    """One point per n in 1, 2, 4, ..., N of best-of-n by ``selector`` (M prompts x N samples): ``{n, kl, sqrt_kl,
    gold, proxy, proxy_raw}``, the rewards averaged over prompts, the proxy also calibrated (``scale`` and
    ``shift`` of :func:`calibration`)."""
    points = []
    for n in powers_of_two(len(selector[0])):
        raw = mean_or_nan([best_of_n_expectation(s, s, n) for s in selector])
        kl = best_of_n_kl(n)
        points.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl),
                       "gold": mean_or_nan([best_of_n_expectation(s, g, n) for s, g in zip(selector, gold)]),
                       "proxy": scale * raw + shift, "proxy_raw": raw})
    return points


def curve_summary(points: list[dict]) -> dict:
    """The gold peak of a curve (its highest gold point; the first of equal ones), its final point, and whether the
    proxy rose at every point."""
    peak = max(points, key=lambda point: point["gold"])
    proxies = [point["proxy"] for point in points]
    return {"peak_gold": peak["gold"], "peak_kl": peak["kl"], "final_gold": points[-1]["gold"],
            "final_kl": points[-1]["kl"], "first_proxy": proxies[0], "final_proxy": proxies[-1],
            "proxy_monotone": all(b >= a for a, b in zip(proxies, proxies[1:])),
            "gold_drop_from_peak": peak["gold"] - points[-1]["gold"]}


def rl_curve(records: list[dict], window: int, scale: float, shift: float) -> list[dict]:
    """The RL run's windowed points (:func:`~posttrain.stages.demo.over_optimization_curve` of its metrics) as
    ``{step, steps, kl, sqrt_kl, gold, proxy, proxy_raw}``, the proxy calibrated."""
    from posttrain.stages.demo import over_optimization_curve

    return [{"step": point["steps"][1], "steps": point["steps"], "kl": point["kl"],
             "sqrt_kl": math.sqrt(max(point["kl"], 0.0)), "gold": point["gold"],
             "proxy": scale * point["proxy"] + shift, "proxy_raw": point["proxy"]}
            for point in over_optimization_curve(records, window)["curve"]]


# ---------------------------------------------------------------------------------------------------------------
# The runs


def _demo_settings(config: OveroptConfig):
    """A DemoConfig carrying this run's device, progress and generation budget, for the demo's helpers."""
    from posttrain.stages.demo import DemoConfig

    return DemoConfig(out=config.out, device=config.device, progress=config.progress,
                      max_new_tokens=config.max_new_tokens, sft_processes=config.sft_processes)


def _sft_model(config: OveroptConfig, paths, out: Path) -> Path:
    """``--model``, or the demo's SFT recipe trained into ``out/sft`` (reused when complete; a new one voids every
    product made from the old)."""
    from posttrain.plumbing.harness import is_complete
    from posttrain.stages.demo import _discard_if_config_changed, demo_sft_config, train_demo_sft

    if config.model:
        return Path(config.model)
    sft_config = demo_sft_config(_demo_settings(config), paths, out / "sft")
    _discard_if_config_changed(out / "sft", sft_config)
    if is_complete(out / "sft"):
        return out / "sft" / "model"
    for stale in [*out.glob("rm_*"), *out.glob("rl_*"), out / "data"]:
        shutil.rmtree(stale, ignore_errors=True)
    return train_demo_sft(_demo_settings(config), paths, out / "sft")


def _proxy_rm(config: OveroptConfig, paths, sft_model: Path, out: Path, pairs: int) -> Path:
    """The BT proxy RM on the first ``pairs`` preference pairs (one epoch); a (re)trained RM voids its RL run."""
    from posttrain.plumbing.harness import is_complete
    from posttrain.stages.demo import _discard_if_config_changed
    from posttrain.stages.rm import RMConfig, train_rm

    lines = (paths.data / "preference_train.jsonl").read_text().splitlines(keepends=True)
    if pairs > len(lines):
        raise ValueError(f"--rm_pairs: {pairs} pairs asked for, the world has {len(lines)}")
    data = out / "data" / f"preference_{pairs}.jsonl"
    run_dir = out / f"rm_{pairs}"
    data.parent.mkdir(parents=True, exist_ok=True)
    if not data.exists() or data.read_text() != "".join(lines[:pairs]):  # new, or the world's data changed
        shutil.rmtree(run_dir, ignore_errors=True)
        data.write_text("".join(lines[:pairs]))
    rm_config = RMConfig(
        loss="bt", model=str(sft_model), data=str(data), out=str(run_dir),
        max_steps=math.ceil(pairs / config.rm_batch_size), batch_size=config.rm_batch_size, lr=config.rm_lr,
        lr_schedule="constant", save_every=100, seed=config.seed, device=config.device, progress=config.progress,
        resume=True)
    _discard_if_config_changed(run_dir, rm_config)
    if is_complete(run_dir):
        return run_dir / "model"
    shutil.rmtree(out / f"rl_{pairs}", ignore_errors=True)
    return train_rm(rm_config)


def _rl_run(config: OveroptConfig, paths, sft_model: Path, rm_model: Path, out: Path, pairs: int) -> Path:
    """RL from the SFT model against the proxy alone (``rl_beta``, 0 by default), its KL to the SFT model tracked.
    PPO: one epoch of two minibatches (the second off-policy by one update, so the clip acts), the critic
    initialised from the proxy RM, GAE (gamma 1, lambda 0.95), as the demo's PPO. Returns the run directory."""
    from posttrain.plumbing.harness import is_complete
    from posttrain.stages.demo import _discard_if_config_changed
    from posttrain.stages.rl import RLConfig, resolve, train_rl

    run_dir = out / f"rl_{pairs}"
    ppo = dict(value_model=str(rm_model), value_lr=config.rl_lr, ppo_epochs=1,
               num_minibatches=2) if config.rl_algo == "ppo" else {}
    rl_config = resolve(RLConfig(
        algo=config.rl_algo, model=str(sft_model), reward=f"rm:{rm_model}", data=str(paths.data / "rl_train.jsonl"),
        eval_data="", out=str(run_dir), max_steps=config.rl_steps, batch_size=config.rl_batch_size,
        group_size=config.rl_group_size, beta=config.rl_beta, track_kl=True, lr=config.rl_lr,
        max_new_tokens=config.max_new_tokens, save_every=10, seed=config.seed, device=config.device,
        progress=config.progress, resume=True, **ppo))
    _discard_if_config_changed(run_dir, rl_config)
    if not is_complete(run_dir):
        train_rl(rl_config)
    return run_dir


def run_overopt(config: OveroptConfig) -> dict:
    """Run the study (module docstring); returns what ``overopt.json`` holds."""
    from posttrain.plumbing.runlog import read_metrics
    from posttrain.rewards import reward_from_spec
    from posttrain.stages import world as build
    from posttrain.stages.bestofn import reward_matrix
    from posttrain.stages.demo import _sft_samples

    sizes = parse_sizes(config.rm_pairs)
    if not config.bon_n and not config.rl_steps:
        raise ValueError("--bon_n and --rl_steps are both 0: nothing would be optimised against the proxies")
    if config.rl_steps and config.rl_steps < config.window:
        raise ValueError(f"--rl_steps ({config.rl_steps}) must be at least one --window ({config.window})")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timed = StageClock()

    paths = build.ensure_world(base_model=not config.model, progress=config.progress)
    sft_model = _sft_model(config, paths, out)
    timed("sft")
    # The shared samples: what best-of-n picks from and what every proxy is calibrated on.
    rows = _sft_samples(_demo_settings(config), paths.data / "rl_heldout.jsonl", sft_model, out / "sft_samples.jsonl",
                        limit=config.bon_prompts, n=max(config.bon_n, 2), seed=2)
    gold = reward_matrix(reward_from_spec("gold"), rows)
    flat_gold = [g for row in gold for g in row]
    timed("samples")
    points: list[dict] = []
    curves: list[dict] = []
    proxies: dict[str, dict] = {}
    for pairs in sizes:
        print(f"proxy RM on {pairs} preference pairs")
        rm_model = _proxy_rm(config, paths, sft_model, out, pairs)
        timed(f"rm_{pairs}")
        selector = reward_matrix(reward_from_spec(f"rm:{rm_model}", device=config.device), rows)
        flat = [s for row in selector for s in row]
        scale, shift = calibration(flat, flat_gold)
        proxies[str(pairs)] = {"model": str(rm_model), "scale": scale, "shift": shift,
                               "correlation_with_gold": pearson(flat, flat_gold)}
        curve_points: dict[str, list[dict]] = {}
        if config.bon_n:
            curve_points["best_of_n"] = best_of_n_curve(selector, gold, scale, shift)
        if config.rl_steps:
            print(f"{config.rl_algo} against the proxy RM on {pairs} pairs ({config.rl_steps} steps)")
            run_dir = _rl_run(config, paths, sft_model, rm_model, out, pairs)
            curve_points[config.rl_algo] = rl_curve(read_metrics(run_dir), config.window, scale, shift)
        timed(f"curves_{pairs}")
        for method, method_points in curve_points.items():
            points += [{"rm_pairs": pairs, "method": method, **point} for point in method_points]
            curves.append({"rm_pairs": pairs, "method": method, **curve_summary(method_points)})
    result = {"sft_model": str(sft_model), "sft_gold": mean_or_nan(flat_gold), "prompts": len(rows),
              "samples_per_prompt": len(rows[0]["completions"]), "rl_algo": config.rl_algo, "rl_beta": config.rl_beta,
              "normalisation": "proxy * scale + shift, matching the gold's mean and std on the shared SFT samples",
              "proxies": proxies, "curves": curves, "points": points}
    plot_overopt(result, out / "overopt.png")
    result.update(plot=str(out / "overopt.png"), seconds=timed.total(), stage_seconds=timed.seconds)
    (out / "overopt.json").write_text(json.dumps(result, indent=2))
    print(format_overopt(result))
    return result


def format_overopt(result: dict) -> str:
    """The console table: per curve the gold at KL 0, its peak and final point, and the proxy's rise."""
    header = (f"{'rm_pairs':>8} {'method':<10} {'gold@0':>7} {'peak gold':>9} {'at KL':>6} {'final gold':>10} "
              f"{'at KL':>6} {'proxy first->final':>19} {'monotone':>8}")
    lines = [f"SFT gold reward (shared samples) {result['sft_gold']:.3f}; proxies calibrated to the gold scale", header,
             "-" * len(header)]
    for curve in result["curves"]:
        first = next(p for p in result["points"] if p["rm_pairs"] == curve["rm_pairs"]
                     and p["method"] == curve["method"])
        lines.append(f"{curve['rm_pairs']:>8} {curve['method']:<10} {first['gold']:>7.3f} {curve['peak_gold']:>9.3f} "
                     f"{curve['peak_kl']:>6.2f} {curve['final_gold']:>10.3f} {curve['final_kl']:>6.2f} "
                     f"{curve['first_proxy']:>8.3f} -> {curve['final_proxy']:<7.3f} "
                     f"{'yes' if curve['proxy_monotone'] else 'no':>8}")
    if "plot" in result:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def plot_overopt(result: dict, path: Path) -> Path:
    """Gold (solid) and calibrated proxy (dashed) reward against sqrt(KL), one panel per method, one colour per
    proxy RM; each gold peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(curve["method"] for curve in result["curves"]))
    sizes = sorted({curve["rm_pairs"] for curve in result["curves"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    colours = plt.get_cmap("viridis")
    for ax, method in zip(axes[0], methods):
        for k, pairs in enumerate(sizes):
            curve = [p for p in result["points"] if p["method"] == method and p["rm_pairs"] == pairs]
            if not curve:
                continue
            colour = colours(k / max(len(sizes) - 1, 1) * 0.85)
            xs = [p["sqrt_kl"] for p in curve]
            ax.plot(xs, [p["gold"] for p in curve], color=colour, marker="o", label=f"gold, RM on {pairs} pairs")
            ax.plot(xs, [p["proxy"] for p in curve], color=colour, linestyle="--", label=f"proxy ({pairs})")
            peak = max(curve, key=lambda p: p["gold"])
            ax.plot([peak["sqrt_kl"]], [peak["gold"]], marker="*", markersize=14, color=colour)
        ax.axhline(result["sft_gold"], color="gray", linestyle=":", label="SFT policy (gold)")
        ax.set_xlabel("sqrt(KL to the SFT policy) (sqrt nats)")
        ax.set_ylabel("reward (gold scale)")
        ax.set_title("best-of-n" if method == "best_of_n" else f"{method} against the proxy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
