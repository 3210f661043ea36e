"""generate -> score -> select -> bon on the command line, the reward-spec parser and bad inputs."""

from __future__ import annotations

import json

import pytest

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
        assert pick["messages"][:-1] == row["prompt"] and pick["messages"][-1]["role"] == "assistant"
        assert pick["reward"] == max(row["rewards"])

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


def test_bon_picks_the_highest_reward(world_with_base, prompts, tmp_path, capsys):
    out = tmp_path / "bon.jsonl"
    code = main(["bon", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}", "--n=4",
                 "--max_new_tokens=12", "--reward=gold", "--report_reward=verifier:math", "--device=cpu"])
    assert code == 0
    picks = _rows(out)
    assert len(picks) == 6 and all(p["n"] == 4 and 0 <= p["index"] < 4 for p in picks)
    assert [p["reward"] for p in picks] == pytest.approx(GoldReward()([p["prompt"] for p in picks],
                                                                       [p["completion"] for p in picks]))
    assert "best-of-4" in capsys.readouterr().out


def test_reward_specs(tmp_path):
    assert isinstance(reward_from_spec("gold"), GoldReward)
    assert isinstance(reward_from_spec("verifier:math"), VerifierReward)
    total = reward_from_spec("0.25*gold + 0.75*verifier:math")
    assert isinstance(total, WeightedSum) and [w for w, _ in total.components] == [0.25, 0.75]
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    assert total(prompts, ["2 + 3 = 5. The answer is 5.", "The answer is 6."], answer=["5", "5"]) == pytest.approx(
        [0.25 * GoldReward()(prompts[:1], ["2 + 3 = 5. The answer is 5."])[0] + 0.75, 0.25 * 0.3 + 0.25 * 0.2 * (1 - 4 / 60)])
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


def test_rs_round_trains_on_the_selection_and_resumes(world_with_base, prompts, tmp_path, capsys):
    out = tmp_path / "rs"
    args = ["rs", f"--model={world_with_base.base_model}", f"--prompts={prompts}", f"--out={out}", "--rounds=1",
            "--n=3", "--max_new_tokens=10", "--reward=gold", f"--eval_prompts={prompts}", "--eval_n=2",
            "--device=cpu", "--progress=false", "--sft_batch_size=4"]
    assert main(args) == 0
    records = _rows(out / "rounds.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    round_1 = records[1]
    assert round_1["selected"] == 6 and round_1["selected_reward"] >= round_1["sample_reward"]
    selected = _rows(out / "round_1" / "selected.jsonl")
    scored = _rows(out / "round_1" / "scored.jsonl")
    assert [s["reward"] for s in selected] == [max(r["rewards"]) for r in scored]
    assert (out / "round_1" / "sft" / "model" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(args) == 0  # everything done: nothing is redone
    assert len(_rows(out / "rounds.jsonl")) == 2
