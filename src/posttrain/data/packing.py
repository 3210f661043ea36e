"""Encoding rendered examples into padding-free batches.

A packed row holds several examples back to back, with ``position_ids`` restarting at 0 for each example and
``cu_seq_lens`` (cumulative example lengths) marking the boundaries. Attention stays within each example either way:
with posttrain's segment attention (``posttrain.models.attention``) or flash-attention it reads ``cu_seq_lens``; with sdpa or
eager attention transformers derives a block-diagonal causal mask from ``position_ids``. So a packed row computes
exactly what the examples would compute alone. Labels are -100 off the loss mask and at example boundaries, so no
example predicts the first token of the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class Truncation:
    """What to do with an example longer than ``max_length``."""

    drop = "drop"  # drop it (counted and reported)
    right = "right"  # keep the first max_length tokens; dropped if no trained token is left


def fit_length(example: Example, max_length: int, truncation: str) -> Example | None:
    """``example`` itself, truncated on the right, or None (to drop) — see ``Truncation``."""
    if len(example) <= max_length:
        return example
    if truncation == Truncation.drop:
        return None
    if truncation != Truncation.right:
        raise ValueError(f"unknown truncation {truncation!r}: use 'drop' or 'right'")
    cut = Example(example.input_ids[:max_length], example.loss_mask[:max_length])
    # The first token is never predicted, so a row needs a trained token at position >= 1.
    return cut if any(cut.loss_mask[1:]) else None


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack example indices into rows of at most ``capacity`` tokens (longest first; deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> ``input_ids``, ``position_ids``, ``labels`` (B, L), right-padded to the longest row.

    ``labels[b, t]`` is the target for predicting token t (HF convention: the model shifts), -100 where untrained.
    Padding gets its own position run (0, 1, ...) so it forms a separate block that no example attends to.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for example in row:
            n = len(example)
            ids = torch.tensor(example.input_ids, dtype=torch.long)
            mask = torch.tensor(example.loss_mask, dtype=torch.bool)
            input_ids[b, t : t + n] = ids
            position_ids[b, t : t + n] = torch.arange(n)
            example_labels = torch.where(mask, ids, torch.tensor(-100))
            example_labels[0] = -100  # nothing predicts an example's first token
            labels[b, t : t + n] = example_labels
            t += n
        position_ids[b, t:] = torch.arange(width - t)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def collate_padded(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The classic layout, one example per row, right-padded, with an attention mask (the reference for tests)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.where(torch.tensor(example.loss_mask, dtype=torch.bool), ids, torch.tensor(-100))
        labels[b, 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_flat(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """All ``examples`` in ONE row of exactly their total length (no padding at all), with ``cu_seq_lens``."""
    batch = collate_packed([examples], pad_token_id)
    lengths = torch.tensor([0] + [len(e) for e in examples])
    batch["cu_seq_lens"] = lengths.cumsum(0)  # (S+1,)
    return batch


def pack_batch(examples: list[Example], row_capacity: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Padding-free collation of one batch: first-fit-decreasing into rows of ``row_capacity`` tokens."""
    capacity = max(row_capacity, max(len(e) for e in examples))
    bins = first_fit_decreasing([len(e) for e in examples], capacity)
    return collate_packed([[examples[i] for i in row] for row in bins], pad_token_id)


def shared_prefix_length(examples: list[Example]) -> int:
    """Tokens every example starts with (at most ``min(len) - 1``, so each keeps its own last token)."""
    shortest = min(len(e) for e in examples)
    n = 0
    while n < shortest - 1 and all(e.input_ids[n] == examples[0].input_ids[n] for e in examples):
        n += 1
    return n


def collate_shared_prefix(groups: list[list[Example]]) -> dict:
    """Groups of examples that share a prompt -> ONE padding-free row that holds each prompt once.

    Segment g is ``prefix_g | suffix_g1 | ... | suffix_gK``: the tokens the group's examples have in common (the
    rendered prompt), then what is left of each example. Each suffix restarts its ``position_ids`` where the prefix
    ends, and ``segment_masks[g]`` (L_g, L_g) lets a suffix token see the prefix and the earlier tokens of its own
    suffix only, so every token computes exactly what it computes in its own full sequence: the prompt is forwarded
    once per group instead of once per completion (the saving grows with prompt length and K).

    Returns ``input_ids``/``position_ids`` (1, N), ``cu_seq_lens`` (G+1,) segment boundaries, ``segment_masks``
    (list of G bool tensors, None for a group of one) and ``layout``: for each example, in order,
    ``(prefix_start, prefix_length, suffix_start)`` — its token t sits at flat index ``prefix_start + t`` if
    ``t < prefix_length``, else ``suffix_start + t - prefix_length`` (see :func:`flat_index`).
    """
    ids: list[int] = []
    positions: list[int] = []
    boundaries = [0]
    masks: list[torch.Tensor | None] = []
    layout: list[tuple[int, int, int]] = []
    for examples in groups:
        segment_start = len(ids)
        prefix = shared_prefix_length(examples) if len(examples) > 1 else 0
        ids += examples[0].input_ids[:prefix]
        positions += list(range(prefix))
        branch = [0] * prefix
        for k, example in enumerate(examples, start=1):
            suffix = example.input_ids[prefix:]
            layout.append((segment_start, prefix, len(ids)))
            ids += suffix
            positions += list(range(prefix, len(example)))
            branch += [k] * len(suffix)
        boundaries.append(len(ids))
        if len(examples) == 1:
            masks.append(None)
            continue
        owner = torch.tensor(branch)
        causal = torch.ones(len(owner), len(owner), dtype=torch.bool).tril()
        masks.append(causal & ((owner[None, :] == 0) | (owner[None, :] == owner[:, None])))  # (L_g, L_g)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(boundaries),
        "segment_masks": masks,
        "layout": layout,
    }


def flat_index(layout: tuple[int, int, int], t: int) -> int:
    """Flat index, in a :func:`collate_shared_prefix` row, of token ``t`` of the example with this ``layout``."""
    prefix_start, prefix_length, suffix_start = layout
    return prefix_start + t if t < prefix_length else suffix_start + t - prefix_length


def add_scored_tokens(batch: dict, groups: list[list[Example]]) -> dict:
    """Add ``predictors``, ``targets`` and ``owners`` (n,) to a :func:`collate_shared_prefix` batch of ``groups``:
    for every token t >= 1 on an example's loss mask, the flat index of the position that predicts it (token t-1's),
    the token, and the example's index (in order over all examples of all groups). See
    ``posttrain.models.logprobs``."""
    predictors, targets, owners = [], [], []
    examples = [e for group in groups for e in group]
    for k, (layout, example) in enumerate(zip(batch["layout"], examples)):
        for t in range(1, len(example)):
            if example.loss_mask[t]:
                predictors.append(flat_index(layout, t - 1))
                targets.append(example.input_ids[t])
                owners.append(k)
    batch["predictors"] = torch.tensor(predictors, dtype=torch.long)
    batch["targets"] = torch.tensor(targets, dtype=torch.long)
    batch["owners"] = torch.tensor(owners, dtype=torch.long)
    return batch


def token_owners(batch: dict) -> torch.Tensor:
    """The sequence each scored token belongs to (n,), in ``scored_positions`` order: ``batch["owners"]`` when given
    (shared-prompt rows), else the example of a flat row (``cu_seq_lens``) or the row of a padded batch."""
    if "owners" in batch:
        return batch["owners"]
    labels = batch["labels"]  # (B, T)
    rows, width = labels.shape
    scored = labels[:, 1:] != -100
    if "cu_seq_lens" in batch:  # one flat row: the segment that holds each predicting position
        if rows != 1:
            raise ValueError("token_owners: a batch with cu_seq_lens must be a single flat row")
        positions = torch.arange(width - 1)[scored[0].cpu()]
        return torch.searchsorted(batch["cu_seq_lens"].cpu(), positions, right=True) - 1
    if "attention_mask" not in batch:
        raise ValueError("token_owners: packed rows hold several sequences; use collate_flat or pass owners")
    return torch.arange(rows)[:, None].expand(rows, width - 1)[scored.cpu()]
