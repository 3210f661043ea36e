"""``posttrain overopt``: the curves' arithmetic with hand-derived values, and one small run end to end."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.stages.overopt import (OveroptConfig, best_of_n_curve, best_of_n_expectation, calibration,
                                      curve_summary, parse_sizes, run_overopt)


def test_best_of_n_expectation_by_hand():
    """Selector [0.1, 0.4, 0.2, 0.3], values [1, 2, 3, 4]. In ascending selector order the values are 1, 3, 4, 2;
    the i-th (1-based) is the pick of a random 2-subset with probability C(i-1, 1) / C(4, 2) = 0, 1/6, 2/6, 3/6:
    E = (3 * 1 + 4 * 2 + 2 * 3) / 6 = 17/6. n = 1: the plain mean 10/4. n = 4: the top one's value, 2. Enumerating
    the six 2-subsets gives 17/6 too: {1,2}->2 {1,3}->3 {1,4}->4 {2,3}->2 {2,4}->2 {3,4}->4, sum 17."""
    selector, values = [0.1, 0.4, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0]
    assert best_of_n_expectation(selector, values, 2) == pytest.approx(17 / 6, abs=1e-12)
    assert best_of_n_expectation(selector, values, 1) == pytest.approx(2.5, abs=1e-12)
    assert best_of_n_expectation(selector, values, 4) == pytest.approx(2.0, abs=1e-12)
    with pytest.raises(ValueError):
        best_of_n_expectation(selector, values, 5)


def test_best_of_n_expectation_matches_enumerating_subsets_with_ties():
    """Equal selector scores: the earlier sample wins, as ``select_top_per_prompt`` picks; the estimator equals the
    average over every n-subset of its pick's value."""
    import itertools

    selector, values = [0.5, 0.2, 0.5, 0.9, 0.2], [1.0, -2.0, 3.0, 0.5, 7.0]
    for n in range(1, 6):
        picks = [max(subset, key=lambda j: (selector[j], -j)) for subset in itertools.combinations(range(5), n)]
        expected = sum(values[j] for j in picks) / len(picks)
        assert best_of_n_expectation(selector, values, n) == pytest.approx(expected, abs=1e-12)


def test_calibration_matches_the_golds_mean_and_spread():
    """proxy [0, 2, 4] (mean 2, population std sqrt(8/3)); gold [1, 2, 3] (mean 2, std sqrt(2/3)): scale = 1/2,
    shift = 2 - 1/2 * 2 = 1, so the proxy maps to [1, 2, 3]. A constant proxy: scale 1, the mean matched."""
    scale, shift = calibration([0.0, 2.0, 4.0], [1.0, 2.0, 3.0])
    assert (scale, shift) == pytest.approx((0.5, 1.0), abs=1e-12)
    assert calibration([5.0, 5.0], [1.0, 3.0]) == pytest.approx((1.0, -3.0), abs=1e-12)


def test_best_of_n_curve_points_and_kl():
    """Two prompts of 4 samples, the selector the gold itself (scale 1, shift 0): n = 1, 2, 4 at KL 0,
    log 2 - 1/2 = 0.19315, log 4 - 3/4 = 0.63629; gold = proxy; at n = 4 the mean of the two maxima (4 + 1) / 2."""
    gold = [[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 0.0]]
    points = best_of_n_curve(gold, gold, 1.0, 0.0)
    assert [p["n"] for p in points] == [1, 2, 4]
    assert [p["kl"] for p in points] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75], abs=1e-12)
    assert [p["sqrt_kl"] for p in points] == pytest.approx([math.sqrt(p["kl"]) for p in points], abs=1e-12)
    assert points[0]["gold"] == pytest.approx((2.5 + 0.25) / 2, abs=1e-12)
    assert points[-1]["gold"] == pytest.approx(2.5, abs=1e-12)
    assert all(p["gold"] == pytest.approx(p["proxy"]) for p in points)


def test_curve_summary_finds_the_gold_peak():
    points = [{"kl": 0.0, "gold": 1.0, "proxy": 1.0}, {"kl": 1.0, "gold": 1.3, "proxy": 1.4},
              {"kl": 4.0, "gold": 1.3, "proxy": 1.9}, {"kl": 9.0, "gold": 0.8, "proxy": 2.5}]
    summary = curve_summary(points)
    assert summary["peak_gold"] == 1.3 and summary["peak_kl"] == 1.0  # the first of equal peaks
    assert (summary["final_gold"], summary["final_kl"]) == (0.8, 9.0)
    assert summary["gold_drop_from_peak"] == pytest.approx(0.5)
    assert summary["proxy_monotone"] and (summary["first_proxy"], summary["final_proxy"]) == (1.0, 2.5)
    assert not curve_summary(points[:2] + [{"kl": 2.0, "gold": 0.0, "proxy": 1.2}])["proxy_monotone"]


def test_parse_sizes():
    assert parse_sizes("2000, 500,500") == [500, 2000]
    for bad in ("", "0,10", "ten"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_overopt_end_to_end_small(world, tiny_model_dir, tmp_path):
    """The smallest study on the tiny world from a random tiny model: two proxy RMs (2 and 4 steps), best-of-4 on 6
    held-out prompts and 2 PPO steps each; the files and the curves' structure, and a rerun that reuses every run."""
    from posttrain.cli import main

    out = tmp_path / "overopt"
    options = dict(out=str(out), model=str(tiny_model_dir), rm_pairs="64,32", bon_n=4, bon_prompts=6, rl_steps=2,
                   rl_batch_size=2, rl_group_size=2, window=1, max_new_tokens=12, device="cpu", progress=False)
    assert main(["overopt", *(f"--{key}={value}" for key, value in options.items())]) == 0
    saved = json.loads((out / "overopt.json").read_text())
    assert (out / "overopt.png").stat().st_size > 1000
    assert {(c["rm_pairs"], c["method"]) for c in saved["curves"]} == {(32, "best_of_n"), (64, "best_of_n"),
                                                                       (32, "ppo"), (64, "ppo")}
    for pairs in (32, 64):
        bon = [p for p in saved["points"] if p["rm_pairs"] == pairs and p["method"] == "best_of_n"]
        assert [p["n"] for p in bon] == [1, 2, 4]
        assert bon[0]["kl"] == 0.0 and bon[0]["gold"] == pytest.approx(saved["sft_gold"], abs=1e-9)
        assert bon[0]["proxy"] == pytest.approx(saved["sft_gold"], abs=1e-9)  # calibrated: the gold's mean at n = 1
        rl = [p for p in saved["points"] if p["rm_pairs"] == pairs and p["method"] == "ppo"]
        assert [p["step"] for p in rl] == [1, 2]
        for p in bon + rl:
            assert set(p) >= {"rm_pairs", "method", "kl", "sqrt_kl", "gold", "proxy", "proxy_raw"}
            assert p["sqrt_kl"] == pytest.approx(math.sqrt(max(p["kl"], 0.0)))
        proxy = saved["proxies"][str(pairs)]
        assert rl[0]["proxy"] == pytest.approx(proxy["scale"] * rl[0]["proxy_raw"] + proxy["shift"])
        assert len((out / "data" / f"preference_{pairs}.jsonl").read_text().splitlines()) == pairs
        assert json.loads((out / f"rm_{pairs}" / "model" / "complete.json").read_text())["steps"] == pairs // 16
    for curve in saved["curves"]:
        points = [p for p in saved["points"] if (p["rm_pairs"], p["method"]) == (curve["rm_pairs"], curve["method"])]
        assert curve["peak_gold"] == max(p["gold"] for p in points)
        assert curve["final_gold"] == points[-1]["gold"]

    weights = {d: (out / d / "model" / "model.safetensors").stat().st_mtime_ns for d in ("rm_32", "rm_64", "rl_32")}
    again = run_overopt(OveroptConfig(**options))  # every RM and RL run complete: reused as they are
    assert again["points"] == saved["points"] and again["curves"] == saved["curves"]
    assert {d: (out / d / "model" / "model.safetensors").stat().st_mtime_ns for d in weights} == weights


def test_cli_overopt_help_and_a_bad_size(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["overopt", "--help"]) == 0
    assert "--rm_pairs" in capsys.readouterr().out
    assert main(["overopt", "--rm_pairs=ten", f"--model={tmp_path}", f"--out={tmp_path / 'o'}"]) == 2
    assert "--rm_pairs" in capsys.readouterr().err
    assert main(["overopt", "--bon_n=0", "--rl_steps=0", f"--model={tmp_path}", f"--out={tmp_path / 'o'}"]) == 2
    assert "nothing would be optimised" in capsys.readouterr().err
