"""token_logps, the one per-token log-prob path: equal to a plain HF forward's gathered log-probs on padded, packed,
flat and shared-prompt batches; and the generation engine's log-probs of what it sampled (stop token included) equal
teacher-forced token_logps."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from posttrain.data.packing import (
    Example,
    add_scored_tokens,
    collate_flat,
    collate_packed,
    collate_padded,
    collate_shared_prefix,
    first_fit_decreasing,
    token_owners,
)
from posttrain.models import load_causal_lm, use_segment_attention
from posttrain.models.logprobs import sequence_sums, token_logps


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    plain = load_causal_lm(tiny_model_dir).eval()  # sdpa
    segments = copy.deepcopy(plain)
    use_segment_attention(segments)
    return plain, segments


def make_examples(n: int, seed: int, prompt: list[int] | None = None) -> list[Example]:
    """Random sequences, the first part untrained (a prompt), the rest trained; optionally all with one prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        head = prompt if prompt is not None else [rng.randrange(5, 300) for _ in range(rng.randrange(3, 9))]
        tail = [rng.randrange(5, 300) for _ in range(rng.randrange(2, 7))]
        examples.append(Example(head + tail, [0] * len(head) + [1] * len(tail)))
    return examples


@torch.no_grad()
def reference_logps(model, example: Example) -> list[float]:
    """Plain HF: one sequence alone, full logits, log-softmax, gather each trained token (t >= 1) at position t-1."""
    ids = torch.tensor([example.input_ids])
    logps = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    return [float(logps[t - 1, example.input_ids[t]]) for t in range(1, len(example)) if example.loss_mask[t]]


def expected_in_order(model, examples: list[Example]) -> list[float]:
    return [x for e in examples for x in reference_logps(model, e)]


@torch.no_grad()
def test_padded_batch(models):
    plain, _ = models
    examples = make_examples(5, seed=0)
    got = token_logps(plain, collate_padded(examples, pad_token_id=0))
    assert got.tolist() == pytest.approx(expected_in_order(plain, examples), abs=1e-5)


@torch.no_grad()
def test_flat_and_packed_batches(models):
    plain, segments = models
    examples = make_examples(6, seed=1)
    expected = expected_in_order(plain, examples)
    for model in (plain, segments):  # sdpa reads position_ids; segment attention reads cu_seq_lens
        batch = collate_flat(examples, pad_token_id=0)
        assert token_logps(model, batch).tolist() == pytest.approx(expected, abs=1e-5)
    # several packed rows, right-padded: tokens come out row by row
    rows = first_fit_decreasing([len(e) for e in examples], capacity=20)
    packed = [[examples[i] for i in row] for row in rows]
    assert len(packed) > 1
    got = token_logps(plain, collate_packed(packed, pad_token_id=0))
    assert got.tolist() == pytest.approx(expected_in_order(plain, [e for row in packed for e in row]), abs=1e-5)


@torch.no_grad()
def test_shared_prompt_batch(models):
    """Two groups of completions sharing a prompt each: every prompt forwarded once, every completion token's
    log-prob equal to its own full sequence's."""
    plain, segments = models
    groups = [make_examples(3, seed=2, prompt=[11, 12, 13, 14]), make_examples(2, seed=3, prompt=[20, 21, 22])]
    batch = add_scored_tokens(collate_shared_prefix(groups), groups)
    examples = [e for g in groups for e in g]
    assert batch["input_ids"].shape[1] < sum(len(e) for e in examples)  # the prompts really are shared
    got = token_logps(segments, batch)
    assert got.tolist() == pytest.approx(expected_in_order(plain, examples), abs=1e-5)
    sums, counts = sequence_sums(got, batch["owners"], len(examples))
    assert counts.tolist() == [sum(e.loss_mask[1:]) for e in examples]
    assert sums.tolist() == pytest.approx([sum(reference_logps(plain, e)) for e in examples], abs=1e-4)


def test_token_owners_of_flat_and_padded_batches():
    examples = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [0, 1]), Example([6, 7, 8, 9], [0, 0, 1, 1])]
    assert token_owners(collate_flat(examples, 0)).tolist() == [0, 0, 1, 2, 2]
    assert token_owners(collate_padded(examples, 0)).tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="packed"):
        token_owners(collate_packed([examples[:2], examples[2:]], 0))


@torch.no_grad()
def test_value_head_on_the_backbone(tiny_model_dir, tmp_path):
    """load_value_model: the causal LM's backbone with a 1-output head per position; token_values reads V at the
    position before each scored token (one forward); a saved critic reloads with the same values."""
    from transformers import AutoModelForTokenClassification

    from posttrain.models.heads import load_value_model, token_values

    critic = load_value_model(tiny_model_dir).eval()
    lm = load_causal_lm(tiny_model_dir)
    lm_state, critic_state = lm.model.state_dict(), critic.model.state_dict()
    assert lm_state.keys() == critic_state.keys()
    assert all(torch.equal(lm_state[k], critic_state[k]) for k in lm_state)  # the backbone is the LM's
    examples = make_examples(3, seed=4)
    batch = collate_flat(examples, pad_token_id=0)
    values = token_values(critic, batch)
    # plain HF: the token-classification logits of each sequence alone, at positions t-1 of its trained tokens
    expected = []
    for e in examples:
        logits = critic(input_ids=torch.tensor([e.input_ids])).logits[0, :, 0]
        expected += [float(logits[t - 1]) for t in range(1, len(e)) if e.loss_mask[t]]
    assert values.tolist() == pytest.approx(expected, abs=1e-5)
    critic.save_pretrained(tmp_path / "critic")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic").eval()
    assert token_values(reloaded, batch).tolist() == pytest.approx(values.tolist(), abs=1e-6)
