"""Batched generation from chat prompts with the same rendering path as training (``render_prompt``).

Uses ``model.generate`` with a KV cache over left-padded prompt batches; stops at eos or the template's
end-of-turn token. (The full engine with vLLM and per-token log-probs belongs to the sampling stage.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.render import end_of_turn_token_ids, render_prompt


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn/eos emitted) or "length"


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int | None = None,
) -> list[Completion]:
    """One completion per prompt (a list of chat messages). ``temperature=0`` is greedy decoding."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop_ids = end_of_turn_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    encoded = [render_prompt(tokenizer, messages) for messages in prompts]
    # Longest first so each batch pads little; results are put back in the caller's order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Completion | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: generation continues right after each prompt
            input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[row, width - len(encoded[i]) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        for row, i in enumerate(chunk):
            new = output[row, width:].tolist()
            stopped = next((k for k, tok in enumerate(new) if tok in stop_ids), None)
            ids = new[:stopped] if stopped is not None else [t for t in new if t != pad_id]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results[i] = Completion(text, ids, "stop" if stopped is not None else "length")
    model.train(was_training)
    return results  # type: ignore[return-value]
