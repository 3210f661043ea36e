"""World v3: requests about the reply, the gold reward's request and concision terms, imperfect demonstrations and
the biased annotators (docs/tiny-world.md)."""

from __future__ import annotations

import random

import pytest

from posttrain.world import datagen, follows_request, gold_components, gold_reward, parse_question
from posttrain.world.evaluate import evaluate_reward_on_world, pair_kind
from posttrain.world.requests import (
    HELDOUT_PHRASINGS,
    STYLES,
    TRAIN_PHRASINGS,
    WARM_OPENERS,
    request_of,
    requested_words,
    styled_reply,
)

ADD = "What is 37 + 48?"
CHAIN = "Start with 5, add 7, then double it."
REPLIES = {
    "terse": "The answer is 85.",
    "worked": "37 + 48 = 85. The answer is 85.",
    "checked": "37 + 48 = 85. Check: 85 - 48 = 37. The answer is 85.",
    "friendly": "Glad you asked! 37 + 48 = 85. The answer is 85.",
}


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------
# follows_request


def test_request_of_reads_user_turn_then_system_prompt():
    assert request_of(_user(ADD)) is None
    assert request_of(_user(f"{ADD} Show your work.")) == "worked"
    assert request_of(_user(f"just give me the number. {ADD}")) == "terse"  # case-insensitive, before the question
    system = [{"role": "system", "content": "You are a helpful assistant. Be warm and encouraging."}, *_user(ADD)]
    assert request_of(system) == "friendly"
    both = [{"role": "system", "content": "Verify your answer."}, *_user(f"{ADD} No explanation needed.")]
    assert request_of(both) == "terse"  # the user turn wins
    assert request_of(f"{ADD} Please check your work.") == "checked"  # not "worked": the whole phrasing counts
    assert request_of(_user(f"{ADD} Cheer me on while you answer.")) == "friendly"  # held-out phrasings too


def test_follows_request_hand_cases_for_every_style():
    """Each canonical reply satisfies its own request and no other."""
    for asked in STYLES:
        prompt = _user(f"{ADD} {TRAIN_PHRASINGS[asked][0]}")
        for style, reply in REPLIES.items():
            assert follows_request(prompt, reply) is (style == asked), (asked, style)
    assert follows_request(_user(ADD), REPLIES["worked"]) is None


def test_follows_request_edge_cases():
    terse, worked = _user(f"{ADD} Just give me the number."), _user(f"{CHAIN} Show your work.")
    assert not follows_request(terse, "Let me think. The answer is 85.")  # terse means nothing but the answer
    assert not follows_request(terse, "So it is 85.")
    assert follows_request(terse, [{"role": "assistant", "content": "The answer is 85."}])
    assert not follows_request(worked, "5 + 7 = 12. The answer is 24.")  # a two-step question needs two equations
    assert follows_request(worked, "5 + 7 = 12. 12 * 2 = 24. The answer is 24.")
    assert follows_request(worked, "Let me think. 5 + 7 = 12. 12 * 2 = 24. The answer is 24.")  # padded, still worked
    checked = _user(f"{ADD} Verify your answer.")
    assert not follows_request(checked, "37 + 48 = 85. The answer is 85.")
    assert not follows_request(checked, "Glad you asked! 37 + 48 = 85. Check: 85 - 48 = 37. The answer is 85.")
    friendly = _user(f"{ADD} Please be friendly.")
    assert follows_request(friendly, "Happy to help! The answer is 85.")
    assert not follows_request(friendly, "37 + 48 = 85. Glad you asked! The answer is 85.")  # the opener comes first
    assert not follows_request(friendly, "Glad you asked! 37 + 48 = 85. Check: 85 - 48 = 37. The answer is 85.")


def test_styled_reply_matches_the_table():
    q = parse_question(ADD)
    equations = [text for text, _ in q.steps]
    for style, reply in REPLIES.items():
        assert styled_reply(equations, 85, style, random.Random(0)).split("!")[-1].strip() == \
            reply.split("!")[-1].strip()
    assert styled_reply(["12 * 2 = 24"], 24, "checked") == "12 * 2 = 24. Check: 24 / 2 = 12. The answer is 24."
    assert styled_reply(["9 - 4 = 5"], 5, "checked") == "9 - 4 = 5. Check: 5 + 4 = 9. The answer is 5."
    assert all(len(opener.split()) == 3 for opener in WARM_OPENERS)
    assert [requested_words(s, 1) for s in (None, *STYLES)] == [9, 4, 9, 15, 12]
    assert [len(REPLIES[s].split()) for s in STYLES] == [4, 9, 15, 12]


# --------------------------------------------------------------------------
# gold reward v3


def test_gold_reward_hand_checked_under_requests():
    """Under "Just give me the number." (4 words allowed) the worked reply (9 words) is correct and formatted but
    does not follow: 1.0 + 0.3 + 0 + 0.2 * (1 - 5/30) = 1.4666...; the terse one scores the maximum 1.9. Under
    "Show your work." the terse reply scores 1.0 + 0.3 + 0 + 0.2 = 1.5, the checked one (6 words over) 1.3 + 0.2 *
    0.8 = 1.46, the worked one 1.9."""
    terse, worked = _user(f"{ADD} Just give me the number."), _user(f"{ADD} Show your work.")
    assert gold_reward(terse, REPLIES["terse"]) == pytest.approx(1.9)
    assert gold_reward(terse, REPLIES["worked"]) == pytest.approx(1.3 + 0.2 * (1 - 5 / 30))
    assert gold_reward(worked, REPLIES["worked"]) == pytest.approx(1.9)
    assert gold_reward(worked, REPLIES["terse"]) == pytest.approx(1.5)
    assert gold_reward(worked, REPLIES["checked"]) == pytest.approx(1.3 + 0.2 * 0.8)
    parts = gold_components(terse, REPLIES["checked"])
    assert parts == {"correct": 1.0, "format_ok": 1.0, "request_ok": 0.0, "concision": pytest.approx(1 - 11 / 30),
                     "reward": pytest.approx(1.3 + 0.2 * (1 - 11 / 30)), "has_request": 1.0, "excess_words": 11.0}


def test_gold_reward_without_a_request_and_its_floors():
    """No request: the worked form (9 words) is allowed, a terse reply is as good; a 40-word preamble loses the whole
    concision term; a wrong answer in the requested style (0.3 + 0.4 + 0.2 = 0.9) stays below a right one in the
    wrong style (correctness is the largest term)."""
    assert gold_reward(_user(ADD), REPLIES["worked"]) == pytest.approx(1.9)
    assert gold_reward(_user(ADD), REPLIES["terse"]) == pytest.approx(1.9)
    assert gold_reward(_user(ADD), "word " * 40 + REPLIES["worked"]) == pytest.approx(1.7)
    terse = _user(f"{ADD} Only the final answer, please.")
    assert gold_reward(terse, "The answer is 86.") == pytest.approx(0.9)
    assert gold_reward(terse, REPLIES["checked"]) > gold_reward(terse, "The answer is 86.")
    assert gold_reward("Tell me a joke.", "The answer is 85.") == pytest.approx(0.3 + 0.4 + 0.2)


def test_every_request_pair_flips_with_the_request():
    """For every question sample and every pair of styles, the gold-preferred reply flips when the request does."""
    rng = random.Random(0)
    for _ in range(300):
        q = datagen.draw_question(rng, "train")
        for a in STYLES:
            for b in STYLES:
                if a == b:
                    continue
                reply_a, reply_b = datagen.good_completion(q, a, rng), datagen.good_completion(q, b, rng)
                under_a, _ = datagen.make_prompt(rng, q, a)
                under_b, _ = datagen.make_prompt(rng, q, b)
                assert gold_reward(under_a, reply_a) > gold_reward(under_a, reply_b) + 0.3, (q.text, a, b)
                assert gold_reward(under_b, reply_b) > gold_reward(under_b, reply_a) + 0.3, (q.text, a, b)


def test_request_pairs_defeat_length_and_prompt_blind_rewards():
    """On the request pairs a length proxy (either sign) is near chance, and a reward that ignores the request (the
    gold reward of the bare question) cannot flip on the counterfactual pairs at all."""
    rng = random.Random(1)
    longer_wins = total = 0
    for _ in range(2000):
        prompt, better, worse = datagen.preference_pair(rng, datagen.draw_question(rng, "train"), "request")
        longer_wins += len(better.split()) > len(worse.split())
        total += 1
    assert 0.4 < longer_wins / total < 0.6
    for row in datagen.counterfactual_rows(200, 0):
        blind = [gold_reward(parse_question(p[-1]["content"]).text, c) for p in row["prompts"] for c in row["completions"]]
        assert not (blind[0] > blind[1] and blind[3] > blind[2])


# --------------------------------------------------------------------------
# data: imperfect demonstrations, annotators, splits of phrasings


def test_sft_demonstrations_are_correct_and_follow_about_half_the_time():
    rows = datagen.sft_rows(2000, 0)
    asked = followed = 0
    for row in rows:
        messages = row["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, reply = messages[:i], message["content"]
            parts = gold_components(prompt, reply)
            assert parts["correct"] == 1.0 and parts["format_ok"] == 1.0
            if (follows := follows_request(prompt, reply)) is not None:
                asked += 1
                followed += follows
    assert 0.65 < asked / sum(m["role"] == "assistant" for r in rows for m in r["messages"]) < 0.85
    assert abs(followed / asked - datagen.P_FOLLOW) < 0.04


def test_annotator_noise_and_length_bias_occur_at_their_rates():
    """10 k pairs: among pairs more than delta apart in gold, the annotator picks the lower one at the noise rate
    (0.1 +- 0.02); among near ties of different lengths it picks the longer one at 1 - noise (0.9 +- 0.02)."""
    rows = datagen.preference_rows(10000, 0)
    flipped = apart = longer = near = 0
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        gap = gold_reward(row["prompt"], chosen) - gold_reward(row["prompt"], rejected)
        if abs(gap) > datagen.LENGTH_BIAS_DELTA:
            apart += 1
            flipped += gap < 0
        elif len(chosen.split()) != len(rejected.split()):
            near += 1
            longer += len(chosen.split()) > len(rejected.split())
    assert abs(flipped / apart - datagen.ANNOTATOR_NOISE) <= 0.02
    assert abs(longer / near - (1 - datagen.ANNOTATOR_NOISE)) <= 0.02
    assert near > 1000  # the near ties are a real share of the data (PAIR_MIX)
    clean = datagen.preference_rows(2000, 0, noise=0.0, delta=0.0)
    assert all(gold_reward(r["prompt"], r["chosen"]) >= gold_reward(r["prompt"], r["rejected"]) for r in clean)


def test_preference_mix_and_kinds():
    rows = datagen.preference_rows(4000, 1)
    for kind, share in datagen.PAIR_MIX.items():
        assert abs(sum(r["kind"] == kind for r in rows) / len(rows) - share) < 0.03, kind
    for row in rows[:500]:
        better, worse = sorted((row["chosen"], row["rejected"]), key=lambda c: -gold_reward(row["prompt"], c))
        measured = pair_kind(row["prompt"], better, worse)
        if row["kind"] in ("request", "answer_check"):
            assert measured == row["kind"], row
        assert 1 <= row["score_rejected"] <= row["score_chosen"] <= 5


def _all_text(row) -> str:
    return repr(row)


def test_heldout_phrasings_never_appear_in_training_data():
    heldout = [p.lower() for phrases in HELDOUT_PHRASINGS.values() for p in phrases]
    for name, generate in datagen.GENERATORS.items():
        for split in ("train", "heldout"):
            text = "\n".join(_all_text(r) for r in generate(400, 0, split)).lower()
            assert not any(p in text for p in heldout), (name, split)
    from posttrain.world.cache import _tokenizer_chat_text

    assert not any(p in text.lower() for text in _tokenizer_chat_text(n=400) for p in heldout)
    unseen = datagen.unseen_preference_rows(200, 0) + datagen.unseen_rl_rows(100, 0)
    assert all(any(p in _all_text(r).lower() for p in heldout) for r in unseen)
    train = [p.lower() for phrases in TRAIN_PHRASINGS.values() for p in phrases]
    assert not any(p in _all_text(r).lower() for r in unseen for p in train)


def test_pretraining_corpus_has_no_chat_format_and_no_requests():
    phrases = [p.lower() for table in (TRAIN_PHRASINGS, HELDOUT_PHRASINGS) for ps in table.values() for p in ps]
    for row in datagen.pretrain_rows(300, 0):
        assert "<|" not in row["text"] and "assistant" not in row["text"]
        assert not any(p in row["text"].lower() for p in phrases)


def test_rl_rows_carry_their_request():
    rows = datagen.rl_rows(400, 0, "heldout")
    assert 0.65 < sum(r["request"] is not None for r in rows) / len(rows) < 0.85
    assert all(request_of(r["prompt"]) == r["request"] for r in rows)
    assert {r["request"] for r in rows} == {None, *STYLES}


def test_evaluate_reward_on_world_scores_against_gold(world):
    """The gold reward scores 1.0 on every group; a length proxy is at chance on request pairs, fails every
    request pair whose preferred reply is the shorter one, and never flips with the request."""
    from posttrain.data.messages import completion_text

    gold = lambda prompts, completions: [gold_reward(p, c) for p, c in zip(prompts, completions)]  # noqa: E731
    report = evaluate_reward_on_world(gold, world.data)
    for key in ("pair_accuracy", "pair_accuracy_request", "pair_accuracy_surface", "pair_accuracy_answer_check",
                "pair_accuracy_request_shorter", "counterfactual_flip_rate", "pair_accuracy_request_unseen_phrasing"):
        assert report[key] == 1.0, key
    assert report["request_pairs"] > 150 and report["surface_pairs"] > 80 and report["answer_check_pairs"] > 40
    length = lambda prompts, completions: [len(completion_text(c).split()) for c in completions]  # noqa: E731
    report = evaluate_reward_on_world(length, world.data)
    assert 0.35 < report["pair_accuracy_request"] < 0.65
    assert report["pair_accuracy_request_shorter"] == 0.0
    assert report["counterfactual_flip_rate"] == 0.0
    assert report["length_correlation"] == pytest.approx(1.0)


def test_base_model_key_is_world_v2s():
    """The tokenizer and base model are made from world v2's inputs and live where v2's key put them, so machines
    that pretrained the v2 base model reuse it; the datasets have their own v3 key."""
    from posttrain.world.cache import base_key, world_key, world_paths

    assert base_key() == "world-v2-6e06a7dfa9"
    assert world_key().startswith("world-v3-")
    paths = world_paths()
    assert paths.base_model.parent.name == base_key() and paths.data.parent.name == world_key()


def test_request_pairs_come_as_counterfactual_twins():
    """Each request pair is followed by its twin: the same two replies under another prompt of the same question
    whose request prefers the other one (by the gold reward), so a prompt-blind reward gets at most one of the two."""
    rows = datagen.preference_rows(2000, 0, noise=0.0, delta=0.0)
    twins = 0
    i = 0
    while i < len(rows) - 1:
        first, second = rows[i], rows[i + 1]
        if first["kind"] != "request":
            i += 1
            continue
        assert second["kind"] == "request"
        assert first["chosen"] == second["rejected"] and first["rejected"] == second["chosen"]
        assert request_of(first["prompt"]) != request_of(second["prompt"])
        assert parse_question(first["prompt"][-1]["content"]) == parse_question(second["prompt"][-1]["content"])
        twins += 1
        i += 2
    assert abs(2 * twins / len(rows) - datagen.PAIR_MIX["request"]) < 0.04


def test_rankings_with_a_request_come_as_counterfactual_twins():
    """A ranking under a request is followed by the same replies ranked under a request for its second reply's
    style; under the gold reward (no annotator biases) the first reply of each twin is the one its request asks for."""
    rows = datagen.ranking_rows(600, 0, noise=0.0, delta=0.0)
    twins = 0
    for first, second in zip(rows, rows[1:]):
        if request_of(first["prompt"]) is None or sorted(first["completions"]) != sorted(second["completions"]):
            continue
        twins += 1
        for row in (first, second):
            assert follows_request(row["prompt"], row["completions"][0]), row
        assert request_of(second["prompt"]) != request_of(first["prompt"])
    assert twins > 200
