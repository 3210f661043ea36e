"""The demo's report (posttrain.stages.report) on a small fake summary and fake run directories: no model, fast."""

from __future__ import annotations

import base64
import json
import re

import pytest

from posttrain.stages.report import COLUMNS, STAGES, stage_rows, verdict, write_report

STAGE_KEYS = [key for key, _, _ in STAGES]
PROMPTS = [
    ([{"role": "user", "content": "What is 3 + 4? Keep it short."}], 7),
    ([{"role": "user", "content": "What is 5 * 6? Show your work."}], 30),
    ([{"role": "user", "content": "What is 9 - 2?"}], 7),
]


def _stage(i: int) -> dict:
    return {"format_rate": 0.9, "accuracy": 0.5 + 0.05 * i, "request_rate": 0.4 + 0.03 * i,
            "gold_reward": 1.0 + 0.1 * i, "mean_length": 24.0 + i, "stop_rate": 1.0, "proxy_reward": -0.2 + 0.1 * i,
            "kl_to_sft": None if i == 0 else 0.3 * i, "win_rate_vs_sft": 0.5 + 0.01 * i,
            "request_rate_by_style": {"terse": 0.5}}


def _fake_summary() -> dict:
    curve = [{"n": n, "kl_bound": 0.1 * n, "pass_at_n": 0.5 + 0.02 * n, "reward_model_gold": 1.0 + 0.01 * n,
              "verifier_gold": 1.1 + 0.02 * n, "reward_model_proxy": 0.1 * n, "verifier_proxy": 0.05 * n,
              "reward_model_accuracy": 0.5, "verifier_accuracy": 0.8} for n in (1, 2, 4, 8, 16)]
    pick = {"format_rate": 0.95, "accuracy": 0.6, "request_rate": 0.8, "gold_reward": 1.3, "proxy_reward": 0.9,
            "mean_length": 26.0, "win_rate_vs_sft": 0.6, "kl_to_sft": 1.83}
    return {
        "stages": {key: _stage(i) for i, key in enumerate(STAGE_KEYS)},
        "reward_model": {"loss": "bt", "model": "/x/rm/model", "pair_accuracy": 0.8, "pair_accuracy_request": 0.95,
                         "length_correlation": 0.2},
        "best_of_n": {"n": 16, "prompts": 3, "single_gold": 1.0, "curve": curve,
                      "picks": {"reward_model": pick, "verifier": {**pick, "accuracy": 0.9}}},
        "rejection_sampling": {"rm": {"selector": "reward model (bt)", "selected": 1000, "eval_gold_before": 1.0,
                                      "eval_gold_after": 1.1}},
        "dpo": {"loss": "dpo_nll", "win_rate_vs_sft": 0.6, "kl_to_reference": 0.5},
        "ppo": {"reward": "rm:/x", "beta": 0.2, "kl": 0.6},
        "over_optimization": {"window": 5, "peak_gold": 1.2, "peak_kl": 1.0, "final_gold": 0.8, "final_kl": 9.0,
                              "plot": "/x/overopt/plots/reward_vs_kl.png",
                              "curve": [{"steps": [1, 5], "kl": 0.5, "proxy": 0.3, "gold": 1.1},
                                        {"steps": [6, 10], "kl": 1.0, "proxy": 0.5, "gold": 1.2},
                                        {"steps": [11, 15], "kl": 9.0, "proxy": 0.9, "gold": 0.8}]},
        "seconds": 512.3, "stage_seconds": {"world": 1.0, "sft": 120.4, "dpo": 110.0},
    }


@pytest.fixture
def fake_out(tmp_path):
    """A demo --out with metrics.jsonl for each training run and greedy replies for each stage."""
    for run, keys in {"sft": ["train/loss", "eval/loss"], "rm": ["train/loss"], "dpo": ["train/loss"],
                      "ppo": ["rollout/reward_mean", "rollout/gold_reward", "policy/kl"],
                      "grpo": ["rollout/reward_mean", "rollout/gold_reward", "policy/kl"]}.items():
        (tmp_path / run).mkdir()
        lines = [json.dumps({"step": step, **{key: 1.0 / step + 0.01 * i for i, key in enumerate(keys)}})
                 for step in range(1, 21)]
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for i, key in enumerate(STAGE_KEYS):
        with (tmp_path / f"samples_{key}.jsonl").open("w") as f:
            for prompt, answer in PROMPTS:
                reply = f"{key} says <b>|x|</b>. The answer is {answer + (i % 2)}."
                f.write(json.dumps({"prompt": prompt, "answer": answer, "completion": reply,
                                    "finish_reason": "stop"}) + "\n")
    return tmp_path


def test_report_is_self_contained_with_every_stage_row_and_embedded_images(fake_out):
    summary = _fake_summary()
    html_path, md_path = write_report(fake_out, summary)
    assert html_path == fake_out / "report.html" and md_path == fake_out / "report.md"
    page = html_path.read_text()
    # self-contained: no fetched asset, no script, every image a PNG data URI that decodes
    assert "http://" not in page and "https://" not in page and "<script" not in page
    sources = re.findall(r"src='([^']*)'", page) + re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4  # training curves, reward vs KL, scaling, over-optimization
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, label, _ in STAGES:  # every stage row and the best-of-N rows, every column
        assert f">{label}</td>" in page, label
    assert "best-of-16 (RM)" in page and "best-of-16 (verifier)" in page
    for _, header, _, _ in COLUMNS:
        assert header in page
    assert "&lt;b&gt;|x|&lt;/b&gt;" in page  # replies are escaped, not markup
    # markdown: same rows, images as relative PNG files
    md = md_path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 4 and all(not i.startswith("/") and (fake_out / i).stat().st_size > 1000 for i in images)
    for _, label, _ in STAGES:
        assert f"| {label} |" in md
    assert "\\|x\\|" in md  # a reply's pipes do not break the table


def test_stage_table_highlights_the_best_trained_policy_per_column(fake_out):
    """grpo (the last fake stage) has the highest accuracy among the trained policies: its cell is highlighted;
    best-of-N rows and base are not candidates; KL and length have no direction and are never highlighted."""
    summary = _fake_summary()
    page = write_report(fake_out, summary)[0].read_text()
    grpo_row = re.search(r"<tr class=''><td class='name'[^>]*>GRPO \(RLVR\)</td>(.*?)</tr>", page, re.S).group(1)
    cells = re.findall(r"<td class='([^']*)'>([^<]*)</td>", grpo_row)
    by_column = dict(zip([key for key, _, _, _ in COLUMNS], cells))
    assert by_column["accuracy"] == ("best", "0.80")
    assert by_column["kl_to_sft"][0] == "" and by_column["mean_length"][0] == ""
    assert "class='best'>0.95<" not in page  # the best-of-N pick's format rate is above every policy's


def test_report_without_optional_parts(tmp_path):
    """A summary of only base and SFT (the RM and RL stages skipped), no run directories: the report still writes,
    with no plots, the KL of base shown as a dash."""
    summary = {"stages": {"base": _stage(0), "sft": _stage(1)}, "seconds": 10.0}
    html_path, md_path = write_report(tmp_path, summary)
    page = html_path.read_text()
    assert "<img" not in page and ">SFT</td>" in page and ">base</td>" in page
    assert "| base | 0.90 | 0.50 | 0.40 | 1.000 | -0.200 | – |" in md_path.read_text()


def test_verdict_compares_with_sft():
    rows = stage_rows(_fake_summary())
    sft = next(r for r in rows if r["key"] == "sft")["values"]
    tag, sentence = verdict(next(r for r in rows if r["key"] == "grpo"), sft)
    assert tag == "up" and "gold +0.50" in sentence and "wins 56%" in sentence
    worse = {**sft, "gold_reward": sft["gold_reward"] - 0.3, "win_rate_vs_sft": 0.3}
    assert verdict({"key": "ppo", "about": "x", "pick": False, "values": worse}, sft)[0] == "down"
    assert verdict(next(r for r in rows if r["key"] == "sft"), sft)[0] == "ref"


def test_demo_report_only_rebuilds_the_report_from_an_existing_out(fake_out):
    """`posttrain demo --report_only=true` reads --out's summary.json and writes the report, training nothing."""
    from posttrain.stages.demo import DemoConfig, run_demo

    summary = _fake_summary()
    (fake_out / "summary.json").write_text(json.dumps(summary))
    assert run_demo(DemoConfig(out=str(fake_out), report_only=True, progress=False)) == summary
    assert (fake_out / "report.html").exists() and (fake_out / "report.md").exists()
    assert not (fake_out / "sft" / "model").exists()
