"""Loading local Hugging Face models and tokenizers (never the Hub), devices and threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = cuda when available, else cpu; any other name must be usable here (a clear ConfigError if not)."""
    from posttrain.plumbing.config import ConfigError, check_device
    from posttrain.plumbing.distributed import local_device

    if device != "auto" and (problem := check_device(device)):
        raise ConfigError(f"device {problem}")
    return local_device(device)


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelDirError(ValueError):
    """A model or tokenizer directory that cannot be loaded; the message names the path and what is missing."""


def _check_model_dir(path: str | Path, what: str) -> Path:
    """``path`` must be a local directory with what ``what`` ("model" or "tokenizer") needs: a config.json that
    parses and weight files, or tokenizer files. Checked up front so the error names the directory, not a line
    deep inside transformers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} directory not found: {path} (posttrain only loads local directories)")
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory ({what}s are loaded from a local Hugging Face directory)")
    if what == "model":
        config = path / "config.json"
        if not config.is_file():
            raise ModelDirError(f"{path}: no config.json, so not a Hugging Face model directory")
        try:
            parsed = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelDirError(f"{config}: not valid JSON ({err})") from None
        if not isinstance(parsed, dict):
            raise ModelDirError(f"{config}: expected a JSON object")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise ModelDirError(f"{path}: no weights ({', '.join(WEIGHT_FILES)})")
    elif not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); pass a directory saved with "
                            "tokenizer.save_pretrained, or --tokenizer where the stage has it")
    return path


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """``AutoTokenizer.from_pretrained`` on a local directory (never the Hub); optional built-in template."""
    from transformers import AutoTokenizer

    from posttrain.data.templates import set_chat_template

    path = _check_model_dir(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelDirError(f"{path}: cannot load the tokenizer: {err}") from None
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


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   quantization=None):
    """``AutoModelForCausalLM.from_pretrained`` on a local directory, sdpa attention, eval-free (train mode off).
    A peft adapter directory (a LoRA run's ``out/model``) loads as its base with the adapter merged in.
    ``quantization``: a transformers quantization config (QLoRA's 4-bit base; placed on the GPU by bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.adapters import is_adapter_dir, load_adapter_dir

    if is_adapter_dir(path):
        return load_adapter_dir(path, lambda base: load_causal_lm(base, dtype=dtype, device=device))
    path = _check_model_dir(path, "model")
    extra = {"quantization_config": quantization, "device_map": {"": torch.device(device)}} if quantization else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, attn_implementation="sdpa", **extra
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelDirError(f"{path}: cannot load the model: {err}") from None
    return model if quantization else model.to(device)


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


def prepare_for_training(model, *, gradient_checkpointing: bool = False, segment_attention: bool = True,
                         compile: bool = False):
    """Train mode, no KV cache, optional activation checkpointing, padding-free segment attention, and optionally
    ``torch.compile`` of each decoder layer (``nn.Module.compile``: in place, so the weights keep their names for
    checkpoints and ``save_pretrained``; the whole backbone when its layers are not found)."""
    if gradient_checkpointing:  # non-reentrant: works with DDP's unused-parameter search and frozen embeddings
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        backbone = model.base_model
        layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
        for module in (layers if layers is not None else [backbone]):
            module.compile()
    model.config.use_cache = False
    if segment_attention:
        use_segment_attention(model)
    model.train()
    return model


def set_threads() -> None:
    """Respect OMP_NUM_THREADS if set (torch reads it too late in some launchers)."""
    if threads := os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(threads))
