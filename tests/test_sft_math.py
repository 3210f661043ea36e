"""SFT loss: hand-derived values, a naive float64 reference, reduction split-invariance, packing exactness."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data import Example, collate_padded, first_fit_decreasing, pack_batch
from posttrain.maths import Reduction, reduce_per_token, sft_loss, token_nll
from posttrain.models import trained_token_logits


def test_sft_loss_hand_derived():
    """Two trained positions over a vocabulary of 3, one ignored.

    position 1: logits [0, 0, 0], target 2  -> -log(1/3) = log 3 = 1.0986123
    position 2: logits [ln 3, 0, 0], target 0 -> p = 3/(3+1+1) = 0.6, -log 0.6 = 0.5108256
    position 3: target -100 (ignored)
    loss = (1.0986123 + 0.5108256) / 2 = 0.8047190
    """
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [5.0, -1.0, 2.0]])
    targets = torch.tensor([2, 0, -100])
    loss, metrics = sft_loss(logits, targets)
    assert loss.item() == pytest.approx((math.log(3) - math.log(0.6)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.8047190, abs=1e-6)
    assert metrics["tokens"].item() == 2
    assert not metrics["loss"].requires_grad


def naive_sft_loss_float64(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Loop over positions in float64: -log softmax(logits)[target], averaged over non-ignored positions."""
    total, count = 0.0, 0
    for row_logits, target in zip(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1)):
        if target.item() == -100:
            continue
        log_z = math.log(sum(math.exp(x) for x in row_logits.tolist()))
        total += log_z - row_logits[target].item()
        count += 1
    return total / count


def test_sft_loss_matches_float64_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=generator) * 3
    targets = torch.randint(0, 11, (4, 7), generator=generator)
    targets[torch.rand(4, 7, generator=generator) < 0.4] = -100
    loss, _ = sft_loss(logits, targets)
    assert loss.item() == pytest.approx(naive_sft_loss_float64(logits, targets), abs=1e-5)


def test_token_mean_is_split_invariant():
    """Splitting a step into micro-batches, each normalized by the step's token count, sums to the full loss and
    gives the same gradient; averaging per-micro-batch means would not."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6, 5), generator=generator)
    targets[:2, 1:] = -100  # uneven token counts per micro-batch
    full, _ = sft_loss(logits, targets)
    (full_grad,) = torch.autograd.grad(full, logits)
    n = int((targets != -100).sum())
    parts = [sft_loss(logits[i : i + 2], targets[i : i + 2], num_tokens=n)[0] for i in (0, 2, 4)]
    split_total = sum(parts)
    (split_grad,) = torch.autograd.grad(split_total, logits)
    assert split_total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(split_grad, full_grad, atol=1e-12)
    naive = sum(sft_loss(logits[i : i + 2], targets[i : i + 2])[0] for i in (0, 2, 4)) / 3
    assert abs(naive.item() - full.item()) > 1e-3


def test_reductions_hand_derived():
    """per_token [[1, 2, 3], [4, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]:
    token_mean = (1+2+3+4)/4 = 2.5; sequence_mean = (2 + 4)/2 = 3; sum = 10."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert reduce_per_token(per_token, mask, Reduction.token_mean).item() == 2.5
    assert reduce_per_token(per_token, mask, Reduction.sequence_mean).item() == 3.0
    assert reduce_per_token(per_token, mask, Reduction.sum).item() == 10.0


def test_token_nll_float32_under_bf16():
    logits = torch.randn(3, 5).to(torch.bfloat16)
    assert token_nll(logits, torch.tensor([0, 1, 2])).dtype == torch.float32


def test_sft_loss_metrics_hand_derived():
    """The example of test_sft_loss_hand_derived: nll_sum = log 3 - log 0.6 = log 5 = 1.6094379 over the 2 trained
    tokens (the ignored position adds nothing); loss = nll_sum / tokens."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [5.0, -1.0, 2.0]])
    loss, metrics = sft_loss(logits, torch.tensor([2, 0, -100]))
    assert set(metrics) == {"loss", "nll_sum", "tokens"}
    assert metrics["nll_sum"].item() == pytest.approx(math.log(5.0), abs=1e-6)
    assert metrics["loss"].item() == loss.item() == pytest.approx(math.log(5.0) / 2, abs=1e-6)
    assert metrics["tokens"].item() == 2


def test_reduction_keeps_the_loss_dtype_whatever_the_mask_dtype():
    """A float64 mask (e.g. an attention mask) must not promote a float32 loss to float64; the values are those of
    test_reductions_hand_derived."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    for mode, expected in ((Reduction.token_mean, 2.5), (Reduction.sequence_mean, 3.0), (Reduction.sum, 10.0)):
        reduced = reduce_per_token(per_token, mask, mode)
        assert reduced.dtype == torch.float32 and reduced.item() == expected


def test_first_fit_decreasing_packs_within_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # this instance packs perfectly: 35 tokens in 4 rows


def _random_examples(vocab: int, lengths: list[int], seed: int) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=generator).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # a prompt, then a trained reply
        examples.append(Example(ids, mask))
    return examples


@pytest.mark.parametrize("layout", ["rows-sdpa", "flat-sdpa", "flat-segments"])
@pytest.mark.parametrize("arch", ["world-llama", "world-qwen2"])
def test_packed_loss_equals_unpacked(world_tokenizer, arch, layout):
    """Several examples per row, attention confined to each example: loss and gradients equal the classic padded
    batch (one example per row with an attention mask) to 1e-5. Layouts: FFD rows with a block-diagonal mask derived
    from position_ids; all examples in one row (sdpa mask, or posttrain's per-example segment attention)."""
    from posttrain.data import collate_flat
    from posttrain.models import use_segment_attention
    from posttrain.world.model import init_tiny_model

    model = init_tiny_model(arch, world_tokenizer, seed=3).double()
    examples = _random_examples(len(world_tokenizer), [17, 5, 30, 12, 9, 23], seed=4)
    pad = world_tokenizer.pad_token_id

    padded = collate_padded(examples, pad)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
    reference, _ = sft_loss(logits, padded["labels"][:, 1:])
    reference.backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    if layout == "rows-sdpa":
        packed = pack_batch(examples, row_capacity=40, pad_token_id=pad)
        assert 1 < packed["input_ids"].shape[0] < len(examples)  # really several examples per row
    else:
        packed = collate_flat(examples, pad)
        assert packed["input_ids"].shape == (1, sum(len(e) for e in examples))  # no padding at all
    if layout == "flat-segments":
        use_segment_attention(model)
        assert model.config._attn_implementation == "posttrain_segments"
    logits, targets = trained_token_logits(model, packed)
    loss, _ = sft_loss(logits, targets)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for p, g in zip(model.parameters(), reference_grads):
        assert torch.allclose(p.grad, g, atol=1e-5)


def test_packing_attention_is_confined(world_tokenizer):
    """Changing the first example of a row must not change the hidden states of the example packed after it."""
    from posttrain.world.model import init_tiny_model

    model = init_tiny_model("world-llama", world_tokenizer, seed=5).eval()
    a, b = _random_examples(len(world_tokenizer), [10, 12], seed=6)
    a2 = Example([t + 1 for t in a.input_ids], a.loss_mask)
    pad = world_tokenizer.pad_token_id
    # (with use_cache=False: given a KV cache, transformers does not look for packed sequences)
    with torch.no_grad():
        h1, h2 = (
            model.base_model(**{k: v for k, v in pack_batch([x, b], 64, pad).items() if k != "labels"},
                             use_cache=False).last_hidden_state
            for x in (a, a2)
        )
    # one row, examples in their original order: a at positions 0..9, b at 10..21
    assert h1.shape[:2] == (1, 22)
    assert not torch.allclose(h1[0, :10], h2[0, :10])
    assert torch.allclose(h1[0, 10:22], h2[0, 10:22], atol=1e-6)


def test_lr_schedule_hand_values():
    """warm-up 2, total 6: steps 0,1 -> 1/2, 2/2; then cosine over 4 steps: progress p = (step-2)/4,
    multiplier 0.5 (1 + cos(pi p)): step 2 -> 1, step 4 -> 0.5, step 6 -> 0. Linear: step 4 -> 0.5, step 5 -> 0.25."""
    from posttrain.plumbing.training import lr_multiplier

    cosine = [lr_multiplier(s, warmup_steps=2, total_steps=6, schedule="cosine") for s in range(7)]
    assert cosine[0] == 0.5 and cosine[1] == 1.0 and cosine[2] == 1.0
    assert cosine[4] == pytest.approx(0.5) and cosine[6] == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(5, warmup_steps=2, total_steps=6, schedule="linear") == pytest.approx(0.25)
    assert lr_multiplier(5, warmup_steps=2, total_steps=6, schedule="constant") == 1.0


def test_batch_order_is_a_function_of_seed_and_step():
    """Resuming at batch k yields exactly the batches an uninterrupted stream yields from k on."""
    from itertools import islice

    from posttrain.plumbing.training import batch_indices

    full = list(islice(batch_indices(10, 3, seed=7), 8))  # 3 batches per epoch, crosses epochs
    assert list(islice(batch_indices(10, 3, seed=7, start_batch=5), 3)) == full[5:8]
    assert sorted(i for b in full[:3] for i in b) == sorted(set(i for b in full[:3] for i in b))  # no repeats in an epoch
    assert full[:3] != full[3:6]  # reshuffled each epoch
    assert list(islice(batch_indices(10, 3, seed=7, shuffle=False), 1)) == [[0, 1, 2]]
