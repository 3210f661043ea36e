"""generate -> score -> select -> bon on the command line, the reward-spec parser and bad inputs."""

from __future__ import annotations

import json

import pytest
import yaml

from posttrain.stages.bestofn import reward_matrix, select_rows
from posttrain.cli import main
from posttrain.rewards import GoldReward, VerifierReward, WeightedSum, reward_from_spec
from posttrain.rewards.verifiers import math_answer


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("bon") / "prompts.jsonl"
    path.write_text("\n".join((world.data / "rl_heldout.jsonl").read_text().splitlines()[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def generated(world_with_base, prompts):
    out = prompts.parent / "gen.jsonl"
    code = main(["generate", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}",
                 "--n=4", "--max_new_tokens=12", "--seed=3", "--logprobs=true", "--device=cpu"])
    assert code == 0
    return out


def test_generate_writes_n_completions_and_keeps_columns(generated, prompts):
    rows = _rows(generated)
    source = _rows(prompts)
    assert len(rows) == 6
    for row, src in zip(rows, source):
        assert row["prompt"] == src["prompt"] and row["answer"] == src["answer"]  # other columns carried through
        assert len(row["completions"]) == len(row["lengths"]) == len(row["finish_reasons"]) == 4
        assert [len(lp) for lp in row["logprobs"]] == row["lengths"]
        assert all(lp <= 0.0 for lps in row["logprobs"] for lp in lps)


def test_generate_refuses_to_overwrite(generated, world_with_base, prompts, capsys):
    code = main(["generate", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={generated}"])
    assert code == 2 and "exists" in capsys.readouterr().err


def test_score_select_pairs(generated, tmp_path):
    scored = tmp_path / "scored.jsonl"
    assert main(["score", f"--data={generated}", "--reward=0.5*gold+0.5*verifier:math", f"--out={scored}"]) == 0
    rows = _rows(scored)
    gold = GoldReward()
    for row in rows:
        expected = [0.5 * g + 0.5 * math_answer(c, row["answer"])
                    for g, c in zip(gold([row["prompt"]] * 4, row["completions"]), row["completions"])]
        assert row["rewards"] == pytest.approx(expected)

    best = tmp_path / "best.jsonl"
    assert main(["select", f"--data={scored}", f"--out={best}"]) == 0
    picked = _rows(best)
    assert len(picked) == 6
    for row, pick in zip(rows, picked):
        best = max(range(4), key=lambda j: (row["rewards"][j], -j))  # the first of the highest
        assert pick["messages"] == row["prompt"] + [{"role": "assistant", "content": row["completions"][best]}]
        assert pick["reward"] == row["rewards"][best]

    top = tmp_path / "top.jsonl"
    assert main(["select", f"--data={scored}", "--strategy=top_k", "--k=5", f"--out={top}"]) == 0
    flat = sorted((r for row in rows for r in row["rewards"]), reverse=True)
    assert [p["reward"] for p in _rows(top)] == pytest.approx(flat[:5])

    pairs = tmp_path / "pairs.jsonl"
    assert main(["select", f"--data={scored}", "--pairs=best_worst", f"--out={pairs}"]) == 0
    for pair in _rows(pairs):
        assert pair["reward_chosen"] > pair["reward_rejected"]
        assert set(pair) >= {"prompt", "chosen", "rejected", "answer"}
    every = tmp_path / "every.jsonl"
    assert main(["select", f"--data={scored}", "--pairs=all", "--pairs_per_prompt=2", f"--out={every}"]) == 0
    by_prompt: dict[str, list[dict]] = {}
    for pair in _rows(every):
        assert pair["reward_chosen"] > pair["reward_rejected"] and pair["chosen"] != pair["rejected"]
        by_prompt.setdefault(json.dumps(pair["prompt"]), []).append(pair)
    assert len(_rows(every)) >= len(_rows(pairs)) and max(len(v) for v in by_prompt.values()) <= 2


def test_select_needs_rewards(generated, tmp_path, capsys):
    code = main(["select", f"--data={generated}", f"--out={tmp_path / 'x.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2 and "gen.jsonl" in err and "line 1" in err and "'rewards'" in err


def test_select_rows_book_example():
    R = [[.7, .3, .5, .2], [.4, .8, .6, .5], [.9, .3, .4, .7], [.2, .5, .8, .6], [.5, .4, .3, .6]]
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completions": [f"c{i}{j}" for j in range(4)],
             "rewards": r} for i, r in enumerate(R)]
    assert [r["messages"][-1]["content"] for r in select_rows(rows, "top_per_prompt")] == ["c00", "c11", "c20", "c32",
                                                                                            "c43"]
    assert [r["messages"][-1]["content"] for r in select_rows(rows, "top_k", k=5)] == ["c20", "c11", "c32", "c00",
                                                                                       "c23"]


def test_bon_cli_picks_what_generate_then_score_picks(world_with_base, generated, prompts, tmp_path, capsys):
    """`bon` samples exactly what `generate` samples with the same seed and settings, and its pick of each prompt is
    the completion with the highest reward in the reward matrix that `score` wrote for those samples."""
    scored = tmp_path / "scored.jsonl"
    assert main(["score", f"--data={generated}", "--reward=gold", f"--out={scored}"]) == 0
    out = tmp_path / "bon.jsonl"
    code = main(["bon", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}", "--n=4",
                 "--max_new_tokens=12", "--seed=3", "--reward=gold", "--report_reward=verifier:math", "--device=cpu"])
    assert code == 0
    assert "best-of-4" in capsys.readouterr().out
    picks, rows = _rows(out), _rows(scored)
    assert len(picks) == len(rows) == 6
    for pick, row in zip(picks, rows):
        best = max(range(4), key=lambda j: (row["rewards"][j], -j))  # the first of the highest
        assert (pick["index"], pick["n"]) == (best, 4)
        assert pick["completion"] == row["completions"][best] and pick["reward"] == row["rewards"][best]
        assert pick["answer"] == row["answer"]
        assert pick["report_reward"] == math_answer(pick["completion"], row["answer"])


def test_reward_specs(tmp_path):
    assert isinstance(reward_from_spec("gold"), GoldReward)
    assert isinstance(reward_from_spec("verifier:math"), VerifierReward)
    total = reward_from_spec("0.25*gold + 0.75*verifier:math")
    assert isinstance(total, WeightedSum) and [w for w, _ in total.components] == [0.25, 0.75]
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    assert total(prompts, ["2 + 3 = 5. The answer is 5.", "The answer is 6."], answer=["5", "5"]) == pytest.approx(
        [0.25 * GoldReward()(prompts[:1], ["2 + 3 = 5. The answer is 5."])[0] + 0.75, 0.25 * (0.3 + 0.4 + 0.2)])  # wrong, formatted, nothing asked: 0.9
    for bad in ["nope", "verifier:chess", "rm:/does/not/exist", "x*gold"]:
        with pytest.raises((ValueError, FileNotFoundError)):
            reward_from_spec(bad)


def test_math_answer_uses_math_verify():
    assert math_answer("5 + 7 = 12. 12 * 2 = 24. The answer is 24.", answer="24") == 1.0
    assert math_answer("The answer is 1/2.", answer="0.5") == 1.0  # equivalence, not string match
    assert math_answer("The answer is 23.", answer=24) == 0.0
    assert math_answer("I am not sure.", answer="24") == 0.0
    assert math_answer("The answer is 4.", answer=None) is None


def test_reward_matrix_shape_and_order():
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2",
             "completions": ["The answer is 2.", "The answer is 3.", "2"]},
            {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4",
             "completions": ["The answer is 5.", "The answer is 4.", "x"]}]
    assert reward_matrix(reward_from_spec("verifier:math"), rows) == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_scaling_table_hand_values():
    """2 prompts x 4 samples. Selector picks: n=1 -> sample 0; n=2 -> best of 0,1; n=4 -> best of all."""
    from posttrain.maths.selection import best_of_n_kl
    from posttrain.stages.scaling import scaling_table

    selector = [[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.8]]
    gold = [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    correct = [[False, True, False, True], [True, False, False, False]]
    answers = [[3, 4, 3, 4], [7, 5, 5, 6]]
    table = scaling_table(selector, gold, correct, answers, truths=[4, 7])
    assert [row["n"] for row in table] == [1, 2, 4]
    # picks: prompt 0 -> samples 0, 1, 1 (gold 0, 1, 1); prompt 1 -> samples 0, 0, 3 (gold 1, 1, 0)
    assert [row["best_of_n_gold"] for row in table] == [0.5, 1.0, 0.5]
    assert [row["best_of_n_reward"] for row in table] == pytest.approx([0.2, 0.6, 0.85])
    # pass@n over all 4 samples: prompt 0 (c=2): 0.5, 5/6, 1; prompt 1 (c=1): 0.25, 0.5, 1
    assert [row["pass_at_n"] for row in table] == pytest.approx([0.375, (5 / 6 + 0.5) / 2, 1.0])
    # maj@n: prompt 0 votes [3] wrong, [3,4] tie->3 wrong, [3,4,3,4] tie->3 wrong; prompt 1: [7] right, [7,5] tie->7
    # right, [7,5,5,6] -> 5 wrong
    assert [row["maj_at_n"] for row in table] == [0.5, 0.5, 0.0]
    assert [row["kl_best_of_n"] for row in table] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])


def test_scaling_command_writes_table_and_plot(world_with_base, prompts, tmp_path):
    out = tmp_path / "scaling"
    code = main(["scaling", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}",
                 "--n=4", "--max_new_tokens=12", "--reward=gold", "--gold=gold", "--device=cpu"])
    assert code == 0
    result = json.loads((out / "scaling.json").read_text())
    assert [row["n"] for row in result["table"]] == [1, 2, 4]
    best = [row["best_of_n_gold"] for row in result["table"]]
    assert best == sorted(best)  # selecting by the gold reward itself can only help
    passes = [row["pass_at_n"] for row in result["table"]]
    assert passes == sorted(passes)
    assert (out / "scaling.png").stat().st_size > 1000
    assert len(_rows(out / "samples.jsonl")) == 6


def test_rs_round_trains_on_the_selection_and_resumes(world_with_base, prompts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rs"
    args = ["rs", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}", "--rounds=1",
            "--n=3", "--max_new_tokens=10", "--reward=gold", f"--eval_prompts={prompts}", "--eval_n=2",
            "--device=cpu", "--progress=false", "--sft_batch_size=4"]
    assert main(args) == 0
    records = _rows(out / "rounds.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    round_1 = records[1]
    selected = _rows(out / "round_1" / "selected.jsonl")
    scored = _rows(out / "round_1" / "scored.jsonl")
    assert [s["reward"] for s in selected] == [max(r["rewards"]) for r in scored]
    assert [s["messages"][-1]["content"] for s in selected] == [
        r["completions"][r["rewards"].index(max(r["rewards"]))] for r in scored]
    assert round_1["selected"] == 6
    assert round_1["sample_reward"] == pytest.approx(sum(x for r in scored for x in r["rewards"]) / 18)
    assert round_1["selected_reward"] == pytest.approx(sum(max(r["rewards"]) for r in scored) / 6)
    assert (out / "round_1" / "sft" / "model" / "model.safetensors").exists()
    before = {name: (out / name).read_bytes() for name in ("rounds.jsonl", "round_1/scored.jsonl",
                                                          "round_1/sft/model/model.safetensors")}
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished round was redone")

    import posttrain.stages.rs as rs
    import posttrain.stages.sft as sft

    monkeypatch.setattr(rs, "load_engine", must_not_run)  # no sampling, no evaluation, no training
    monkeypatch.setattr(sft, "train_sft", must_not_run)
    assert main(args) == 0  # everything done: nothing is redone
    assert {name: (out / name).read_bytes() for name in before} == before


# ---------------------------------------------------------------------------------------------------------------
# Selection on chosen rewards: a fake engine and a reward whose values the test sets, so every pick is known.


class FakeEngine:
    """``generate(prompts, params)`` returning fixed completions per question (the last message's content)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table, self.calls = table, []

    def generate(self, prompts, params):
        from posttrain.models.generation import Completion

        self.calls.append((prompts, params))
        return [[Completion(text=t, token_ids=list(range(len(t.split()))), finish_reason="stop")
                 for t in self.table[p[-1]["content"]][: params.n]] for p in prompts]


def table_reward(values: dict[str, float | None]):
    """A reward that scores each completion with the value given for its text."""
    return lambda prompts, completions, **columns: [values[c] for c in completions]


def test_best_of_n_picks_the_first_highest_scored_completion():
    """Rewards chosen by hand; None = cannot score, never picked; ties go to the first; nothing scored -> index -1."""
    from posttrain.models.generation import SamplingParams
    from posttrain.stages.bestofn import best_of_n

    table = {"q0": ["a0", "a1", "a2", "a3"], "q1": ["b0", "b1", "b2", "b3"], "q2": ["c0", "c1", "c2", "c3"],
             "q3": ["d0", "d1", "d2", "d3"]}
    values = {"a0": 0.2, "a1": 0.9, "a2": 0.5, "a3": 0.9,  # tie of the highest: the first (a1)
              "b0": None, "b1": -1.0, "b2": -3.0, "b3": None,  # negatives, None skipped: b1
              "c0": None, "c1": None, "c2": None, "c3": None,  # nothing scored
              "d0": 0.1, "d1": 0.0, "d2": 0.3, "d3": 0.7}  # the last one
    engine = FakeEngine(table)
    prompt_rows = [([{"role": "user", "content": q}], {"answer": str(i)}) for i, q in enumerate(table)]
    params = SamplingParams(n=4, max_new_tokens=5, seed=9)
    picks, rows = best_of_n(engine, table_reward(values), prompt_rows, params)
    assert engine.calls == [([m for m, _ in prompt_rows], params)]
    assert [(p["index"], p["completion"], p["reward"]) for p in picks] == [
        (1, "a1", 0.9), (1, "b1", -1.0), (-1, None, None), (3, "d3", 0.7)]
    assert all(p["n"] == 4 for p in picks)
    assert [(p["prompt"], p["answer"]) for p in picks] == [(m, e["answer"]) for m, e in prompt_rows]
    assert [r["rewards"] for r in rows] == [[values[c] for c in table[q]] for q in table]


def test_bon_command_with_gold_reward_hand_values(monkeypatch, tmp_path, capsys):
    """`posttrain bon --reward=gold` on fixed completions (the engine is a fake). Gold rewards by hand
    (1.0 correct + 0.3 format + 0.4 request (none asked: 1) + 0.2 concision (nothing beyond the 9-word worked form)):
      What is 2 + 3?  "The answer is 6." 0.9; "2 + 3 = 5. The answer is 5." 1.9; "5" 1.6; "I think it is 5 or maybe
                      6" (last integer 6: wrong, 8 words) 0.6                                   -> pick 1
      What is 4 + 4?  "The answer is 8." 1.9; the 9-word solution 1.9; "The answer is 9." 0.9; "eight" 0.6
                                                                   -> pick 0 (a tie goes to the first)"""
    import posttrain.stages.bestofn as bestofn

    table = {"What is 2 + 3?": ["The answer is 6.", "2 + 3 = 5. The answer is 5.", "5", "I think it is 5 or maybe 6"],
             "What is 4 + 4?": ["The answer is 8.", "4 + 4 = 8. The answer is 8.", "The answer is 9.", "eight"]}
    engine = FakeEngine(table)
    loaded = []
    monkeypatch.setattr(bestofn, "load_engine", lambda path, **kwargs: loaded.append(path) or engine)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n"
                       + json.dumps({"prompt": "What is 4 + 4?", "answer": "8"}) + "\n")
    out = tmp_path / "bon.jsonl"
    assert main(["bon", "--model=some/policy", f"--prompts={prompts}", f"--out={out}", "--n=4", "--seed=5",
                 "--temperature=0.8", "--max_new_tokens=7", "--reward=gold", "--report_reward=verifier:math"]) == 0
    assert loaded == ["some/policy"]
    params = engine.calls[0][1]
    assert (params.n, params.seed, params.temperature, params.max_new_tokens) == (4, 5, 0.8, 7)
    picks = _rows(out)
    assert [(p["index"], p["completion"]) for p in picks] == [(1, "2 + 3 = 5. The answer is 5."),
                                                             (0, "The answer is 8.")]
    assert [p["reward"] for p in picks] == pytest.approx([1.9, 1.9])  # right, formatted, no request, concise
    assert [p["report_reward"] for p in picks] == [1.0, 1.0]
    summary = capsys.readouterr().out
    # mean selector reward of the picks, and of all 8 single samples
    single = (0.9 + 1.9 + 1.6 + 0.6 + 1.9 + 1.9 + 0.9 + 0.6) / 8
    assert f"mean selector reward {1.9:.4f} (single samples {single:.4f})" in summary


def _scored_rows():
    R = [[0.2, 1.0], [0.5, 0.4], [None, None], [1.5, 0.0]]
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "completions": [f"c{i}{j}" for j in range(2)],
             "rewards": r, "answer": str(i)} for i, r in enumerate(R)]


def test_select_rows_min_reward_drops_picks_below_and_keeps_the_threshold():
    """Per-prompt bests: c01 (1.0), c10 (0.5), none for q2, c30 (1.5). min_reward=1.0 keeps 1.0 and 1.5."""
    rows = _scored_rows()
    contents = lambda picked: [p["messages"][-1]["content"] for p in picked]  # noqa: E731
    assert contents(select_rows(rows, "top_per_prompt")) == ["c01", "c10", "c30"]
    kept = select_rows(rows, "top_per_prompt", min_reward=1.0)
    assert contents(kept) == ["c01", "c30"] and [p["reward"] for p in kept] == [1.0, 1.5]
    assert [p["answer"] for p in kept] == ["0", "3"]
    assert contents(select_rows(rows, "top_per_prompt", min_reward=1.5)) == ["c30"]
    assert select_rows(rows, "top_per_prompt", min_reward=1.6) == []
    # top_k: the 3 best overall are 1.5, 1.0, 0.5; the threshold applies to them too
    assert contents(select_rows(rows, "top_k", k=3)) == ["c30", "c01", "c10"]
    assert contents(select_rows(rows, "top_k", k=3, min_reward=0.5)) == ["c30", "c01", "c10"]
    assert contents(select_rows(rows, "top_k", k=3, min_reward=0.6)) == ["c30", "c01"]


def test_select_rows_drops_empty_replies():
    """An empty (or blank) best reply is no SFT example (the SFT loader refuses it): the pick is dropped, not
    replaced by the second best. Nor is it either side of a preference pair (the DPO loader refuses it too): pairs are
    formed among the non-empty replies only (q3: "b" 0.5 over "a" 0.1, though the empty reply scored 0.9)."""
    rows = [{"prompt": [{"role": "user", "content": "q0"}], "completions": ["", "x"], "rewards": [0.2, 0.1]},
            {"prompt": [{"role": "user", "content": "q1"}], "completions": ["y", " \n"], "rewards": [0.0, 0.3]},
            {"prompt": [{"role": "user", "content": "q2"}], "completions": ["z", ""], "rewards": [0.5, 0.4]}]
    assert [p["messages"][-1]["content"] for p in select_rows(rows, "top_per_prompt")] == ["z"]
    assert [p["messages"][-1]["content"] for p in select_rows(rows, "top_k", k=4)] == ["z"]  # 0.5, 0.4, 0.3, 0.2
    rows.append({"prompt": [{"role": "user", "content": "q3"}], "completions": ["a", "", "b"], "rewards": [0.1, 0.9, 0.5]})
    for rule in ("best_worst", "all"):
        assert [(p["chosen"][0]["content"], p["rejected"][0]["content"])
                for p in select_rows(rows, "top_per_prompt", pairs=rule)] == [("b", "a")]


def test_select_command_min_reward(tmp_path, capsys):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in _scored_rows()))
    out = tmp_path / "selected.jsonl"
    assert main(["select", f"--data={scored}", "--min_reward=1", f"--out={out}"]) == 0
    assert [(p["messages"][-1]["content"], p["reward"]) for p in _rows(out)] == [("c01", 1.0), ("c30", 1.5)]
    assert "2 SFT rows (top_per_prompt) from 4 prompts" in capsys.readouterr().out


def test_rs_two_rounds_round_two_starts_from_round_one(tiny_model_dir, world, tmp_path):
    """Two rounds on 4 prompts from the random tiny Llama (2 samples each, 2 SFT steps a round at a high learning
    rate, so each round's model samples differently). Round 2 trains from round 1's model, and its samples are what
    round 1's model samples with round 2's seed (seed + 2), not what the starting model samples."""
    from posttrain.models.generation import HFEngine, SamplingParams
    from posttrain.stages.rs import RSConfig, run_rs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join((world.data / "rl_heldout.jsonl").read_text().splitlines()[:4]) + "\n")
    out = tmp_path / "rs"
    final = run_rs(RSConfig(model=str(tiny_model_dir), prompts=str(prompts), out=str(out), rounds=2, n=2,
                            max_new_tokens=8, reward="gold", seed=0, sft_epochs=2.0, sft_batch_size=4, sft_lr=3e-3,
                            backend="hf", device="cpu", progress=False))
    round_1, round_2 = out / "round_1" / "sft" / "model", out / "round_2" / "sft" / "model"
    assert final == round_2
    records = _rows(out / "rounds.jsonl")
    assert [(r["round"], r["model"]) for r in records] == [(1, str(round_1)), (2, str(round_2))]
    for record, r in zip(records, (1, 2)):
        scored = _rows(out / f"round_{r}" / "scored.jsonl")
        bests = [row["completions"][row["rewards"].index(max(row["rewards"]))] for row in scored]
        kept = [max(row["rewards"]) for row, best in zip(scored, bests) if best.strip()]  # empty replies dropped
        assert record["selected"] == len(kept) == len(_rows(out / f"round_{r}" / "selected.jsonl")) >= 3
        assert record["sft_steps"] == max(1, round(2.0 * len(kept) / 4))
        assert record["sample_reward"] == pytest.approx(sum(x for row in scored for x in row["rewards"]) / 8)
        assert record["selected_reward"] == pytest.approx(sum(kept) / len(kept))
    # the SFT run of round 2 was given round 1's model (its own saved config says so)
    assert yaml.safe_load((out / "round_2" / "sft" / "config.yaml").read_text())["model"] == str(round_1)
    assert yaml.safe_load((out / "round_1" / "sft" / "config.yaml").read_text())["model"] == str(tiny_model_dir)

    messages = [row["prompt"] for row in _rows(out / "round_2" / "generations.jsonl")]
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=2)

    def samples(model_dir):
        return [[c.text for c in s] for s in HFEngine.from_path(model_dir, device="cpu").generate(messages, params)]

    generated = [row["completions"] for row in _rows(out / "round_2" / "generations.jsonl")]
    assert generated == samples(round_1)
    assert generated != samples(tiny_model_dir)  # the check can tell the two models apart


def test_rs_round_one_selects_from_given_generations(tiny_model_dir, world, tmp_path, monkeypatch):
    """``--generations``: round 1 scores and selects the given completions (the first --limit rows) and samples
    nothing; two selectors can share one set of samples this way."""
    from posttrain.stages import rs
    from posttrain.stages.rs import RSConfig, run_rs

    rows = [json.loads(line) for line in (world.data / "rl_heldout.jsonl").read_text().splitlines()[:5]]
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps({**row, "completions": [f"The answer is {row['answer']}.", "No idea."]})
                                   + "\n" for row in rows))

    def no_sampling(*args, **kwargs):
        raise AssertionError("round 1 sampled although --generations was given")

    monkeypatch.setattr(rs, "load_engine", no_sampling)
    out = tmp_path / "rs"
    run_rs(RSConfig(model=str(tiny_model_dir), generations=str(generations), limit=4, out=str(out), rounds=1, n=2,
                    reward="gold", sft_epochs=1.0, sft_batch_size=2, backend="hf", device="cpu", progress=False))
    selected = _rows(out / "round_1" / "selected.jsonl")
    assert [s["messages"][-1]["content"] for s in selected] == [f"The answer is {r['answer']}." for r in rows[:4]]
    with pytest.raises(ValueError, match="--prompts"):
        run_rs(RSConfig(model=str(tiny_model_dir), generations=str(generations), out=str(tmp_path / "b"), rounds=2))


def test_rs_round_with_nothing_selected_keeps_the_policy(tiny_model_dir, world, tmp_path):
    """No sample reaches --min_reward: the round is logged with 0 selected, no SFT runs, the starting model is
    returned, and running the command again neither retrains nor logs the round twice."""
    from posttrain.stages.rs import RSConfig, run_rs

    rows = [json.loads(line) for line in (world.data / "rl_heldout.jsonl").read_text().splitlines()[:3]]
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps({**row, "completions": ["The answer is -1.", "No idea."]}) + "\n"
                                   for row in rows))
    config = RSConfig(model=str(tiny_model_dir), generations=str(generations), out=str(tmp_path / "rs"), rounds=1,
                      n=2, reward="verifier:math", min_reward=1.0, backend="hf", device="cpu", progress=False)
    assert run_rs(config) == tiny_model_dir
    assert run_rs(config) == tiny_model_dir
    records = _rows(tmp_path / "rs" / "rounds.jsonl")
    assert [(r["round"], r["selected"], r["sft_steps"]) for r in records] == [(1, 0, 0)]
    assert not (tmp_path / "rs" / "round_1" / "sft").exists()
