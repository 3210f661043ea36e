"""The demo's report: ``report.html`` (one self-contained file: inline CSS, plots as base64 PNG data URIs, no script,
nothing fetched) and ``report.md`` (the same numbers, the plots as PNG files in ``report/``), both beside
``summary.json`` in the demo's ``--out``.

:func:`write_report` reads ``summary.json``'s numbers and the run directories the demo leaves (``metrics.jsonl`` of
sft, rm, dpo, ppo, grpo; the greedy held-out replies ``samples_<stage>.jsonl``) and writes, in this order: the
one-line verdict per stage, the stage table (best value per column highlighted among the trained policies), the
plots (training curves; reward against KL per RL stage; the inference-time scaling curve; the over-optimization
curve), example replies of every stage to the same held-out prompts, the reward model's report, the other stage
reports, and the time of each stage. ``posttrain demo --report_only`` rebuilds it from an existing ``--out``.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from posttrain.plumbing.runlog import read_metrics

# The policies of the stage table, in the tour's order: (summary key, label, what it is).
STAGES = (
    ("base", "base", "the pretrained model; it never saw the chat format"),
    ("sft", "SFT", "supervised fine-tuning on the world's 4000 demonstrations"),
    ("rs", "RS (verifier)", "one round of rejection sampling: SFT on the right answers among 8 samples per prompt"),
    ("rs_rm", "RS (RM)", "one round of rejection sampling: SFT on the reward model's pick of 8 samples per prompt"),
    ("dpo", "DPO", "on-policy DPO on best-vs-worst pairs of the SFT model's own samples"),
    ("ppo", "PPO (RLHF)", "PPO against the Bradley-Terry reward model, KL penalty beta 0.2"),
    ("grpo", "GRPO (RLVR)", "GRPO with the math verifier as the reward, no KL penalty"),
)
# Best-of-N rows (inference-time selection among the SFT model's samples, not trained policies).
PICKS = (("reward_model", "best-of-{n} (RM)", "the reward model's pick of the SFT model's {n} samples"),
         ("verifier", "best-of-{n} (verifier)", "the math verifier's pick of the SFT model's {n} samples"))
# The stage table's columns: (key, header, direction: +1 higher is better, 0 none, format).
COLUMNS = (
    ("format_rate", "format", 1, "{:.2f}"),
    ("accuracy", "accuracy", 1, "{:.2f}"),
    ("request_rate", "request following", 1, "{:.2f}"),
    ("gold_reward", "gold reward", 1, "{:.3f}"),
    ("proxy_reward", "proxy (RM) reward", 1, "{:+.3f}"),
    ("kl_to_sft", "KL to SFT (nats)", 0, "{:.2f}"),
    ("mean_length", "mean length (tokens)", 0, "{:.1f}"),
    ("win_rate_vs_sft", "win-rate vs SFT (gold, greedy)", 1, "{:.2f}"),
)
EXAMPLE_PROMPTS = 4
CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d2430;
       max-width: 1320px; margin: 24px auto; padding: 0 24px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 34px; border-bottom: 2px solid #dde3ea;
padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 6px; }
.sub { color: #5a6573; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 6px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e3e7ec; text-align: right; vertical-align: top; }
th { background: #f1f4f7; font-weight: 600; font-size: 13px; }
td.name, th.name { text-align: left; white-space: nowrap; font-weight: 600; }
table.examples { width: 100%; max-width: 1200px; }
th.text { text-align: left; }
td.text { text-align: left; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px;
          white-space: pre-wrap; width: 72%; }
tr.pick td { color: #5a6573; font-style: italic; } tr.pick td.name { font-weight: 500; }
td.best { background: #d4f1cd; font-weight: 700; }
table.verdicts { width: 100%; } table.verdicts td { border-bottom: 1px solid #eef1f4; padding: 4px 8px; }
td.left { text-align: left; white-space: nowrap; width: 1%; }
td.about { text-align: left; color: #5a6573; font-size: 13px; }
.pos { color: #1e7b34; } .neg { color: #b3261e; }
.tag { display: inline-block; min-width: 64px; padding: 0 6px; margin-right: 6px; border-radius: 4px;
       font-size: 12px; font-weight: 700; text-align: center; color: white; }
.up { background: #2f8f46; } .down { background: #c0392b; } .mixed { background: #b07d12; }
.ref { background: #6c7a89; }
.note { color: #5a6573; font-size: 13px; max-width: 1100px; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; border: 1px solid #e3e7ec; }
figcaption { color: #5a6573; font-size: 13px; max-width: 1100px; }
.bar { display: inline-block; height: 10px; background: #7aa6d6; vertical-align: middle; margin-right: 6px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px 36px; align-items: flex-start; }
.ok { color: #2f8f46; font-weight: 700; } .no { color: #c0392b; }
"""


def _number(value, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def stage_rows(summary: dict) -> list[dict]:
    """The stage table's rows: ``{"key", "label", "about", "pick" (a best-of-N row), "values": {column: number}}``
    for each trained policy in ``summary["stages"]`` and each best-of-N selector's picks."""
    rows = [{"key": key, "label": label, "about": about, "pick": False, "values": summary["stages"][key]}
            for key, label, about in STAGES if key in summary.get("stages", {})]
    bon = summary.get("best_of_n", {})
    for key, label, about in PICKS:
        if key in bon.get("picks", {}):
            n = bon.get("n", "N")
            rows.append({"key": f"best_of_n_{key}", "label": label.format(n=n), "about": about.format(n=n),
                         "pick": True, "values": bon["picks"][key]})
    return rows


def _best(rows: list[dict]) -> dict[str, float]:
    """Per column with a direction, the best value among the trained policies (base and best-of-N rows aside)."""
    best = {}
    for key, _, direction, _ in COLUMNS:
        values = [row["values"].get(key) for row in rows if not row["pick"] and row["key"] != "base"]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if direction and values:
            best[key] = max(values)
    return best


def verdict_items(row: dict, sft: dict | None) -> tuple[str, list[tuple[str, int]]]:
    """``(tag, [(text, sign)])``: a stage's verdict against the SFT model. The tag is better (gold reward up and it
    beats SFT on more than half the prompts), worse (both down), mixed, or reference (base and SFT); the items are
    its changes against SFT (sign +1 up, -1 down, 0 neither), its KL and win-rate."""
    v = row["values"]
    if row["key"] in ("base", "sft") or sft is None:
        items = [("format", "format_rate"), ("accuracy", "accuracy"), ("requests", "request_rate")]
        return "ref", ([(f"{name} {_number(v.get(key), '{:.0%}')}", 0) for name, key in items]
                       + [(f"gold reward {_number(v.get('gold_reward'))}", 0)])
    items = []
    for key, name in (("gold_reward", "gold"), ("accuracy", "accuracy"), ("request_rate", "requests"),
                      ("proxy_reward", "RM score")):
        if isinstance(v.get(key), (int, float)) and isinstance(sft.get(key), (int, float)):
            delta = v[key] - sft[key]
            items.append((f"{name} {delta:+.2f}", 0 if abs(delta) < 0.005 else (1 if delta > 0 else -1)))
    if isinstance(v.get("kl_to_sft"), (int, float)):
        items.append((f"KL {v['kl_to_sft']:.2f}" + (" (bound)" if row["pick"] else ""), 0))
    win = v.get("win_rate_vs_sft")
    if isinstance(win, (int, float)):
        items.append((f"wins {win:.0%}", 0 if win == 0.5 else (1 if win > 0.5 else -1)))
    gold_delta = (v.get("gold_reward") or 0.0) - (sft.get("gold_reward") or 0.0)
    if gold_delta > 0.02 and (win is None or win > 0.5):
        tag = "up"
    elif gold_delta < -0.02 and (win is None or win < 0.5):
        tag = "down"
    else:
        tag = "mixed"
    return tag, items


def verdict(row: dict, sft: dict | None) -> tuple[str, str]:
    """``(tag, sentence)``: :func:`verdict_items` as one line of text."""
    tag, items = verdict_items(row, sft)
    return tag, ", ".join(text for text, _ in items)


TAG_TEXT = {"up": "better", "down": "worse", "mixed": "mixed", "ref": "reference"}


# ---- plots --------------------------------------------------------------------------------------------------------

def _smooth(values: list[float], window: int) -> list[float]:
    """A centred running mean (the trend through noisy per-step values)."""
    return [sum(values[max(0, i - window): i + window + 1]) / len(values[max(0, i - window): i + window + 1])
            for i in range(len(values))]


def _series(records: list[dict], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    points = [(r[x_key], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))
              and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


# Training curves: (run directory, panel title, [(metric, label)]).
# Training curves: (run directory, panel title, [(metric, label, on the right-hand axis)]).
CURVES = (
    ("sft", "SFT: loss", [("train/loss", "train", False), ("eval/loss", "held-out", False)]),
    ("rm", "Reward model: BT loss, pair accuracy", [("train/loss", "loss", False), ("rm/accuracy", "accuracy", True)]),
    ("dpo", "DPO: loss, implicit-reward accuracy", [("train/loss", "loss", False),
                                                    ("rewards/accuracy", "accuracy", True)]),
    ("ppo", "PPO: rollout reward (RM) and gold", [("rollout/reward_mean", "RM reward", False),
                                                  ("rollout/gold_reward", "gold", True)]),
    ("grpo", "GRPO: rollout reward (verifier) and gold", [("rollout/reward_mean", "verifier reward", False),
                                                          ("rollout/gold_reward", "gold", True)]),
    ("overopt", "Over-optimization run: RM reward and gold", [("rollout/reward_mean", "RM reward", False),
                                                              ("rollout/gold_reward", "gold", True)]),
)


def _training_curves(out: Path, path: Path, plt) -> Path | None:
    panels = [(title, read_metrics(out / run), keys) for run, title, keys in CURVES if (out / run).is_dir()]
    panels = [(title, records, keys) for title, records, keys in panels if records]
    if not panels:
        return None
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.3 * rows), squeeze=False)
    for ax, (title, records, keys) in zip(axes.flat, panels):
        twin = ax.twinx() if any(right for _, _, right in keys) else None
        lines = []
        for color, (key, label, right) in zip(("tab:blue", "tab:orange"), keys):
            xs, ys = _series(records, key)
            if not xs:
                continue
            target = twin if right else ax
            window = max(1, round(len(ys) / 12))  # 20 steps: a window of 2 either side; 120: 10
            raw = target.plot(xs, ys, color=color, alpha=0.25 if window > 1 else 0.9)[0]
            lines.append(target.plot(xs, _smooth(ys, window), color=color, label=label)[0] if window > 1 else raw)
            raw.set_label(label if window == 1 else "_raw")
            if twin is not None:
                target.set_ylabel(label, color=color, fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            (twin or ax).legend(lines, [line.get_label() for line in lines], fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _reward_vs_kl(out: Path, path: Path, plt) -> Path | None:
    panels = []
    for run, title, reward_label in (("ppo", "PPO (beta 0.2)", "RM reward"),
                                     ("grpo", "GRPO (beta 0, KL tracked)", "verifier reward")):
        records = read_metrics(out / run)
        if any(isinstance(r.get("policy/kl"), (int, float)) for r in records):
            panels.append((title, reward_label, records))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, reward_label, records) in zip(axes.flat, panels):
        for key, label in (("rollout/reward_mean", reward_label), ("rollout/gold_reward", "gold reward")):
            points = sorted(zip(*_series(records, key, "policy/kl")))
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            dots = ax.plot(xs, ys, marker=".", linestyle="none", alpha=0.35)[0]
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 8)), color=dots.get_color(), label=label)
        ax.set_title(f"{title}: rollout reward against KL to SFT", fontsize=11)
        ax.set_xlabel("KL to the SFT model (nats per reply, rollouts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _scaling(summary: dict, path: Path, plt) -> Path | None:
    curve = summary.get("best_of_n", {}).get("curve")
    if not curve:
        return None
    ns = [p["n"] for p in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.4, 3.6))
    for key, label in (("reward_model_gold", "RM picks: gold"), ("verifier_gold", "verifier picks: gold")):
        if key in curve[0]:
            left.plot(ns, [p[key] for p in curve], marker="o", label=label)
    left.set_ylabel("gold reward")
    twin = left.twinx()
    twin.plot(ns, [p["pass_at_n"] for p in curve], marker="s", color="gray", linestyle="--", label="pass@n")
    twin.set_ylabel("pass@n")
    left.set_title("Best-of-n: gold reward of the picks", fontsize=11)
    left.legend(loc="upper left", fontsize=9)
    twin.legend(loc="lower right", fontsize=9)
    for key, label in (("reward_model_proxy", "RM picks: RM score"), ("verifier_proxy", "verifier picks: RM score")):
        if key in curve[0]:
            right.plot(ns, [p[key] for p in curve], marker="o", label=label)
    right.set_title("Best-of-n: proxy (RM) score of the picks", fontsize=11)
    right.set_ylabel("RM score")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("n (samples of the SFT model per prompt)")
        ax.grid(alpha=0.3)
    if right.lines:
        right.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _over_optimization(summary: dict, path: Path, plt) -> Path | None:
    over = summary.get("over_optimization")
    if not over or not over.get("curve"):
        return None
    curve = over["curve"]
    kls = [p["kl"] for p in curve]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(kls, [p["proxy"] for p in curve], marker="o", label="proxy: RM reward")
    ax.set_ylabel("RM reward")
    twin = ax.twinx()
    twin.plot(kls, [p["gold"] for p in curve], marker="s", color="tab:red", label="gold reward")
    twin.set_ylabel("gold reward")
    twin.annotate("gold peak", (over["peak_kl"], over["peak_gold"]), textcoords="offset points", xytext=(8, -12),
                  fontsize=9, color="tab:red")
    ax.set_xlabel("KL to the SFT model (nats per reply)")
    ax.set_title(f"Over-optimization: GRPO against the RM alone (beta 0, windows of {over.get('window', '?')} steps)",
                 fontsize=11)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def make_plots(out: Path, summary: dict, plot_dir: Path) -> list[tuple[str, str, Path]]:
    """The report's plots as PNG files in ``plot_dir``: ``[(title, caption, path)]`` for those with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    made = [
        ("Training curves", "Per step (faint) and smoothed: SFT's loss, the reward model's loss, DPO's loss and "
         "implicit-reward accuracy, and the rollouts' reward and gold reward of PPO, GRPO and the "
         "over-optimization run.", _training_curves(out, plot_dir / "training_curves.png", plt)),
        ("Reward against KL, per RL stage", "Each point is one step's rollouts: PPO's reward is the RM's score (KL "
         "penalty in the reward), GRPO's the math verifier's; the gold reward judges both.",
         _reward_vs_kl(out, plot_dir / "reward_vs_kl.png", plt)),
        ("Inference-time scaling", "Best-of-n on the held-out prompts from the SFT model's samples at T = 1: each "
         "selector picks one of the first n samples; pass@n is the share of prompts with a right answer among n.",
         _scaling(summary, plot_dir / "scaling.png", plt)),
        ("Over-optimization", "GRPO against the reward model with no KL penalty: the proxy (RM) reward keeps rising "
         "while the gold reward peaks and falls as the policy drifts from SFT (means over windows of steps).",
         _over_optimization(summary, plot_dir / "over_optimization.png", plt)),
    ]
    return [(title, caption, path) for title, caption, path in made if path is not None]


# ---- example replies ----------------------------------------------------------------------------------------------

def _read_samples(out: Path, name: str) -> list[dict]:
    import json

    path = out / f"samples_{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), str(prompt))


def example_replies(out: Path, stage_keys: list[str], k: int = EXAMPLE_PROMPTS) -> list[dict]:
    """Greedy replies of every stage to the same ``k`` held-out prompts, one per request style where there are
    (``[{"prompt", "answer", "style", "replies": [(stage key, text, gold, right, follows)]}]``)."""
    from posttrain.world.gold import gold_reward, parse_final_answer
    from posttrain.world.requests import follows_request, request_of

    replies = {key: _read_samples(out, key) for key in stage_keys}
    replies = {key: rows for key, rows in replies.items() if rows}
    if not replies:
        return []
    first = next(iter(replies.values()))
    chosen, styles = [], set()
    for i, row in enumerate(first):  # a prompt per request style first, then any
        style = request_of(row["prompt"])
        if style is not None and style not in styles:
            chosen.append(i)
            styles.add(style)
        if len(chosen) == k:
            break
    chosen += [i for i in range(len(first)) if i not in chosen][: k - len(chosen)]
    examples = []
    for i in sorted(chosen):
        prompt, answer = first[i]["prompt"], first[i].get("answer")
        entry = {"prompt": _user_text(prompt), "answer": answer, "style": request_of(prompt), "replies": []}
        for key, rows in replies.items():
            if i < len(rows):
                text = rows[i]["completion"]
                entry["replies"].append((key, text, gold_reward(prompt, text),
                                         answer is not None and parse_final_answer(text) == int(answer),
                                         follows_request(prompt, text)))
        examples.append(entry)
    return examples


# ---- the documents ------------------------------------------------------------------------------------------------

RM_LABELS = {
    "pair_accuracy": "all held-out pairs",
    "pair_accuracy_request": "request pairs (which reply follows the asked style)",
    "pair_accuracy_request_shorter": "request pairs whose preferred reply is the shorter",
    "pair_accuracy_request_unseen_phrasing": "request pairs with unseen phrasings",
    "pair_accuracy_surface": "surface pairs (format, stopping)",
    "pair_accuracy_answer_check": "answer-check pairs (right vs wrong answer)",
    "pair_accuracy_near_tie": "near ties (the annotators' length bias decides)",
    "counterfactual_flip_rate": "counterfactual flips (same replies, the request changed)",
    "length_correlation": "correlation of the score with length",
}


def _scalars(report: dict) -> list[tuple[str, object]]:
    return [(key, value) for key, value in report.items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and key not in ("plot", "model")]


def _fmt_scalar(value) -> str:
    if isinstance(value, float):
        return _number(value, "{:.3f}")
    return str(value)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _stage_label(key: str) -> str:
    return next((label for k, label, _ in STAGES if k == key), key)


def _html(summary: dict, rows: list[dict], plots, examples, n_prompts: int) -> str:
    e = html.escape
    best = _best(rows)
    sft = summary.get("stages", {}).get("sft")
    seconds = summary.get("seconds")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>posttrain demo report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>posttrain demo: the post-training tour on the tiny world</h1>",
             f"<p class='sub'>base → SFT → reward model → best-of-N and rejection sampling → DPO → PPO → GRPO → "
             f"evaluation on {n_prompts} held-out prompts against the world's gold reward. Total time "
             f"{_number(seconds, '{:.0f}')} s.</p>",
             "<h2>Verdicts</h2><table class='verdicts'><tr><th></th><th class='name'>stage</th>"
             "<th class='text'>against SFT</th><th class='text'>what it is</th>"
             "</tr>"]
    signs = {1: "pos", -1: "neg", 0: ""}
    for row in rows:
        tag, items = verdict_items(row, sft)
        changes = " · ".join(f"<span class='{signs[sign]}'>{e(text)}</span>" for text, sign in items)
        parts.append(f"<tr><td><span class='tag {tag}'>{TAG_TEXT[tag]}</span></td><td class='name'>"
                     f"{e(row['label'])}</td><td class='left'>{changes}</td><td class='about'>{e(row['about'])}"
                     "</td></tr>")
    parts.append(f"</table><p class='note'>{e(VERDICT_NOTE)}</p><h2>Stages</h2><table><tr><th class='name'>stage</th>")
    parts += [f"<th>{e(header)}</th>" for _, header, _, _ in COLUMNS]
    parts.append("</tr>")
    for row in rows:
        parts.append(f"<tr class='{'pick' if row['pick'] else ''}'><td class='name' title='{e(row['about'])}'>"
                     f"{e(row['label'])}</td>")
        for key, _, _, fmt in COLUMNS:
            value = row["values"].get(key)
            hit = (not row["pick"] and row["key"] != "base" and key in best and isinstance(value, (int, float))
                   and value == best[key])
            parts.append(f"<td class='{'best' if hit else ''}'>{_number(value, fmt)}</td>")
        parts.append("</tr>")
    parts.append(f"</table><p class='note'>{e(TABLE_NOTE)}</p>")
    parts.append("<h2>Plots</h2>")
    for title, caption, path in plots:
        parts.append(f"<figure><h3>{e(title)}</h3><img alt='{e(title)}' src='{_data_uri(path)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if examples:
        parts.append("<h2>Example replies (greedy, held-out prompts)</h2>")
        for i, ex in enumerate(examples, 1):
            asked = f"asks for a <b>{e(ex['style'])}</b> reply; " if ex["style"] else "no style asked; "
            parts.append(f"<h3>{i}. {e(ex['prompt'])}</h3><p class='note'>{asked}right answer: "
                         f"{e(str(ex['answer']))}</p><table class='examples'><tr><th class='name'>stage</th>"
                         "<th class='text'>reply</th>"
                         "<th>gold</th><th>right</th><th>follows request</th></tr>")
            for key, text, gold, right, follows in ex["replies"]:
                mark = "–" if follows is None else ("<span class='ok'>yes</span>" if follows
                                                    else "<span class='no'>no</span>")
                parts.append(f"<tr><td class='name'>{e(_stage_label(key))}</td><td class='text'>{e(text)}</td>"
                             f"<td>{gold:.2f}</td><td>{'<span class=ok>✓</span>' if right else '✗'}</td>"
                             f"<td>{mark}</td></tr>")
            parts.append("</table>")
    if rm := summary.get("reward_model"):
        parts.append("<h2>The reward model against the gold reward</h2><p class='note'>Bradley-Terry, trained from "
                     "the SFT model on the annotators' noisy, length-biased pairs; accuracy on held-out pairs by "
                     "kind.</p><table><tr><th class='name'>measure</th><th>value</th></tr>")
        for key, label in RM_LABELS.items():
            if key in rm:
                parts.append(f"<tr><td class='name'>{e(label)}</td><td>{_number(rm[key], '{:.3f}')}</td></tr>")
        parts.append("</table>")
    details = _details(summary)
    if details:
        parts.append("<h2>Stage reports</h2><div class='cards'>")
        for title, items in details:
            parts.append(f"<div><h3>{e(title)}</h3><table>")
            parts += [f"<tr><td class='name'>{e(k)}</td><td>{e(_fmt_scalar(v))}</td></tr>" for k, v in items]
            parts.append("</table></div>")
        parts.append("</div>")
    if times := summary.get("stage_seconds"):
        longest = max(times.values()) or 1.0
        parts.append(f"<h2>Time of each stage</h2><table><tr><th class='name'>stage</th><th>seconds</th>"
                     f"<th class='name'></th></tr>")
        for name, value in times.items():
            parts.append(f"<tr><td class='name'>{e(name)}</td><td>{value:.0f}</td><td class='name'>"
                         f"<span class='bar' style='width:{int(300 * value / longest)}px'></span></td></tr>")
        parts.append(f"<tr><td class='name'>total</td><td>{_number(seconds, '{:.0f}')}</td><td></td></tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


VERDICT_NOTE = (
    "gold, accuracy, requests (request following), RM score: the change against SFT; KL: to SFT, nats per reply; "
    "wins: the share of held-out prompts where the stage's greedy reply beats SFT's under the gold reward. better: "
    "gold up and wins over half; worse: both down; mixed: otherwise."
)
TABLE_NOTE = (
    "Greedy replies to the held-out prompts, scored against the world's gold reward. format: ends with 'The answer "
    "is N.' and stops; accuracy: the final answer is right; request following: the reply has the style the prompt "
    "asks for (among prompts that ask); gold reward: the world's true reward; proxy (RM) reward: the demo's "
    "Bradley-Terry reward model's score; KL to SFT: Monte-Carlo KL(policy || SFT) per reply from 4 samples on 100 "
    "held-out prompts (base: none, it is not a fine-tune of SFT); win-rate vs SFT: the share of prompts where the "
    "stage's greedy reply has a higher gold reward than SFT's greedy reply (ties half; DPO's stage report also "
    "gives a sampled one). Best-of-N rows (italic) pick among the SFT model's samples at T = 1 (format: the "
    "closing sentence only, stopping is not recorded for samples); their KL is the analytic bound log n - (n-1)/n. "
    "Green: the best trained policy per column (KL and length have no better direction)."
)


def _details(summary: dict) -> list[tuple[str, list[tuple[str, object]]]]:
    """The scalar numbers of the other stage reports: best-of-N, rejection sampling, DPO, PPO, over-optimization."""
    sections = []
    if bon := summary.get("best_of_n"):
        sections.append((f"Best-of-{bon.get('n', 'N')}", _scalars(bon)))
    for name, rs in summary.get("rejection_sampling", {}).items():
        sections.append((f"Rejection sampling ({name})", _scalars(rs)))
    for key, title in (("dpo", "DPO"), ("ppo", "PPO"), ("over_optimization", "Over-optimization")):
        if report := summary.get(key):
            sections.append((title, _scalars(report)))
    return [(title, items) for title, items in sections if items]


def _markdown(summary: dict, rows: list[dict], plots, examples, out: Path) -> str:
    sft = summary.get("stages", {}).get("sft")
    lines = ["# posttrain demo: the post-training tour on the tiny world", "",
             f"Total time {_number(summary.get('seconds'), '{:.0f}')} s. The self-contained version of this report "
             "is `report.html`.", "", "## Verdicts", ""]
    for row in rows:
        tag, sentence = verdict(row, sft)
        lines.append(f"- **{row['label']}** ({TAG_TEXT[tag]}): {sentence}. *{row['about']}*")
    lines += ["", VERDICT_NOTE, "", "## Stages", "", "| stage | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
              "|---|" + "---:|" * len(COLUMNS)]
    best = _best(rows)
    for row in rows:
        cells = []
        for key, _, _, fmt in COLUMNS:
            value = row["values"].get(key)
            text = _number(value, fmt)
            hit = (not row["pick"] and row["key"] != "base" and key in best and isinstance(value, (int, float))
                   and value == best[key])
            cells.append(f"**{text}**" if hit else text)
        label = f"*{row['label']}*" if row["pick"] else row["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", TABLE_NOTE.replace("(italic)", "(in italics)").replace("Green", "Bold"), "", "## Plots", ""]
    for title, caption, path in plots:
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", "", caption, ""]
    if examples:
        lines += ["## Example replies (greedy, held-out prompts)", ""]
        for i, ex in enumerate(examples, 1):
            asked = f"asks for a **{ex['style']}** reply" if ex["style"] else "no style asked"
            lines += [f"### {i}. {ex['prompt']}", "", f"{asked}; right answer: {ex['answer']}", "",
                      "| stage | reply | gold | right | follows request |", "|---|---|---:|:-:|:-:|"]
            for key, text, gold, right, follows in ex["replies"]:
                reply = text.replace("|", "\\|").replace("\n", "<br>")
                mark = "–" if follows is None else ("yes" if follows else "no")
                lines.append(f"| {_stage_label(key)} | {reply} | {gold:.2f} | {'✓' if right else '✗'} | {mark} |")
            lines.append("")
    if rm := summary.get("reward_model"):
        lines += ["## The reward model against the gold reward", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {label} | {_number(rm[key], '{:.3f}')} |" for key, label in RM_LABELS.items() if key in rm]
        lines.append("")
    for title, items in _details(summary):
        lines += [f"### {title}", "", "| | |", "|---|---:|"]
        lines += [f"| {k} | {_fmt_scalar(v)} |" for k, v in items]
        lines.append("")
    if times := summary.get("stage_seconds"):
        lines += ["## Time of each stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {value:.0f} |" for name, value in times.items()]
        lines += [f"| total | {_number(summary.get('seconds'), '{:.0f}')} |", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, summary: dict) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (plots in ``report/``) into ``out_dir`` from the
    demo's ``summary`` and the run directories under ``out_dir``; returns ``(html_path, md_path)``."""
    out = Path(out_dir)
    rows = stage_rows(summary)
    plots = make_plots(out, summary, out / "report")
    examples = example_replies(out, [key for key, _, _ in STAGES if key in summary.get("stages", {})])
    html_path, md_path = out / "report.html", out / "report.md"
    n_prompts = len(_read_samples(out, "sft"))
    html_path.write_text(_html(summary, rows, plots, examples, n_prompts), encoding="utf-8")
    md_path.write_text(_markdown(summary, rows, plots, examples, out), encoding="utf-8")
    return html_path, md_path
