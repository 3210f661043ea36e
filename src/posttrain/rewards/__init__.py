"""One reward interface: ``reward(prompts, completions, **columns) -> list[float | None]`` (None = cannot score).

Prompts are chat message lists (or plain strings, read as one user turn); completions are the assistant's reply
(a string, or a message list whose last assistant message is used). RL, rejection sampling, best-of-N and
evaluation all consume rewards through this interface.

Implementations here: trained reward models (Bradley-Terry family: ``ScalarRewardModel``; outcome RM:
``OutcomeRewardModel``; process RM: ``ProcessRewardModel``, which also gives per-step rewards), the tiny world's
``GoldReward``, any verifier function (``VerifierReward``) and ``WeightedSum`` of any of them. Judges
(``posttrain.rewards.judge``) fit the same interface.

Scoring sorts the batch by length before cutting it into forward passes, so similar lengths share a pass and
padding is small (the book's tip; benchmarks/rm.py measures it); results come back in the caller's order.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from posttrain.data.harmony import completion_message
from posttrain.data.messages import completion_text, to_messages
from posttrain.data.packing import Example
from posttrain.data.render import render_conversation

STEP_SEPARATOR = "\n"  # process RMs see a solution as steps joined by this separator


class Reward(Protocol):
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]: ...


class RewardModelKind(StrEnum):
    scalar = "scalar"  # sequence classification, 1 label: Bradley-Terry / margin / K-wise RMs
    outcome = "outcome"  # token classification, 1 label: ORM
    process = "process"  # token classification, 3 labels (incorrect, neutral, correct): PRM


def reward_model_kind(path: str | Path) -> RewardModelKind:
    """What a saved reward model is, from its config.json (architectures, num_labels), or for a LoRA-trained one
    from its adapter config (task type, head size)."""
    from posttrain.models.adapters import adapter_head_kind, is_adapter_dir

    if is_adapter_dir(path):
        if kind := adapter_head_kind(path):
            return RewardModelKind(kind)
        raise ValueError(f"{path}: a causal LM's adapter, not a reward model's")
    config = json.loads((Path(path) / "config.json").read_text())
    architecture = (config.get("architectures") or [""])[0]
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if architecture.endswith("ForSequenceClassification"):
        return RewardModelKind.scalar
    if architecture.endswith("ForTokenClassification"):
        return RewardModelKind.process if labels == 3 else RewardModelKind.outcome
    raise ValueError(f"{path}: not a posttrain reward model (architecture {architecture!r})")


class _ModelReward:
    """Shared loading and length-sorted batching of the three reward-model kinds.

    Inference runs the model's own forward on right-padded batches of similar length (sorted, so padding is
    small): for scoring, that is faster than padding-free rows, and the pooling is exactly HF's.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", max_length: int = 1024,
                 batch_tokens: int | None = None):
        from posttrain.models.loading import load_tokenizer, resolve_device

        self.path = Path(path)
        self.kind = reward_model_kind(self.path)
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = self._load().to(self.device).eval()
        # padded tokens per forward: on a CPU small batches stay in cache (the tiny world's RM scores 23 % faster at
        # 2048 than at 8192 on one thread); an accelerator wants them large
        self.max_length = max_length
        self.batch_tokens = batch_tokens or (2048 if self.device.type == "cpu" else 8192)
        self.skipped = 0  # sequences longer than max_length (scored None)

    def _load(self):
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        from posttrain.models.adapters import is_adapter_dir

        if is_adapter_dir(self.path):  # LoRA-trained: its base with the adapter and the trained head merged in
            from posttrain.models.heads import load_head_model

            return load_head_model(self.path, self.kind.value)
        cls = AutoModelForSequenceClassification if self.kind == RewardModelKind.scalar else AutoModelForTokenClassification
        return cls.from_pretrained(str(self.path), local_files_only=True, dtype=torch.float32,
                                   attn_implementation="sdpa")

    def encode(self, prompts, completions) -> list[Example | None]:
        examples: list[Example | None] = []
        for prompt, completion in zip(prompts, completions):
            ids, mask = render_conversation(self.tokenizer, to_messages(prompt) + [completion_message(completion)],
                                            "final_turn_only")
            if len(ids) > self.max_length:
                self.skipped += 1
                examples.append(None)
            else:
                examples.append(Example(ids, mask))
        return examples

    @torch.no_grad()
    def forward(self, examples: list[Example | None], per_sequence: Callable) -> list[Any]:
        """``per_sequence(logits_row (T, labels), example, index)`` for every example, in length-sorted batches whose
        padded size stays within ``batch_tokens``."""
        present = [i for i, e in enumerate(examples) if e is not None]
        results: list[Any] = [None] * len(examples)
        order = sorted(present, key=lambda i: -len(examples[i]))
        start = 0
        while start < len(order):
            width = len(examples[order[start]])  # the longest of this batch (sorted)
            rows = max(1, self.batch_tokens // width)
            indices = order[start : start + rows]
            start += rows
            input_ids = torch.full((len(indices), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for b, i in enumerate(indices):
                n = len(examples[i])
                input_ids[b, :n] = torch.tensor(examples[i].input_ids)
                attention_mask[b, :n] = 1
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits.float()
            for b, i in enumerate(indices):
                results[i] = per_sequence(logits[b], examples[i], i)
        return results


class ScalarRewardModel(_ModelReward):
    """A Bradley-Terry-family RM: the score head on the last non-padding token of prompt + completion."""

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        # Sequence classification pools the last non-pad token itself: logits are (1,) per row.
        return self.forward(self.encode(prompts, completions), lambda logits, example, i: float(logits[0]))


class OutcomeRewardModel(_ModelReward):
    """An ORM: per-token P(correct) over the completion tokens, aggregated by ``last`` (default), ``mean``
    or ``min``."""

    def __init__(self, path, *, aggregation: str = "last", **kwargs):
        super().__init__(path, **kwargs)
        if aggregation not in ("last", "mean", "min"):
            raise ValueError(f"ORM aggregation must be last, mean or min, got {aggregation!r}")
        self.aggregation = aggregation

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        def score(logits, example, i):
            completion = torch.tensor(example.loss_mask, dtype=torch.bool, device=logits.device)
            probabilities = torch.sigmoid(logits[: len(example)][completion].squeeze(-1))
            match self.aggregation:
                case "last":
                    return float(probabilities[-1])
                case "mean":
                    return float(probabilities.mean())
                case "min":
                    return float(probabilities.min())

        return self.forward(self.encode(prompts, completions), score)


def aggregate_steps(step_scores: list[float], aggregation: str) -> float | None:
    """Combine per-step P(correct) into one reward: min (weakest step), mean, last, or product (all correct)."""
    if not step_scores:
        return None
    match aggregation:
        case "min":
            return min(step_scores)
        case "mean":
            return sum(step_scores) / len(step_scores)
        case "last":
            return step_scores[-1]
        case "product":
            product = 1.0
            for s in step_scores:
                product *= s
            return product
    raise ValueError(f"PRM aggregation must be min, mean, last or product, got {aggregation!r}")


def step_boundary_tokens(tokenizer, messages: list[dict], steps: list[str]) -> tuple[list[int], list[int]]:
    """Render a conversation whose last assistant turn is ``STEP_SEPARATOR.join(steps)``; return the ids and the
    index of the token holding the last character of each step (where a PRM is trained and read)."""
    from posttrain.data.render import render_with_offsets

    ids, _, offsets, reply_start = render_with_offsets(tokenizer, messages)
    ends, position = [], reply_start
    for step in steps:
        position += len(step)
        ends.append(position - 1)  # the step's last character
        position += len(STEP_SEPARATOR)
    boundaries, t = [], 0
    for char in ends:
        while t < len(offsets) and offsets[t][1] <= char:
            t += 1
        boundaries.append(t)
    return ids, boundaries


class ProcessRewardModel(_ModelReward):
    """A PRM: P(correct) at the end of every step; the reward aggregates them (``min`` by default).
    Steps come from a ``steps`` column when given, else from splitting the completion on ``STEP_SEPARATOR``."""

    def __init__(self, path, *, aggregation: str = "min", **kwargs):
        super().__init__(path, **kwargs)
        aggregate_steps([1.0], aggregation)  # validate
        self.aggregation = aggregation

    def step_rewards(self, prompts, completions, steps: list[list[str]] | None = None) -> list[list[float] | None]:
        if steps is None:
            steps = [[s for s in completion_text(c).split(STEP_SEPARATOR) if s.strip()] for c in completions]
        examples, boundaries = [], []
        for prompt, step_list in zip(prompts, steps):
            messages = to_messages(prompt) + [{"role": "assistant", "content": STEP_SEPARATOR.join(step_list)}]
            ids, positions = step_boundary_tokens(self.tokenizer, messages, step_list)
            if len(ids) > self.max_length or not step_list:
                self.skipped += 1
                examples.append(None)
            else:
                examples.append(Example(ids, [0] * len(ids)))
            boundaries.append(positions)

        # P(correct) at each step's last token. (steps, 3) -> (steps,)
        return self.forward(examples, lambda logits, example, i: torch.softmax(logits[boundaries[i]], -1)[:, 2].tolist())

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        per_step = self.step_rewards(prompts, completions, columns.get("steps"))
        return [None if s is None else aggregate_steps(s, self.aggregation) for s in per_step]


def load_reward_model(path: str | Path, **kwargs) -> _ModelReward:
    """The right reward class for a saved reward model directory."""
    match reward_model_kind(path):
        case RewardModelKind.scalar:
            return ScalarRewardModel(path, **kwargs)
        case RewardModelKind.outcome:
            return OutcomeRewardModel(path, **kwargs)
        case RewardModelKind.process:
            return ProcessRewardModel(path, **kwargs)


class GoldReward:
    """The tiny world's ground-truth reward (correctness + format + brevity); None for a non-world prompt."""

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        from posttrain.world.gold import gold_reward
        from posttrain.world.tasks import solve

        results = []
        for prompt, completion in zip(prompts, completions):
            question = to_messages(prompt)[-1]["content"]
            results.append(gold_reward(prompt, completion_text(completion)) if solve(question) is not None else None)
        return results


class VerifierReward:
    """Wrap ``verify(completion_text, **row_columns) -> float | bool | None`` (e.g. a math or code checker)."""

    def __init__(self, verify: Callable[..., Any]):
        self.verify = verify

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        results = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items()}
            try:
                value = self.verify(completion_text(completion), **row)
            except Exception:  # a verifier that crashes on one input cannot score it
                value = None
            results.append(None if value is None else float(value))
        return results


class WeightedSum:
    """sum_i w_i * r_i; None where any component is None (a partial sum would silently change the scale)."""

    def __init__(self, components: Sequence[tuple[float, Reward]]):
        self.components = list(components)

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        parts = [(w, r(prompts, completions, **columns)) for w, r in self.components]
        totals: list[float | None] = []
        for i in range(len(completions)):
            values = [(w, scores[i]) for w, scores in parts]
            totals.append(None if any(v is None for _, v in values) else sum(w * v for w, v in values))
        return totals


def reward_from_spec(spec: str, *, device: str = "auto") -> Reward:
    """Build a reward from a command-line spec.

    ``gold``                  the tiny world's gold reward
    ``verifier:math``         math-verify against the row's ``answer`` column (see ``posttrain.rewards.verifiers``)
    ``rm:DIR``                a trained reward model (scalar / ORM / PRM, from its saved config)
    ``orm:DIR[:last|mean|min]`` / ``prm:DIR[:min|mean|last|product]``  with an explicit aggregation
    ``judge:DIR``             a local model as a pointwise 1-10 judge
    ``0.7*rm:DIR+0.3*gold``   a weighted sum of any of these (``+``-separated ``weight*spec`` terms)
    """
    spec = spec.strip()
    if "+" in spec:
        return WeightedSum([_weighted_term(term, device) for term in spec.split("+")])
    if "*" in spec.split(":", 1)[0]:
        return WeightedSum([_weighted_term(spec, device)])
    kind, _, rest = spec.partition(":")
    match kind:
        case "gold":
            return GoldReward()
        case "verifier":
            from posttrain.rewards.verifiers import VERIFIERS

            if rest not in VERIFIERS:
                raise ValueError(f"unknown verifier {rest!r} in reward {spec!r}; known: {sorted(VERIFIERS)}")
            return VerifierReward(VERIFIERS[rest])
        case "rm":
            return load_reward_model(_existing_dir(rest, spec), device=device)
        case "orm" | "prm":
            path, _, aggregation = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in AGGREGATIONS else (rest, "", "")
            cls = OutcomeRewardModel if kind == "orm" else ProcessRewardModel
            kwargs = {"aggregation": aggregation} if aggregation else {}
            return cls(_existing_dir(path, spec), device=device, **kwargs)
        case "judge":
            from posttrain.rewards.judge import JudgeReward, LocalBackend

            return JudgeReward(LocalBackend.from_dir(_existing_dir(rest, spec), device=device, max_new_tokens=64))
    raise ValueError(f"unknown reward {spec!r}: use gold, verifier:math, rm:DIR, orm:DIR, prm:DIR, judge:DIR or "
                     f"weighted sums like 0.5*rm:DIR+0.5*gold")


AGGREGATIONS = ("last", "mean", "min", "product")


def _existing_dir(path: str, spec: str) -> str:
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"reward {spec!r}: no model directory {path!r}")
    return path


def _weighted_term(term: str, device: str) -> tuple[float, Reward]:
    weight, star, rest = term.strip().partition("*")
    if not star:
        return 1.0, reward_from_spec(term, device=device)
    try:
        return float(weight), reward_from_spec(rest, device=device)
    except ValueError as err:
        raise ValueError(f"bad weighted reward term {term!r}: {err}") from None
