"""Loading local Hugging Face models and tokenizers (never the Hub), devices and threads."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_model_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path} (posttrain only loads local directories)")
    return path


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """``AutoTokenizer.from_pretrained`` on a local directory (never the Hub); optional built-in template."""
    from transformers import AutoTokenizer

    from posttrain.data.templates import set_chat_template

    path = _check_model_dir(path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: posttrain needs a fast tokenizer (tokenizer.json) for exact loss masks")
    if chat_template:
        set_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:  # no eos either: a dedicated pad token (the model's embeddings are resized to match)
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` on a local directory, sdpa attention, eval-free (train mode off)."""
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path, "model")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device)


def resize_for_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (e.g. ChatML markers set on a base tokenizer)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def use_segment_attention(model) -> None:
    """Train with posttrain's padding-free segment attention when the model dispatches attention through
    transformers' AttentionInterface (all standard decoder models); keeps flash-attention if it was chosen."""
    from posttrain.models.attention import register

    if getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        model.config._attn_implementation = register()


def prepare_for_training(model, *, gradient_checkpointing: bool = False, segment_attention: bool = True):
    """Train mode, no KV cache, optional activation checkpointing, and padding-free segment attention."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if segment_attention:
        use_segment_attention(model)
    model.train()
    return model


def set_threads() -> None:
    """Respect OMP_NUM_THREADS if set (torch reads it too late in some launchers)."""
    if threads := os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(threads))
