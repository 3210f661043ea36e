"""``posttrain merge``: a LoRA adapter directory (a ``--lora_r`` run's ``out/model``, peft's format) merged into its
base, written as a plain Hugging Face model directory with the tokenizer. A reward model's or critic's adapter
(its head saved in full beside the adapters) merges onto its head class."""

from __future__ import annotations

from pathlib import Path

from posttrain.models.adapters import adapter_head_kind, load_adapter_dir
from posttrain.models.heads import load_head_model
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.plumbing.checkpoint import save_model_atomic


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | Path | None = None) -> Path:
    """The base (``base``, else the adapter config's ``base_model_name_or_path``) with ``adapter`` merged in, saved
    atomically to ``out`` with the adapter directory's tokenizer (else the base's); returns ``out``."""
    adapter = Path(adapter)
    kind = adapter_head_kind(adapter) if (adapter / "adapter_config.json").is_file() else None
    load = (lambda path: load_head_model(path, kind)) if kind else load_causal_lm  # noqa: E731
    model = load_adapter_dir(adapter, load, base=base)
    tokenizer_dir = adapter if (adapter / "tokenizer.json").exists() else Path(base or model.config._name_or_path)
    save_model_atomic(model, load_tokenizer(tokenizer_dir), Path(out))
    return Path(out)
