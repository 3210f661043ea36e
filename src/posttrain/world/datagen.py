"""Completions and datasets of the tiny world (v3: requests, imperfect demonstrations, biased annotators).

Every generator has the signature ``(n, seed, split="train") -> list[dict]``,
is deterministic in ``(n, seed, split)``, uses only questions of ``split``
(so held-out data never shares a problem with train data), uses only the
training phrasings of requests (``posttrain.world.requests``; the ``*_unseen``
evaluation sets use only the held-out ones) and returns JSON-serialisable rows:

* ``pretrain_rows``:   ``{"text": str}`` plain documents of 3-8 worked examples (no chat markup, no requests).
* ``sft_rows``:        ``{"messages": [...]}`` ending with an assistant turn; correct and formatted, following the
  request with probability ``P_FOLLOW``.
* ``sft_reasoning_rows``: ``{"messages": [user, assistant]}`` reasoning traces: the assistant's ``reasoning`` is the
  worked steps, its ``content`` the answer alone ("The answer is N."); the cold start of the ``r1`` recipe.
* ``preference_rows``: ``{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg],
  "score_chosen": int, "score_rejected": int, "kind": str}`` labelled by a biased annotator (:func:`annotate`).
* ``ranking_rows``:    ``{"prompt": [msgs], "completions": [str] * 4}`` best first, as the annotator ranks them.
* ``rl_rows``:         ``{"prompt": [msgs], "answer": str, "level": int, "request": str | None}``.
* ``outcome_rows``:    ``{"prompt": [msgs], "completion": [assistant msg], "label": 0 | 1}``.
* ``process_rows``:    ``{"prompt": str, "steps": [str], "labels": [int]}`` with labels in {-1, 0, 1}.

Completions: :func:`good_completion` (in any style) is correct and formatted;
each flaw of :func:`flawed_completion` scores lower in the same style.
"""

from __future__ import annotations

import os
import random
from typing import Callable

from posttrain.data.io import write_jsonl

from .gold import MAX_REWARD, gold_reward, parse_final_answer
from .requests import STYLES, WARM_OPENERS, phrasings, request_of, styled_reply, work_text
from .tasks import (
    LEVELS,
    Question,
    apply_op,
    check_split,
    format_step,
    in_split,
    make_question,
    questions,
    step_operations,
)

FLAWS = ("wrong_arithmetic", "misread", "no_format", "verbose", "wrong_final", "no_answer", "padded")
ANSWER_FLAWS = ("wrong_arithmetic", "misread", "wrong_final")
"""Flaws that keep the form and change only the final answer: telling them apart needs the answer checked."""
SURFACE_FLAWS = ("no_format", "verbose", "no_answer")
"""Flaws visible in the form of the reply."""

SYSTEM_PROMPTS = (
    "You are a careful math tutor.",
    "You are a helpful assistant.",
    "You help people with arithmetic.",
    "You are an assistant for school math.",
)
"""Neutral system prompts (no request in them); a request may be appended to one."""

FILLER_SENTENCES = (
    "Let me think about this carefully.",
    "This is a question about arithmetic.",
    "I want to make sure I get this right.",
    "First, I will read the question again.",
    "Problems like this one are common in school.",
    "It helps to work slowly and check each step.",
    "Numbers can be added, subtracted and multiplied.",
    "There are many ways to approach a problem like this.",
    "Careful work avoids silly mistakes.",
    "I will go through the calculation one step at a time.",
    "Mental math is a useful skill.",
    "Let us not rush and instead be thorough.",
    "Before computing, it is good to understand what is being asked.",
    "Some people like to write every step down.",
    "Checking the work at the end is always a good idea.",
    "This should not take very long.",
)
"""Sentences without digits and without "the answer is", used for rambling."""

GIVE_UP_SENTENCES = (
    "I am not sure what the result is.",
    "I would need more time to work this out.",
    "I cannot finish this calculation right now.",
    "Maybe someone else can work out the final number.",
)

NEUTRAL_STEPS = (
    "Let me think step by step.",
    "Let me work through this carefully.",
    "I will compute one step at a time.",
    "Now for the next step.",
)
"""Process steps that neither help nor hurt (label 0)."""

NO_FORMAT_ENDINGS = ("So it is {n}.", "That gives {n}.", "The result is {n}.", "Result: {n}")

PRETRAIN_FILLER = FILLER_SENTENCES + (
    "Here are some worked examples.",
    "More practice problems follow.",
    "Arithmetic is the study of numbers and operations on them.",
    "Practice makes perfect.",
)

PRETRAIN_STYLES = ("bare", "question", "result", "qa", "short")

DATA_REVISION = 3
"""Part of the datasets' cache key (``posttrain.world.cache.world_key``): bump it when a generator's output changes.
2: request pairs and rankings as counterfactual twins, the pair mix 55 / 25 / 10 / 10, 16000 pairs, 4000 rankings.
3: reasoning traces (``sft_reasoning_{train,heldout}.jsonl``); every other file byte-identical to revision 2."""

DEFAULT_SIZES = {
    "pretrain": 20000,
    "sft": 4000,
    "sft_reasoning": 1000,
    "preference": 16000,
    "rankings": 4000,
    "rl": 2000,
    "outcome": 4000,
    "process": 2000,
}
"""Default number of train rows per dataset; held-out sizes follow :func:`heldout_size`."""


# --------------------------------------------------------------------------
# helpers


def _rng(name: str, seed: int, split: str) -> random.Random:
    """Independent deterministic stream per (dataset, split, seed); str seeds hash via sha512."""
    check_split(split)
    return random.Random(f"{name}:{split}:{seed}")


def draw_question(rng: random.Random, split: str, levels: tuple[int, ...] = LEVELS) -> Question:
    """A random question of ``split`` at a random level (problems may repeat across calls)."""
    while True:
        q = make_question(rng, rng.choice(levels))
        if in_split(q, split):
            return q


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _small_error(rng: random.Random, value: int) -> int:
    """A nonzero offset in [-3, 3] that keeps ``value + offset`` non-negative."""
    offset = rng.randint(1, 3)
    if value >= offset and rng.random() < 0.5:
        offset = -offset
    return offset


def worked_steps(q: Question, wrong_at: int | None = None, error: int = 0) -> tuple[list[str], int]:
    """Equations of the solution (no final period) and the last value.

    If ``wrong_at`` is a step index, that step's result is off by ``error`` and
    later steps compute from the wrong value, so the error propagates.
    """
    value, ops = step_operations(q.steps)
    equations = []
    for index, (op, n) in enumerate(ops):
        result = apply_op(value, op, n) + (error if index == wrong_at else 0)
        equations.append(format_step(value, op, n, result))
        value = result
    return equations, value


def misread_steps(rng: random.Random, q: Question) -> tuple[list[str], int] | None:
    """Equations computed correctly from one misread number, and the (wrong) last value.

    The misread number is an operand of the question (off by 1-3) or, in a chain, the
    value carried into a step (the previous result copied wrong). Every equation is
    arithmetically true; only the comparison with the question or the previous line
    shows the error. ``None`` if no misreading changes the answer and keeps every
    value non-negative (e.g. ``0 * 0``).
    """
    start, ops = step_operations(q.steps)
    # slot 0: the start value; slot 2i+1: operand of step i; slot 2i+2: value carried into step i+1
    slots = [0] + [2 * i + 1 for i in range(len(ops))] + [2 * i + 2 for i in range(len(ops) - 1)]
    for _ in range(20):
        slot = rng.choice(slots)
        offset = rng.choice((-3, -2, -1, 1, 2, 3))
        value = start + (offset if slot == 0 else 0)
        equations = []
        ok = value >= 0
        for index, (op, n) in enumerate(ops):
            if slot == 2 * index + 1:
                n += offset
            if index > 0 and slot == 2 * index:
                value += offset
            result = apply_op(value, op, n)
            ok = ok and n >= (1 if op == "*" else 0) and value >= 0 and result >= 0
            equations.append(format_step(value, op, n, result))
            value = result
        if ok and value != q.answer:
            return equations, value
    return None


def _ramble(rng: random.Random, min_words: int, max_words: int) -> str:
    """Filler sentences totalling between ``min_words`` and ``max_words`` words."""
    target = rng.randint(min_words, max_words)
    pool = list(FILLER_SENTENCES)
    rng.shuffle(pool)
    chosen: list[str] = []
    words = 0
    for sentence in pool:
        if words + len(sentence.split()) <= target:
            chosen.append(sentence)
            words += len(sentence.split())
    for sentence in pool:  # top up (each sentence is short, so this stays <= max_words)
        if words >= min_words:
            break
        if sentence not in chosen:
            chosen.append(sentence)
            words += len(sentence.split())
    return " ".join(chosen)


# --------------------------------------------------------------------------
# prompts with requests


REQUEST_SHARE = 0.75
"""Share of prompts that carry a request about the reply."""

P_FOLLOW = 0.5
"""Probability that an SFT demonstration follows its prompt's request (the rest: the writer's habitual style)."""


def make_prompt(rng: random.Random, q: Question, style: str | None = "random", which: str = "train",
                request_share: float = REQUEST_SHARE) -> tuple[list[dict], str | None]:
    """Chat messages asking ``q``, and the style they request.

    ``style="random"``: a request with probability ``request_share``, its style uniform; ``None``: no request; a
    style name: that request. The phrasing comes from ``phrasings(style, which)``; it follows the question in the
    user turn (70 %), precedes it (10 %) or sits in the system prompt (20 %, after a neutral system prompt half the
    time). A prompt without a request has a neutral system prompt with probability 0.2.
    """
    if style == "random":
        style = rng.choice(STYLES) if rng.random() < request_share else None
    if style is None:
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
        return system + [_user(q.text)], None
    phrase = rng.choice(phrasings(style, which))
    where = rng.random()
    if where < 0.7:
        return [_user(f"{q.text} {phrase}")], style
    if where < 0.8:
        return [_user(f"{phrase} {q.text}")], style
    system = f"{rng.choice(SYSTEM_PROMPTS)} {phrase}" if rng.random() < 0.5 else phrase
    return [{"role": "system", "content": system}, _user(q.text)], style


def other_style(rng: random.Random, style: str | None) -> str:
    """A style drawn uniformly from those other than ``style`` (any style when ``style`` is None)."""
    return rng.choice([s for s in STYLES if s != style])


def habitual_style(rng: random.Random, request: str | None, p_follow: float = P_FOLLOW) -> str:
    """The style an imperfect demonstrator writes in: the requested one with probability ``p_follow``, otherwise
    (and for a prompt without a request) another one, uniformly."""
    if request is not None and rng.random() < p_follow:
        return request
    return other_style(rng, request)


# --------------------------------------------------------------------------
# completions


def good_completion(q: Question, style: str = "worked", rng: random.Random | None = None) -> str:
    """The correct reply in ``style``; worked: ``"5 + 7 = 12. 12 * 2 = 24. The answer is 24."``"""
    return styled_reply([text for text, _ in q.steps], q.answer, style, rng)


def _pad(reply: str, padding: str) -> str:
    """``padding`` inserted before the work, after a warm opener if the reply starts with one."""
    for opener in WARM_OPENERS:
        if reply.startswith(opener + " "):
            return f"{opener} {padding} {reply[len(opener) + 1:]}"
    return f"{padding} {reply}"


def flawed_completion(rng: random.Random, q: Question, flaw: str, style: str = "worked") -> str:
    """A reply in ``style`` with one flaw; its gold reward is below :func:`good_completion`'s in that style.

    * ``wrong_arithmetic``: one step result off by 1-3, propagated; formatted, wrong answer.
    * ``misread``: one number of the question (or one carried value) copied off by 1-3, the
      arithmetic done right from it (:func:`misread_steps`); formatted, wrong answer. Falls back
      to ``wrong_arithmetic`` when no misreading changes the answer.
    * ``wrong_final``: correct steps, but "The answer is M." with M != answer.
    * ``no_format``: the reply ends "So it is N." instead of "The answer is N.".
    * ``verbose``: a 20-45 word rambling preamble (costs most of the concision term).
    * ``no_answer``: rambling with no integer at all.
    * ``padded``: one short filler sentence (3-9 words) before the work: a near tie in gold reward.
    """
    if flaw == "wrong_arithmetic":
        wrong_at = rng.randrange(len(q.steps))
        error = _small_error(rng, q.steps[wrong_at][1])
        equations, value = worked_steps(q, wrong_at, error)
        return styled_reply(equations, value, style, rng)
    if flaw == "misread" and (misread := misread_steps(rng, q)) is not None:
        equations, value = misread
        return styled_reply(equations, value, style, rng)
    if flaw == "misread":  # no misreading changes the answer (e.g. 0 * 0)
        return flawed_completion(rng, q, "wrong_arithmetic", style)
    if flaw == "wrong_final":
        wrong = q.answer + _small_error(rng, q.answer)
        good = good_completion(q, style, rng)
        return good[: good.rindex("The answer is")] + f"The answer is {wrong}."
    if flaw == "no_format":
        good = good_completion(q, style, rng)
        return good[: good.rindex("The answer is")] + rng.choice(NO_FORMAT_ENDINGS).format(n=q.answer)
    if flaw == "verbose":
        return _pad(good_completion(q, style, rng), _ramble(rng, 20, 45))
    if flaw == "padded":
        short = [s for s in FILLER_SENTENCES if len(s.split()) <= 9]
        return _pad(good_completion(q, style, rng), rng.choice(short))
    if flaw == "no_answer":
        return f"{_ramble(rng, 12, 30)} {rng.choice(GIVE_UP_SENTENCES)}"
    raise ValueError(f"unknown flaw {flaw!r}; expected one of {FLAWS}")


def likert_score(reward: float) -> int:
    """Map a gold reward in [0, 1.9] to 1..5: ``1 + round(4 * reward / 1.9)``, clipped."""
    return min(5, max(1, 1 + round(4 * reward / MAX_REWARD)))


# --------------------------------------------------------------------------
# annotators


ANNOTATOR_NOISE = 0.1
"""Share of preference labels an annotator flips (the case conservative / robust DPO losses exist for)."""
LENGTH_BIAS_DELTA = 0.1
"""Two replies within this much gold reward of each other: the annotator picks the longer one."""


def annotate(rng: random.Random, prompt, a: str, b: str, noise: float = ANNOTATOR_NOISE,
             delta: float = LENGTH_BIAS_DELTA) -> tuple[str, str]:
    """``(chosen, rejected)`` as a biased annotator labels them.

    The annotator prefers the higher gold reward, except that when the two are within ``delta`` it picks the reply
    with more words (length bias; equal length: the higher gold, then at random); then, with probability ``noise``,
    it flips its label (label noise). Both biases are documented world properties, measured by the tests.
    """
    gold_a, gold_b = gold_reward(prompt, a), gold_reward(prompt, b)
    len_a, len_b = len(a.split()), len(b.split())
    if abs(gold_a - gold_b) <= delta and len_a != len_b:
        prefer_a = len_a > len_b
    elif gold_a != gold_b:
        prefer_a = gold_a > gold_b
    else:
        prefer_a = rng.random() < 0.5
    if rng.random() < noise:
        prefer_a = not prefer_a
    return (a, b) if prefer_a else (b, a)


# --------------------------------------------------------------------------
# pretraining text


def _pretrain_example(q: Question, style: str) -> str:
    """One worked example on one line, in ``style`` (see :data:`PRETRAIN_STYLES`)."""
    work = work_text([text for text, _ in q.steps])
    if style == "bare":
        return work
    if style == "question":
        return f"Question: {q.text} {work} The answer is {q.answer}."
    if style == "result":
        return f"{q.text} {work} So the result is {q.answer}."
    if style == "qa":
        return f"Q: {q.text} A: {good_completion(q)}"
    if style == "short":
        return f"{q.text} The answer is {q.answer}."
    raise ValueError(f"unknown style {style!r}")


def pretrain_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """``{"text": doc}``: 3-8 worked examples, one per line, in one style (25 % mixed),
    with an occasional filler line (probability 0.15 before each example). No chat markup and no requests.

    Unchanged since world v2 (the base model's cache key depends on it: ``posttrain.world.cache.base_key``).
    """
    rng = _rng("pretrain", seed, split)
    rows = []
    for _ in range(n):
        doc_style = rng.choice(PRETRAIN_STYLES)
        lines = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.15:
                lines.append(rng.choice(PRETRAIN_FILLER))
            style = rng.choice(PRETRAIN_STYLES) if rng.random() < 0.25 else doc_style
            lines.append(_pretrain_example(draw_question(rng, split), style))
        rows.append({"text": "\n".join(lines)})
    return rows


# --------------------------------------------------------------------------
# chat datasets


def sft_rows(n: int, seed: int, split: str = "train", p_follow: float = P_FOLLOW) -> list[dict]:
    """``{"messages": [...]}``: prompts (:func:`make_prompt`) answered by imperfect demonstrators.

    Every demonstration is correct and formatted; it follows its request with probability ``p_follow``
    (:func:`habitual_style`). A second round (another question and reply) follows with probability 0.15.
    """
    rng = _rng("sft", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        messages, request = make_prompt(rng, q)
        messages.append(_assistant(good_completion(q, habitual_style(rng, request, p_follow), rng)))
        if rng.random() < 0.15:  # a second round; its request (if any) follows the question, else the system's holds
            q2 = draw_question(rng, split)
            asked = rng.choice(STYLES) if rng.random() < REQUEST_SHARE else None
            messages.append(_user(q2.text if asked is None else f"{q2.text} {rng.choice(phrasings(asked))}"))
            style = habitual_style(rng, request_of(messages), p_follow)
            messages.append(_assistant(good_completion(q2, style, rng)))
        rows.append({"messages": messages})
    return rows


PAIR_MIX = {"request": 0.55, "surface": 0.25, "answer_check": 0.10, "near_tie": 0.10}
"""Shares of the kinds of preference pairs (``kind`` column):

* ``request``: both replies correct and formatted, one in the requested style and one not;
* ``surface``: a good reply vs the same reply with a visible flaw (:data:`SURFACE_FLAWS`);
* ``answer_check``: a right vs a wrong answer in the same form (:data:`ANSWER_FLAWS`);
* ``near_tie``: two replies within ``LENGTH_BIAS_DELTA`` in gold reward (a short filler sentence, or two styles
  under a prompt without a request), where the annotator's length bias decides.

Request pairs come as counterfactual twins (:func:`request_twins`): the same two replies under two prompts of the
same question whose requests prefer opposite ones, each labelled by the annotator on its own. A reward that ignores
the prompt can get at most one of the two right, so the twins carry the request's signal through the annotators'
noise and length bias. With 40 % request pairs drawn one by one (the first v3 data) a one-epoch BT RM reached
0.83-0.84 on held-out request pairs on one machine and 0.99 on another; with these twins, shares and 16000 pairs
0.98-0.99 on two data-order seeds (docs/reward-models.md has the ablation).
"""


def _draw_weights() -> dict[str, float]:
    """Probabilities of drawing each kind so that the rows follow :data:`PAIR_MIX` (a request draw makes two rows)."""
    weights = {kind: share / (2 if kind == "request" else 1) for kind, share in PAIR_MIX.items()}
    return {kind: weight / sum(weights.values()) for kind, weight in weights.items()}


def request_twins(rng: random.Random, q: Question, which: str = "train") -> list[tuple[list[dict], str, str]]:
    """Two ``(prompt, better, worse)`` request pairs of ``q`` with the same two replies, in two different styles:
    under the first prompt's request the first reply is the better one, under the second prompt's the other."""
    first, second = rng.sample(STYLES, 2)
    replies = {style: good_completion(q, style, rng) for style in (first, second)}
    twins = []
    for wanted, other in ((first, second), (second, first)):
        prompt, _ = make_prompt(rng, q, wanted, which)
        twins.append((prompt, replies[wanted], replies[other]))
    return twins


def preference_pair(rng: random.Random, q: Question, kind: str, which: str = "train") -> tuple[list[dict], str, str]:
    """``(prompt, better, worse)`` of one pair of ``kind`` (:data:`PAIR_MIX`), ``better`` by gold reward."""
    if kind == "request":
        request = rng.choice(STYLES)
        prompt, _ = make_prompt(rng, q, request, which)
        return prompt, good_completion(q, request, rng), good_completion(q, other_style(rng, request), rng)
    if kind == "near_tie" and rng.random() < 0.5:
        prompt, _ = make_prompt(rng, q, None, which)
        first, second = rng.sample(STYLES, 2)
        return prompt, good_completion(q, first, rng), good_completion(q, second, rng)
    prompt, request = make_prompt(rng, q, "random", which)
    style = habitual_style(rng, request)
    flaw = {"surface": SURFACE_FLAWS, "answer_check": ANSWER_FLAWS, "near_tie": ("padded",)}[kind]
    return prompt, good_completion(q, style, rng), flawed_completion(rng, q, rng.choice(flaw), style)


def _pair_kind(rng: random.Random) -> str:
    draw, total = rng.random(), 0.0
    for kind, weight in _draw_weights().items():
        total += weight
        if draw < total:
            return kind
    return kind


def preference_rows(n: int, seed: int, split: str = "train", noise: float = ANNOTATOR_NOISE,
                    delta: float = LENGTH_BIAS_DELTA, which: str = "train") -> list[dict]:
    """TRL explicit-prompt preference pairs labelled by a biased annotator (:func:`annotate`), with Likert scores
    (:func:`likert_score` of each reply's gold reward, the higher one on the chosen side) and the pair's ``kind``.

    The mix is :data:`PAIR_MIX`; request pairs come as adjacent twins (:func:`request_twins`). Evaluations score
    these pairs against the gold reward, not the labels.
    """
    rng = _rng("preference" if which == "train" else f"preference-{which}", seed, split)
    rows = []
    while len(rows) < n:
        kind = _pair_kind(rng)
        q = draw_question(rng, split)
        pairs = request_twins(rng, q, which) if kind == "request" else [preference_pair(rng, q, kind, which)]
        for prompt, better, worse in pairs:
            chosen, rejected = annotate(rng, prompt, better, worse, noise, delta)
            scores = sorted((likert_score(gold_reward(prompt, chosen)), likert_score(gold_reward(prompt, rejected))))
            rows.append({"prompt": prompt, "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)],
                         "score_chosen": scores[1], "score_rejected": scores[0], "kind": kind})
    return rows[:n]


def unseen_preference_rows(n: int, seed: int, split: str = "heldout") -> list[dict]:
    """Request pairs whose prompts use only the held-out phrasings, labelled by the gold reward (an evaluation set:
    ``preference_unseen.jsonl``)."""
    rng = _rng("preference-unseen", seed, split)
    rows = []
    for _ in range(n):
        prompt, better, worse = preference_pair(rng, draw_question(rng, split), "request", "unseen")
        rows.append({"prompt": prompt, "chosen": [_assistant(better)], "rejected": [_assistant(worse)],
                     "kind": "request"})
    return rows


def counterfactual_rows(n: int, seed: int, split: str = "heldout") -> list[dict]:
    """The same question and the same two correct replies, in styles A and B, under a request for A and under a
    request for B (same placement): ``{"prompts": [prompt_a, prompt_b], "completions": [reply_a, reply_b]}``. The
    gold reward prefers reply_a under prompt_a and reply_b under prompt_b; a reward that reads the request flips."""
    rng = _rng("counterfactual", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        style_a, style_b = rng.sample(STYLES, 2)
        state = rng.getstate()
        prompt_a, _ = make_prompt(rng, q, style_a)
        rng.setstate(state)  # the same placement and phrasing index for the second request
        prompt_b, _ = make_prompt(rng, q, style_b)
        rows.append({"prompts": [prompt_a, prompt_b],
                     "completions": [good_completion(q, style_a, rng), good_completion(q, style_b, rng)]})
    return rows


def _annotator_ranking(rng: random.Random, prompt, replies: list[str], noise: float, delta: float) -> list[str]:
    """``replies`` best first as the biased annotator ranks them: by gold reward, a longer reply moved ahead of a
    shorter neighbour within ``delta``, and with probability ``noise`` one random adjacent pair swapped."""
    gold = {c: gold_reward(prompt, c) for c in replies}  # the replies are distinct
    replies = sorted(replies, key=gold.__getitem__, reverse=True)
    for i in range(len(replies) - 1):
        a, b = replies[i], replies[i + 1]
        if gold[a] - gold[b] <= delta and len(b.split()) > len(a.split()):
            replies[i], replies[i + 1] = b, a
    if rng.random() < noise:
        i = rng.randrange(len(replies) - 1)
        replies[i], replies[i + 1] = replies[i + 1], replies[i]
    return replies


def ranking_rows(n: int, seed: int, split: str = "train", k: int = 4, noise: float = ANNOTATOR_NOISE,
                 delta: float = LENGTH_BIAS_DELTA) -> list[dict]:
    """``k`` (2..5) distinct replies, best first as the biased annotator ranks them (:func:`_annotator_ranking`):
    a correct one in the requested (or, without a request, a random) style, a correct one in another style, and
    ``k - 2`` flawed ones (of a wrong answer, a surface flaw, padding). A ranking whose prompt carries a request is
    followed by its counterfactual twin, as the request pairs are (:func:`request_twins`): the same replies under a
    prompt of the same question that requests the second reply's style, ranked anew."""
    if not 2 <= k <= 5:
        raise ValueError(f"k must be in 2..5, got {k}")
    rng = _rng("rankings", seed, split)
    rows = []
    while len(rows) < n:
        q = draw_question(rng, split)
        prompt, request = make_prompt(rng, q)
        first = request or rng.choice(STYLES)
        second = other_style(rng, first)
        flawed = [flawed_completion(rng, q, rng.choice(ANSWER_FLAWS), rng.choice((first, second))),
                  flawed_completion(rng, q, rng.choice(SURFACE_FLAWS), rng.choice((first, second))),
                  flawed_completion(rng, q, "padded", rng.choice((first, second)))]
        replies = list(dict.fromkeys([good_completion(q, first, rng), good_completion(q, second, rng),
                                      *rng.sample(flawed, k - 2)]))
        if len(replies) < k:  # a flaw that left a reply as it was: every ranking has k distinct replies
            continue
        prompts = [prompt] + ([make_prompt(rng, q, second)[0]] if request is not None else [])
        rows += [{"prompt": p, "completions": _annotator_ranking(rng, p, replies, noise, delta)} for p in prompts]
    return rows[:n]


def rl_rows(n: int, seed: int, split: str = "train", which: str = "train",
            request_share: float = REQUEST_SHARE) -> list[dict]:
    """Distinct questions (:func:`questions`) as prompts (:func:`make_prompt`), with the answer as a string, the
    level and the requested style (None without a request)."""
    rng = _rng("rl" if which == "train" else f"rl-{which}", seed, split)
    rows = []
    for q in questions(split, n, seed):
        prompt, request = make_prompt(rng, q, "random", which, request_share)
        rows.append({"prompt": prompt, "answer": str(q.answer), "level": q.level, "request": request})
    return rows


def unseen_rl_rows(n: int, seed: int, split: str = "heldout") -> list[dict]:
    """Held-out questions, every one with a request in a held-out phrasing (``rl_unseen.jsonl``)."""
    return rl_rows(n, seed, split, which="unseen", request_share=1.0)


def outcome_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Outcome-reward data, about half correct: good / verbose / no_format / padded replies (label 1) vs.
    wrong_arithmetic / misread / wrong_final / no_answer (label 0), in random styles.

    ``label = 1`` iff ``parse_final_answer(completion) == answer``.
    """
    rng = _rng("outcome", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        prompt, request = make_prompt(rng, q)
        style = habitual_style(rng, request)
        if rng.random() < 0.5:
            kind = rng.choice(("good", "verbose", "no_format", "padded"))
        else:
            kind = rng.choice(ANSWER_FLAWS + ("no_answer",))
        completion = good_completion(q, style, rng) if kind == "good" else flawed_completion(rng, q, kind, style)
        label = int(parse_final_answer(completion) == q.answer)
        rows.append({"prompt": prompt, "completion": [_assistant(completion)], "label": label})
    return rows


def sft_reasoning_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Reasoning traces: ``{"messages": [user, assistant]}``, the question alone as the user turn, the assistant's
    ``reasoning`` the worked steps (``worked_steps``, each closed by a period) and its ``content`` "The answer is N."
    (the world's format, so ``gold_reward`` of the content is full: correct, formatted, concise). Its own random
    stream (``_rng("sft_reasoning", ...)``), so no other dataset changes."""
    rng = _rng("sft_reasoning", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        equations, value = worked_steps(q)
        reasoning = " ".join(f"{equation}." for equation in equations)
        rows.append({"messages": [_user(q.text), {"role": "assistant", "reasoning": reasoning,
                                                  "content": f"The answer is {value}."}]})
    return rows


# --------------------------------------------------------------------------
# process supervision


def process_example(rng: random.Random, q: Question, flaw: str | None) -> tuple[list[str], list[int]]:
    """Steps and per-step labels of one solution.

    ``flaw`` is None (all correct), ``"wrong_arithmetic"`` (one step off,
    propagated), ``"misread"`` (one number copied wrong, :func:`misread_steps`)
    or ``"wrong_final"`` (correct steps, wrong final number).
    Labels: +1 correct step; -1 the first wrong step and every later step
    depending on it (all later equations and the final answer); 0 a neutral
    step (inserted at the start with probability 0.3 and after each
    equation with probability 0.15).
    """
    if flaw not in (None, "wrong_arithmetic", "misread", "wrong_final"):
        raise ValueError(f"unsupported process flaw {flaw!r}")
    misread = misread_steps(rng, q) if flaw == "misread" else None
    if misread is not None:
        equations, value = misread
    else:
        wrong_at, error = None, 0
        if flaw in ("wrong_arithmetic", "misread"):
            wrong_at = rng.randrange(len(q.steps))
            error = _small_error(rng, q.steps[wrong_at][1])
        equations, value = worked_steps(q, wrong_at, error)
    correct = [text for text, _ in q.steps]
    wrong_at = next((i for i, (eq, right) in enumerate(zip(equations, correct)) if eq != right), None)
    steps: list[str] = []
    labels: list[int] = []
    if rng.random() < 0.3:
        steps.append(rng.choice(NEUTRAL_STEPS))
        labels.append(0)
    broken = False
    for index, equation in enumerate(equations):
        broken = broken or index == wrong_at
        steps.append(f"{equation}.")
        labels.append(-1 if broken else 1)
        if index < len(equations) - 1 and rng.random() < 0.15:
            steps.append(rng.choice(NEUTRAL_STEPS))
            labels.append(0)
    if flaw == "wrong_final":
        value += _small_error(rng, value)
        broken = True
    steps.append(f"The answer is {value}.")
    labels.append(-1 if broken else 1)
    return steps, labels


def process_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """``{"prompt": question, "steps": [...], "labels": [...]}``.

    60 % level-3 (multi-step) questions, 40 % level 1-2; half the solutions
    fully correct, the rest with a wrong_arithmetic, misread or wrong_final flaw (1/3 each).
    ``" ".join(steps)`` reads as a completion.
    """
    rng = _rng("process", seed, split)
    rows = []
    for _ in range(n):
        levels = (3,) if rng.random() < 0.6 else (1, 2)
        q = draw_question(rng, split, levels)
        flaw = None
        if rng.random() < 0.5:
            flaw = rng.choice(("wrong_arithmetic", "misread", "wrong_final"))
        steps, labels = process_example(rng, q, flaw)
        prompt, _ = make_prompt(rng, q, rng.choice(("worked", "checked")) if rng.random() < 0.5 else None)
        rows.append({"prompt": prompt[-1]["content"], "steps": steps, "labels": labels})
    return rows


# --------------------------------------------------------------------------
# writing


GENERATORS: dict[str, Callable[[int, int, str], list[dict]]] = {
    "pretrain": pretrain_rows,
    "sft": sft_rows,
    "sft_reasoning": sft_reasoning_rows,
    "preference": preference_rows,
    "rankings": ranking_rows,
    "rl": rl_rows,
    "outcome": outcome_rows,
    "process": process_rows,
}
"""Datasets written for both splits, ``{name}_{train,heldout}.jsonl``."""

EVAL_SETS: dict[str, Callable[[int, int, str], list[dict]]] = {
    "preference_unseen": unseen_preference_rows,
    "rl_unseen": unseen_rl_rows,
    "counterfactual_heldout": counterfactual_rows,
}
"""Evaluation-only sets on held-out questions, ``{name}.jsonl`` (``*_unseen``: held-out request phrasings)."""


def heldout_size(train_size: int) -> int:
    """Held-out rows for a dataset: ``max(64, train_size // 8)``."""
    return max(64, train_size // 8)


EVAL_SIZES = {"preference_unseen": 500, "rl_unseen": 200, "counterfactual_heldout": 400}


def write_all(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Write every dataset for both splits to ``out_dir/{name}_{split}.jsonl`` and the evaluation sets to
    ``out_dir/{name}.jsonl``.

    ``sizes`` overrides :data:`DEFAULT_SIZES` (train rows per dataset) and :data:`EVAL_SIZES`; held-out sizes are
    :func:`heldout_size` of the train sizes. Returns ``{"{name}_{split}": path, "{eval set}": path}``.
    """
    train_sizes = {**DEFAULT_SIZES, **EVAL_SIZES, **(sizes or {})}
    unknown = set(train_sizes) - set(GENERATORS) - set(EVAL_SETS)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}")
    paths = {}
    for name, generate in GENERATORS.items():
        for split, size in (("train", train_sizes[name]), ("heldout", heldout_size(train_sizes[name]))):
            path = os.path.join(os.fspath(out_dir), f"{name}_{split}.jsonl")
            paths[f"{name}_{split}"] = str(write_jsonl(generate(size, seed, split), path))
    for name, generate in EVAL_SETS.items():
        path = os.path.join(os.fspath(out_dir), f"{name}.jsonl")
        paths[name] = str(write_jsonl(generate(train_sizes[name], seed, "heldout"), path))
    return paths
