"""Tests of the tiny world: questions, solver, splits, gold reward and data generators."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.world import (
    WORLD_VERSION,
    Question,
    follows_format,
    gold_components,
    gold_reward,
    is_heldout,
    make_question,
    parse_final_answer,
    parse_question,
    questions,
    solve,
)
from posttrain.world import datagen, request_of
from posttrain.world.tasks import parse_step, step_operations

SMALL = 40  # rows per generator in the generator tests


def _all_questions(seeds: range, per_level: int) -> list[Question]:
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        for level in (1, 2, 3):
            out += [make_question(rng, level) for _ in range(per_level)]
    return out


QUESTIONS = _all_questions(range(40), 50)  # 6000 questions


def _question_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# --------------------------------------------------------------------------
# tasks


def test_world_version_is_a_string():
    assert isinstance(WORLD_VERSION, str) and WORLD_VERSION


def test_solve_round_trips_every_generated_question():
    for q in QUESTIONS:
        assert solve(q.text) == q.answer, q
        parsed = parse_question(q.text)
        assert parsed is not None and parsed.canonical == q.canonical, q


def test_solve_ignores_whitespace_and_surrounding_text():
    q = Question("What is 37 + 48?", 85, 2, "add", (("37 + 48 = 85", 85),))
    assert solve("  \n What is 37 + 48?  ") == 85
    assert solve("Please answer carefully.\nWhat   is 37 + 48?\nReply briefly.") == 85
    assert solve(q.text) == q.answer


def test_solve_hand_checked_phrasings():
    cases = {
        "What is 37 + 48?": 85,
        "Compute 7 * 6.": 42,
        "Calculate 52 - 19.": 33,
        "What is 12 plus 30?": 42,
        "What do you get when you multiply 4 by 9?": 36,
        "Find the sum of 23 and 41.": 64,
        "Find the difference between 52 and 19.": 33,
        "What do you get when you subtract 4 from 9?": 5,
        "Start with 5, add 7, then double it.": 24,
        "Start with 9, subtract 4, then multiply by 3.": 15,
        "Start with 6, add 8, subtract 3, then double it.": 22,
        "Take 4, triple it, then subtract 2. What is the result?": 10,
    }
    for text, answer in cases.items():
        assert solve(text) == answer, text


def test_solve_takes_the_last_question_and_rejects_non_questions():
    assert solve("Q: What is 2 + 3? A: 5. Q: Find the product of 7 and 12.") == 84
    for text in ("", "Hello there.", "The answer is 5.", "37 + 48 = 85."):
        assert solve(text) is None


def test_levels_respect_their_ranges():
    for q in QUESTIONS:
        start, ops = step_operations(q.steps)
        values = [start] + [value for _, value in q.steps]
        assert all(v >= 0 for v in values), q
        assert q.answer == q.steps[-1][1]
        if q.level == 1:
            assert q.kind in ("add", "sub", "mul") and start < 10 and ops[0][1] < 10
        elif q.level == 2:
            assert q.kind in ("add", "sub", "mul")
            if q.kind == "mul":
                assert sorted(len(str(x)) for x in (start, ops[0][1])) == [1, 2]
            else:
                assert 10 <= start <= 99 and 10 <= ops[0][1] <= 99
        else:
            assert q.kind == "chain" and 2 <= len(q.steps) <= 3
            assert all(v < 1000 for v in values)


def test_question_text_is_clean_ascii():
    for q in QUESTIONS:
        assert q.text.isascii() and "  " not in q.text and q.text == q.text.strip()
        assert q.text.endswith(("?", ".")), q.text


def test_steps_are_consistent_equations():
    for q in QUESTIONS:
        previous = None
        for text, value in q.steps:
            left, op, right, result = parse_step(text)
            assert result == value
            assert previous is None or left == previous
            previous = value


def test_canonical_is_phrasing_independent():
    a = parse_question("What is 37 + 48?")
    b = parse_question("Find the sum of 48 and 37.")
    assert a.canonical == b.canonical == "add:37:48"
    assert parse_question("Start with 5, add 7, then double it.").canonical == "chain:5:+7:*2"
    assert parse_question("Take 5, add 7, then multiply by 2.").canonical == "chain:5:+7:*2"
    assert parse_question("Calculate 52 - 19.").canonical == "sub:52:19"


def test_heldout_fraction_is_about_ten_percent():
    canonicals = {q.canonical: q for q in QUESTIONS}
    fraction = sum(is_heldout(q) for q in canonicals.values()) / len(canonicals)
    assert 0.06 < fraction < 0.14


def test_questions_splits_are_disjoint_and_deterministic():
    train = questions("train", 600, seed=1)
    heldout = questions("heldout", 200, seed=1)
    assert len(train) == 600 and len(heldout) == 200
    assert not {q.canonical for q in train} & {q.canonical for q in heldout}
    assert not {q.text for q in train} & {q.text for q in heldout}
    assert all(not is_heldout(q) for q in train) and all(is_heldout(q) for q in heldout)
    assert len({q.canonical for q in train}) == len(train)
    assert questions("train", 600, seed=1) == train
    assert questions("train", 600, seed=2) != train
    assert {q.level for q in train} == {1, 2, 3}


def test_questions_stops_when_a_level_is_exhausted():
    level_one = questions("heldout", 10_000, seed=0, levels=(1,))
    assert 0 < len(level_one) < 60
    assert len({q.canonical for q in level_one}) == len(level_one)


def test_questions_rejects_unknown_split():
    with pytest.raises(ValueError):
        questions("test", 5, seed=0)


# --------------------------------------------------------------------------
# gold reward


def test_parse_final_answer():
    assert parse_final_answer("37 + 48 = 85. The answer is 85.") == 85
    assert parse_final_answer("The answer is 3. No wait, the answer is 4.") == 4
    assert parse_final_answer("The answer is -12.") == -12
    assert parse_final_answer("It is 7, or maybe 9") == 9
    assert parse_final_answer("so it is -5") == -5
    assert parse_final_answer("12-3") == 3
    assert parse_final_answer("The answer is 85. Extra 99") == 85
    assert parse_final_answer("no numbers here") is None


def test_follows_format():
    assert follows_format("37 + 48 = 85. The answer is 85.")
    assert follows_format("  The answer is -4.\n")
    assert not follows_format("37 + 48 = 85. So it is 85.")
    assert not follows_format("The answer is 85")
    assert not follows_format("The answer is 85. Done.")
    assert not follows_format("The answer is 84. The answer is 85.")
    assert not follows_format("The answer is eighty.")


def test_gold_reward_hand_checked_good():
    """"37 + 48 = 85. The answer is 85." has 9 words, the worked form a prompt without a request allows:
    1.0 * 1 + 0.3 * 1 + 0.4 * 1 (no request to miss) + 0.2 * 1 = 1.9, the maximum."""
    parts = gold_components("What is 37 + 48?", "37 + 48 = 85. The answer is 85.")
    assert parts["correct"] == 1.0 and parts["format_ok"] == 1.0 and parts["request_ok"] == 1.0
    assert parts["concision"] == 1.0 and parts["has_request"] == 0.0
    assert parts["reward"] == pytest.approx(1.9)


def test_gold_reward_hand_checked_flaws():
    """No request (9 words allowed). No format, 9 words: 1.0 + 0.0 + 0.4 + 0.2 = 1.6.
    Wrong answer, formatted, 9 words: 0 + 0.3 + 0.4 + 0.2 = 0.9.
    Bare "85", 1 word: 1.0 + 0 + 0.4 + 0.2 = 1.6.
    12 words (3 over): 1.3 + 0.4 + 0.2 * (1 - 3/30) = 1.88.
    Non-world prompt, formatted, 4 words: 0 + 0.3 + 0.4 + 0.2 = 0.9.
    Empty completion: 0 + 0 + 0.4 + 0.2 = 0.6."""
    q = "What is 37 + 48?"
    assert gold_reward(q, "37 + 48 = 85. So it is 85.") == pytest.approx(1.6)
    assert gold_reward(q, "37 + 48 = 86. The answer is 86.") == pytest.approx(0.9)
    assert gold_reward(q, "85") == pytest.approx(1.6)
    assert gold_reward(q, "Well, well, well. 37 + 48 = 85. The answer is 85.") == pytest.approx(1.88)
    assert gold_reward("Tell me a joke.", "The answer is 85.") == pytest.approx(0.9)
    assert gold_reward(q, "") == pytest.approx(0.6)


def test_gold_reward_concision_floors_at_zero():
    """100 filler words + "The answer is 85.": 1.0 + 0.3 + 0.4 + 0.2 * 0 = 1.7."""
    completion = "word " * 100 + "The answer is 85."
    assert gold_reward("What is 37 + 48?", completion) == pytest.approx(1.7)


def test_gold_reward_accepts_messages():
    good = "5 + 7 = 12. 12 * 2 = 24. The answer is 24."
    expected = gold_reward("Start with 5, add 7, then double it.", good)
    prompt = [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2. The answer is 2."},
        {"role": "user", "content": "Start with 5, add 7, then double it."},
    ]
    assert gold_reward(prompt, good) == pytest.approx(expected)
    assert gold_reward(prompt, [{"role": "assistant", "content": good}]) == pytest.approx(expected)
    assert gold_reward(prompt, {"role": "assistant", "content": good}) == pytest.approx(expected)
    conversation = prompt + [{"role": "assistant", "content": good}]
    assert gold_reward(prompt, conversation) == pytest.approx(expected)


# --------------------------------------------------------------------------
# completions


def test_good_completion_examples():
    add = parse_question("What is 37 + 48?")
    chain = parse_question("Start with 5, add 7, then double it.")
    assert datagen.good_completion(add) == "37 + 48 = 85. The answer is 85."
    assert datagen.good_completion(chain) == "5 + 7 = 12. 12 * 2 = 24. The answer is 24."


def test_every_flaw_scores_strictly_below_good():
    rng = random.Random(0)
    for q in QUESTIONS[::7]:
        good = datagen.good_completion(q)
        good_parts = gold_components(q.text, good)
        assert good_parts["correct"] == 1.0 and good_parts["format_ok"] == 1.0
        for flaw in datagen.FLAWS:
            flawed = datagen.flawed_completion(rng, q, flaw)
            assert gold_reward(q.text, flawed) < good_parts["reward"], (q, flaw, flawed)


def test_flaws_do_what_they_say():
    rng = random.Random(1)
    for q in QUESTIONS[::31]:
        wrong = datagen.flawed_completion(rng, q, "wrong_arithmetic")
        assert follows_format(wrong) and parse_final_answer(wrong) != q.answer
        no_format = datagen.flawed_completion(rng, q, "no_format")
        assert not follows_format(no_format) and parse_final_answer(no_format) == q.answer
        verbose = datagen.flawed_completion(rng, q, "verbose")
        extra_words = len(verbose.split()) - len(datagen.good_completion(q).split())
        assert 20 <= extra_words <= 45 and verbose.endswith(datagen.good_completion(q))
        padded = datagen.flawed_completion(rng, q, "padded")
        extra_words = len(padded.split()) - len(datagen.good_completion(q).split())
        assert 3 <= extra_words <= 9 and padded.endswith(datagen.good_completion(q))
        assert 0 < gold_reward(q.text, datagen.good_completion(q)) - gold_reward(q.text, padded) <= 0.1
        wrong_final = datagen.flawed_completion(rng, q, "wrong_final")
        assert follows_format(wrong_final) and parse_final_answer(wrong_final) != q.answer
        assert parse_final_answer(datagen.flawed_completion(rng, q, "no_answer")) is None
        misread = datagen.flawed_completion(rng, q, "misread")
        assert follows_format(misread) and parse_final_answer(misread) != q.answer
    with pytest.raises(ValueError):
        datagen.flawed_completion(rng, QUESTIONS[0], "typo")


# --------------------------------------------------------------------------
# generators


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], list[dict]]:
    return {
        (name, split): generate(SMALL, 3, split)
        for name, generate in datagen.GENERATORS.items()
        for split in ("train", "heldout")
    }


def _prompt_messages(value) -> bool:
    """A prompt: one user turn, optionally after a system turn."""
    roles = [m["role"] for m in value] if isinstance(value, list) else []
    return roles in (["user"], ["system", "user"]) and all(isinstance(m["content"], str) for m in value)


def _message_list(value, role: str) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 1
        and value[0]["role"] == role
        and isinstance(value[0]["content"], str)
    )


def test_generators_produce_n_json_rows(rows):
    for (name, split), generated in rows.items():
        assert len(generated) == SMALL, name
        for row in generated:
            assert json.loads(json.dumps(row)) == row


def test_pretrain_rows(rows):
    for row in rows["pretrain", "train"]:
        assert set(row) == {"text"} and isinstance(row["text"], str)
        assert "<|" not in row["text"] and "user" not in row["text"]
        assert 3 <= len(row["text"].splitlines()) <= 16


def test_sft_rows(rows):
    for row in rows["sft", "train"]:
        assert set(row) == {"messages"}
        messages = row["messages"]
        if messages[0]["role"] == "system":
            content = messages[0]["content"]
            assert content in datagen.SYSTEM_PROMPTS or request_of([messages[0]]) is not None, content
            messages = messages[1:]
        assert len(messages) in (2, 4)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        for user, assistant in zip(messages[::2], messages[1::2]):
            assert gold_components(user["content"], assistant["content"])["correct"] == 1.0
            assert follows_format(assistant["content"])


def test_sft_reasoning_rows(rows):
    """Each row is one question and its trace: reasoning = the worked equations, content = "The answer is N."."""
    for row in rows["sft_reasoning", "train"]:
        assert set(row) == {"messages"}
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": user["content"]}
        assert set(assistant) == {"role", "reasoning", "content"} and assistant["role"] == "assistant"
        q = parse_question(user["content"])
        assert assistant["content"] == f"The answer is {q.answer}."
        assert assistant["reasoning"] == " ".join(f"{text}." for text, _ in q.steps)
        assert gold_reward(user["content"], assistant["content"]) == pytest.approx(1.9)


def test_sft_reasoning_row_by_hand():
    """The first train row of seed 0 (``datagen.sft_reasoning_rows(1, 0)``), written out: 7 - 0 = 7."""
    assert datagen.sft_reasoning_rows(1, 0) == [{"messages": [
        {"role": "user", "content": "What is 7 - 0?"},
        {"role": "assistant", "reasoning": "7 - 0 = 7.", "content": "The answer is 7."},
    ]}]


def test_sft_mix_of_shapes():
    generated = datagen.sft_rows(400, 0)
    with_system = sum(r["messages"][0]["role"] == "system" for r in generated) / 400
    two_round = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in generated) / 400
    assert 0.1 < with_system < 0.3 and 0.07 < two_round < 0.25


def test_preference_rows(rows):
    for row in rows["preference", "train"]:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "kind"}
        assert _prompt_messages(row["prompt"])
        assert _message_list(row["chosen"], "assistant") and _message_list(row["rejected"], "assistant")
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and row["kind"] in datagen.PAIR_MIX
        assert isinstance(row["score_chosen"], int) and isinstance(row["score_rejected"], int)
        assert 1 <= row["score_rejected"] <= row["score_chosen"] <= 5


def test_ranking_rows(rows):
    for row in rows["rankings", "train"]:
        assert set(row) == {"prompt", "completions"}
        assert _prompt_messages(row["prompt"])
        assert len(row["completions"]) == 4 and all(isinstance(c, str) for c in row["completions"])
        assert len(set(row["completions"])) == 4
    # best first as the annotator ranks: by gold, up to length-biased near ties and a noisy adjacent swap
    generated = datagen.ranking_rows(400, 0)
    ordered = sum(gold_reward(r["prompt"], r["completions"][0]) >= gold_reward(r["prompt"], r["completions"][-1])
                  for r in generated)
    assert ordered / len(generated) > 0.95


def test_rl_rows(rows):
    for row in rows["rl", "train"]:
        assert set(row) == {"prompt", "answer", "level", "request"}
        assert _prompt_messages(row["prompt"])
        assert row["answer"] == str(solve(row["prompt"][-1]["content"]))
        assert row["level"] in (1, 2, 3) and row["request"] == request_of(row["prompt"])


def test_outcome_rows(rows):
    labels = []
    for row in rows["outcome", "train"]:
        assert set(row) == {"prompt", "completion", "label"}
        assert _prompt_messages(row["prompt"]) and _message_list(row["completion"], "assistant")
        correct = gold_components(row["prompt"], row["completion"])["correct"]
        assert row["label"] == int(correct)
        labels.append(row["label"])
    assert 0.2 < sum(labels) / len(labels) < 0.8


def test_process_rows(rows):
    for row in rows["process", "train"]:
        assert set(row) == {"prompt", "steps", "labels"}
        assert isinstance(row["prompt"], str) and solve(row["prompt"]) is not None
        steps, labels = row["steps"], row["labels"]
        assert len(steps) == len(labels) and all(label in (-1, 0, 1) for label in labels)
        assert steps[-1].startswith("The answer is ")
        final_correct = parse_final_answer(steps[-1]) == solve(row["prompt"])
        assert (labels[-1] == 1) == final_correct
        signed = [label for label in labels if label != 0]
        if -1 in signed:  # once wrong, every later dependent step is wrong
            first = signed.index(-1)
            assert all(label == -1 for label in signed[first:])


def test_misread_is_true_arithmetic_on_a_miscopied_number():
    """Every equation of a misread solution is arithmetically true and chains from the line before; exactly one
    number (the start, an operand or a carried value) differs from the correct solution, by 1-3."""
    rng = random.Random(2)
    seen_carried = False
    for q in QUESTIONS[::13]:
        equations, value = datagen.misread_steps(rng, q)
        parsed = [parse_step(equation) for equation in equations]
        assert all(x >= 0 and result >= 0 and apply(x, op, n) == result for x, op, n, result in parsed)
        assert value == parsed[-1][3] != q.answer
        start, ops = step_operations(q.steps)
        truth = [parse_step(text) for text, _ in q.steps]
        carried = [previous[3] for previous in parsed[:-1]]  # what each later step should start from
        left_diffs = [abs(p[0] - (start if i == 0 else carried[i - 1])) for i, p in enumerate(parsed)]
        operand_diffs = [abs(p[2] - n) for p, (_, n) in zip(parsed, ops)]
        changed = [d for d in left_diffs + operand_diffs if d]
        assert len(changed) == 1 and 1 <= changed[0] <= 3, (q.text, equations)
        seen_carried |= any(left_diffs[1:])
        assert len(parsed) == len(truth)
    assert seen_carried  # chains also miscopy the value carried between lines


def test_misread_hand_checked():
    q = parse_question("Start with 5, add 7, then double it.")
    outcomes = {tuple(datagen.misread_steps(random.Random(seed), q)[0]) for seed in range(200)}
    assert ("5 + 7 = 12", "13 * 2 = 26") in outcomes  # carried value 12 copied as 13
    assert ("5 + 8 = 13", "13 * 2 = 26") in outcomes  # operand 7 read as 8
    assert ("2 + 7 = 9", "9 * 2 = 18") in outcomes  # start 5 read as 2
    assert ("5 + 7 = 12", "12 * 2 = 24") not in outcomes
    steps, labels = datagen.process_example(random.Random(0), q, "misread")
    assert labels[-1] == -1 and -1 in labels


def apply(x: int, op: str, n: int) -> int:
    return {"+": x + n, "-": x - n, "*": x * n}[op]


def test_process_labels_hand_checked():
    rng = random.Random(0)
    q = parse_question("Start with 6, multiply by 5, then add 12.")
    for _ in range(20):
        steps, labels = datagen.process_example(rng, q, "wrong_arithmetic")
        signed = [label for label in labels if label != 0]
        assert signed[0] in (1, -1) and signed[-1] == -1 and -1 in signed
        steps, labels = datagen.process_example(rng, q, None)
        assert [label for label in labels if label != 0] == [1, 1, 1]
        assert steps[-1] == "The answer is 42."
        steps, labels = datagen.process_example(rng, q, "wrong_final")
        assert [label for label in labels if label != 0] == [1, 1, -1]


def test_generators_are_deterministic():
    for name, generate in datagen.GENERATORS.items():
        assert generate(10, 7, "train") == generate(10, 7, "train"), name
        assert generate(10, 7, "train") != generate(10, 8, "train"), name


def _row_questions(name: str, row: dict) -> list[str]:
    if name == "pretrain":
        return []
    if name in ("sft", "sft_reasoning"):
        return [m["content"] for m in row["messages"] if m["role"] == "user"]
    return [_question_text(row["prompt"])]


def test_generators_respect_splits(rows):
    for (name, split), generated in rows.items():
        for row in generated:
            for text in _row_questions(name, row):
                assert is_heldout(parse_question(text)) == (split == "heldout"), (name, text)


def test_pretrain_respects_splits():
    for split in ("train", "heldout"):
        for row in datagen.pretrain_rows(30, 0, split):
            for line in row["text"].splitlines():
                q = parse_question(line)
                if q is not None:
                    assert is_heldout(q) == (split == "heldout"), line


def test_write_all(tmp_path):
    sizes = {name: 8 for name in [*datagen.DEFAULT_SIZES, *datagen.EVAL_SIZES]}
    paths = datagen.write_all(tmp_path / "data", seed=0, sizes=sizes)
    assert set(paths) == {f"{name}_{split}" for name in datagen.GENERATORS for split in ("train", "heldout")} | set(
        datagen.EVAL_SETS)
    for key, path in paths.items():
        assert path.endswith(f"{key}.jsonl")
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        assert len(lines) == (64 if key.endswith("_heldout") and key not in datagen.EVAL_SETS else 8)
        assert all(isinstance(json.loads(line), dict) for line in lines)


def test_write_jsonl_creates_parents(tmp_path):
    path = datagen.write_jsonl([{"text": "caf\u00e9"}], tmp_path / "a" / "b" / "x.jsonl")
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == '{"text": "caf\u00e9"}\n'
