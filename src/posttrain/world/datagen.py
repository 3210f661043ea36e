"""Completions and datasets of the tiny world.

Every generator has the signature ``(n, seed, split="train") -> list[dict]``,
is deterministic in ``(n, seed, split)``, uses only questions of ``split``
(so held-out data never shares a problem with train data) and returns
JSON-serialisable rows:

* ``pretrain_rows``:   ``{"text": str}`` plain documents of 3-8 worked examples.
* ``sft_rows``:        ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn.
* ``preference_rows``: ``{"prompt": [user msg], "chosen": [assistant msg],
  "rejected": [assistant msg], "score_chosen": int, "score_rejected": int}``.
* ``ranking_rows``:    ``{"prompt": [user msg], "completions": [str] * 4}`` best first.
* ``rl_rows``:         ``{"prompt": [user msg], "answer": str, "level": int}``.
* ``outcome_rows``:    ``{"prompt": [user msg], "completion": [assistant msg], "label": 0 | 1}``.
* ``process_rows``:    ``{"prompt": str, "steps": [str], "labels": [int]}`` with labels in {-1, 0, 1}.

Completions: :func:`good_completion` (worked steps, then "The answer is N.")
has the highest gold reward; each flaw of :func:`flawed_completion` scores
strictly lower.
"""

from __future__ import annotations

import os
import random
from typing import Callable

from posttrain.data.io import write_jsonl

from .gold import MAX_REWARD, gold_reward, parse_final_answer
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

FLAWS = ("wrong_arithmetic", "misread", "no_format", "verbose", "wrong_final", "no_answer")

SYSTEM_PROMPTS = (
    "You are a careful math tutor.",
    "You are a helpful assistant. Answer arithmetic questions concisely.",
    "Solve the problem step by step and end with 'The answer is N.'",
    "You are a precise calculator that shows its work.",
)

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

DEFAULT_SIZES = {
    "pretrain": 20000,
    "sft": 4000,
    "preference": 4000,
    "rankings": 2000,
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


def _sentences(equations: list[str]) -> str:
    """``["5 + 7 = 12", "12 * 2 = 24"]`` -> ``"5 + 7 = 12. 12 * 2 = 24."``"""
    return " ".join(f"{equation}." for equation in equations)


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
# completions


def good_completion(q: Question) -> str:
    """Worked steps then the answer: ``"5 + 7 = 12. 12 * 2 = 24. The answer is 24."``"""
    return f"{_sentences([text for text, _ in q.steps])} The answer is {q.answer}."


def flawed_completion(rng: random.Random, q: Question, flaw: str) -> str:
    """A completion with one flaw; its gold reward is strictly below :func:`good_completion`'s.

    * ``wrong_arithmetic``: one step result off by 1-3, propagated; formatted, wrong answer.
    * ``misread``: one number of the question (or one carried value) copied off by 1-3, the
      arithmetic done right from it (:func:`misread_steps`); formatted, wrong answer. Falls back
      to ``wrong_arithmetic`` when no misreading changes the answer.
    * ``no_format``: correct work ending "So it is N." (no "The answer is N.").
    * ``verbose``: a 40-80 word rambling preamble, then the good completion.
    * ``wrong_final``: correct steps, but "The answer is M." with M != answer.
    * ``no_answer``: rambling with no integer at all.
    """
    equations = [text for text, _ in q.steps]
    if flaw == "wrong_arithmetic":
        wrong_at = rng.randrange(len(q.steps))
        error = _small_error(rng, q.steps[wrong_at][1])
        wrong_equations, value = worked_steps(q, wrong_at, error)
        return f"{_sentences(wrong_equations)} The answer is {value}."
    if flaw == "misread" and (misread := misread_steps(rng, q)) is not None:
        equations, value = misread
        return f"{_sentences(equations)} The answer is {value}."
    if flaw == "misread":  # no misreading changes the answer (e.g. 0 * 0)
        return flawed_completion(rng, q, "wrong_arithmetic")
    if flaw == "no_format":
        ending = rng.choice(NO_FORMAT_ENDINGS).format(n=q.answer)
        return f"{_sentences(equations)} {ending}"
    if flaw == "verbose":
        return f"{_ramble(rng, 40, 80)} {good_completion(q)}"
    if flaw == "wrong_final":
        wrong = q.answer + _small_error(rng, q.answer)
        return f"{_sentences(equations)} The answer is {wrong}."
    if flaw == "no_answer":
        return f"{_ramble(rng, 12, 30)} {rng.choice(GIVE_UP_SENTENCES)}"
    raise ValueError(f"unknown flaw {flaw!r}; expected one of {FLAWS}")


def candidate_completions(rng: random.Random, q: Question) -> list[str]:
    """The good completion followed by one completion per flaw (in :data:`FLAWS` order)."""
    return [good_completion(q)] + [flawed_completion(rng, q, flaw) for flaw in FLAWS]


def likert_score(reward: float) -> int:
    """Map a gold reward in [0, 1.5] to 1..5: ``1 + round(4 * reward / 1.5)``, clipped."""
    return min(5, max(1, 1 + round(4 * reward / MAX_REWARD)))


# --------------------------------------------------------------------------
# pretraining text


def _pretrain_example(q: Question, style: str) -> str:
    """One worked example on one line, in ``style`` (see :data:`PRETRAIN_STYLES`)."""
    work = _sentences([text for text, _ in q.steps])
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
    with an occasional filler line (probability 0.15 before each example). No chat markup.
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


def sft_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """``{"messages": [...]}``: user question -> assistant good completion.

    A system message comes first with probability 0.2; a second round
    (another question and its good completion) follows with probability 0.15.
    """
    rng = _rng("sft", seed, split)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        rounds = 2 if rng.random() < 0.15 else 1
        for _ in range(rounds):
            q = draw_question(rng, split)
            messages += [_user(q.text), _assistant(good_completion(q))]
        rows.append({"messages": messages})
    return rows


def preference_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """TRL explicit-prompt preference pairs with Likert scores (:func:`likert_score`).

    Half of the pairs are good vs. a random flaw, the rest two random distinct
    candidates; pairs with equal gold reward are redrawn. ``chosen`` has the
    higher gold reward.
    """
    rng = _rng("preference", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        candidates = candidate_completions(rng, q)
        while True:
            if rng.random() < 0.5:
                a, b = candidates[0], rng.choice(candidates[1:])
            else:
                a, b = rng.sample(candidates, 2)
            reward_a, reward_b = gold_reward(q.text, a), gold_reward(q.text, b)
            if reward_a != reward_b:
                break
        if reward_a < reward_b:
            a, b, reward_a, reward_b = b, a, reward_b, reward_a
        rows.append({
            "prompt": [_user(q.text)],
            "chosen": [_assistant(a)],
            "rejected": [_assistant(b)],
            "score_chosen": likert_score(reward_a),
            "score_rejected": likert_score(reward_b),
        })
    return rows


def ranking_rows(n: int, seed: int, split: str = "train", k: int = 4) -> list[dict]:
    """``k`` (at most 5) candidates with pairwise distinct gold rewards, best first."""
    if not 2 <= k <= 5:
        raise ValueError(f"k must be in 2..5, got {k}")
    rng = _rng("rankings", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        candidates = candidate_completions(rng, q)
        rng.shuffle(candidates)
        by_reward: dict[float, str] = {}
        for completion in candidates:
            by_reward.setdefault(gold_reward(q.text, completion), completion)
        best_first = [by_reward[r] for r in sorted(by_reward, reverse=True)]
        chosen = sorted(rng.sample(range(len(best_first)), k))
        rows.append({"prompt": [_user(q.text)], "completions": [best_first[i] for i in chosen]})
    return rows


def rl_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Distinct questions (:func:`questions`) with the answer as a string."""
    return [
        {"prompt": [_user(q.text)], "answer": str(q.answer), "level": q.level}
        for q in questions(split, n, seed)
    ]


def outcome_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Outcome-reward data, about half correct: good / verbose / no_format completions
    (label 1) vs. wrong_arithmetic / misread / wrong_final / no_answer (label 0).

    ``label = 1`` iff ``parse_final_answer(completion) == answer``.
    """
    rng = _rng("outcome", seed, split)
    rows = []
    for _ in range(n):
        q = draw_question(rng, split)
        if rng.random() < 0.5:
            kind = rng.choice(("good", "verbose", "no_format"))
        else:
            kind = rng.choice(("wrong_arithmetic", "misread", "wrong_final", "no_answer"))
        completion = good_completion(q) if kind == "good" else flawed_completion(rng, q, kind)
        label = int(parse_final_answer(completion) == q.answer)
        rows.append({"prompt": [_user(q.text)], "completion": [_assistant(completion)], "label": label})
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
        rows.append({"prompt": q.text, "steps": steps, "labels": labels})
    return rows


# --------------------------------------------------------------------------
# writing


GENERATORS: dict[str, Callable[[int, int, str], list[dict]]] = {
    "pretrain": pretrain_rows,
    "sft": sft_rows,
    "preference": preference_rows,
    "rankings": ranking_rows,
    "rl": rl_rows,
    "outcome": outcome_rows,
    "process": process_rows,
}


def heldout_size(train_size: int) -> int:
    """Held-out rows for a dataset: ``max(64, train_size // 8)``."""
    return max(64, train_size // 8)


def write_all(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Write every dataset for both splits to ``out_dir/{name}_{split}.jsonl``.

    ``sizes`` overrides :data:`DEFAULT_SIZES` (train rows per dataset); held-out
    sizes are :func:`heldout_size` of those. Returns ``{"{name}_{split}": path}``.
    """
    train_sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(train_sizes) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}")
    paths = {}
    for name, generate in GENERATORS.items():
        for split, size in (("train", train_sizes[name]), ("heldout", heldout_size(train_sizes[name]))):
            path = os.path.join(os.fspath(out_dir), f"{name}_{split}.jsonl")
            paths[f"{name}_{split}"] = str(write_jsonl(generate(size, seed, split), path))
    return paths
