"""Loading local Hugging Face models/tokenizers, and the forward pass that scores only trained tokens."""

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

    from posttrain.templates import set_chat_template

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


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to selected hidden states (N, H) -> (N, V), with the model's logit post-processing."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def varlen_kwargs(batch: dict[str, torch.Tensor]) -> dict:
    """Example boundaries of a flat batch for segment / flash attention (sdpa and eager use position_ids)."""
    if "cu_seq_lens" not in batch:
        return {}
    lengths = batch["cu_seq_lens"]
    longest = int((lengths[1:] - lengths[:-1]).max())
    kwargs = dict(cu_seq_lens_q=lengths, cu_seq_lens_k=lengths, max_length_q=longest, max_length_k=longest)
    if "segment_masks" in batch:  # shared-prompt segments (collate_shared_prefix); segment attention only
        kwargs["segment_masks"] = [m if m is None else m.to(lengths.device) for m in batch["segment_masks"]]
    return kwargs


def flat_hidden_states(model, batch: dict) -> torch.Tensor:
    """Backbone hidden states (N, H) of a one-row padding-free batch (``collate_flat`` or ``collate_shared_prefix``),
    its tensors moved to the model's device; segment boundaries and masks go to the attention via ``varlen_kwargs``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                            **varlen_kwargs(batch)).last_hidden_state[0]


def trained_token_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) and targets (N,) at just the N positions that have a trained next token.

    Runs the backbone on the whole (packed) batch but the LM head only where the loss is taken: the head is the
    largest single matmul of a small model and prompts/padding are often half the positions.
    batch: input_ids (B, T), labels (B, T) with -100 where untrained, and position_ids or attention_mask;
    optional cu_seq_lens (S+1,) for a packed single row (see posttrain.data.packing).
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **varlen_kwargs(batch),
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    selected = targets != -100
    logits = output_logits(model, hidden[:, :-1][selected])  # (N, V)
    return logits, targets[selected]


def use_segment_attention(model) -> None:
    """Train with posttrain's padding-free segment attention when the model dispatches attention through
    transformers' AttentionInterface (all standard decoder models); keeps flash-attention if it was chosen."""
    from posttrain.attention import register

    if getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        model.config._attn_implementation = register()


def set_threads() -> None:
    """Respect OMP_NUM_THREADS if set (torch reads it too late in some launchers)."""
    if threads := os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(threads))
