"""Tiny standard `transformers` configs (Llama or Qwen2) for the tiny world's base model, ~2 M parameters."""

from __future__ import annotations

import torch

# hidden 192, 4 layers, 6 heads (head_dim 32), MLP 512, tied embeddings: ~1.9 M parameters with a 1024 vocab.
TINY_SIZES = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
                  intermediate_size=512, max_position_embeddings=512, tie_word_embeddings=True)


def tiny_config(arch: str, tokenizer):
    """A ``LlamaConfig`` or ``Qwen2Config`` sized for 2 CPU cores, with the tokenizer's special ids."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **TINY_SIZES,
    )
    match arch:
        case "world-llama":
            return LlamaConfig(**common)
        case "world-qwen2":
            return Qwen2Config(**common, use_sliding_window=False)
        case _:
            raise ValueError(f"unknown init {arch!r}: use world-llama or world-qwen2")


def init_tiny_model(arch: str, tokenizer, seed: int = 0):
    """A freshly initialised causal LM (fp32, sdpa attention) with a seeded init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, tokenizer)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
