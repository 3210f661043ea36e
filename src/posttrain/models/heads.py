"""Heads on a causal-LM backbone: reward heads (scalar, outcome, process) and the value (critic) head of online RL.

All are Hugging Face classes initialised from a causal LM directory (the backbone's weights are loaded, the head is
new), so ``save_pretrained`` / ``from_pretrained`` round-trip them and the Auto classes reload them with the same
outputs:

  scalar   ``AutoModelForSequenceClassification``, 1 label: r(x, y) from the last non-padding token (BT-family RMs)
  outcome  ``AutoModelForTokenClassification``, 1 label: a logit per token (ORM: P(correct) after each token)
  process  ``AutoModelForTokenClassification``, 3 labels (incorrect / neutral / correct) per token (PRM)
  value    ``AutoModelForTokenClassification``, 1 label: V(s_t) per position (the PPO critic)
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import torch

from posttrain.models.logprobs import backbone_hidden, scored_positions

PRM_LABELS = {0: "incorrect", 1: "neutral", 2: "correct"}


class HeadKind(StrEnum):
    scalar = "scalar"
    outcome = "outcome"
    process = "process"
    value = "value"


def load_head_model(path: str | Path, kind: str, *, tokenizer=None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, quantization=None):
    """A ``kind`` head (see the module docstring) on the backbone in local directory ``path``; its embeddings grow
    to the tokenizer's vocabulary when the tokenizer gained tokens."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from posttrain.models.adapters import is_adapter_dir, load_adapter_dir
    from posttrain.models.loading import _check_model_dir, resize_for_tokenizer

    if is_adapter_dir(path):  # a LoRA-trained head model: its base with the adapter and the trained head merged in
        return load_adapter_dir(path, lambda base: load_head_model(base, kind, tokenizer=tokenizer, device=device,
                                                                   dtype=dtype))
    path = _check_model_dir(path, "model")
    kwargs = dict(local_files_only=True, dtype=dtype, attn_implementation="sdpa")
    if quantization is not None:  # QLoRA's 4-bit base, placed by bitsandbytes
        kwargs.update(quantization_config=quantization, device_map={"": torch.device(device)})
    if tokenizer is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    match HeadKind(kind):
        case HeadKind.scalar:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
        case HeadKind.outcome | HeadKind.value:
            model = AutoModelForTokenClassification.from_pretrained(str(path), num_labels=1, **kwargs)
        case HeadKind.process:
            model = AutoModelForTokenClassification.from_pretrained(
                str(path), num_labels=3, id2label=PRM_LABELS, label2id={v: k for k, v in PRM_LABELS.items()}, **kwargs)
    if tokenizer is not None:
        resize_for_tokenizer(model, tokenizer)
    return model if quantization is not None else model.to(device)


def load_value_model(path: str | Path, *, tokenizer=None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, quantization=None):
    """The critic of online RL: the causal LM in ``path`` with a fresh 1-output head per position (a saved value
    model reloads with its trained head)."""
    return load_head_model(path, HeadKind.value, tokenizer=tokenizer, device=device, dtype=dtype,
                           quantization=quantization)


def token_values(model, batch: dict) -> torch.Tensor:
    """V(s) (n,) at the positions that predict each scored token of ``batch`` (the state before the token is
    emitted), one backbone forward; same batch formats as ``posttrain.models.logprobs.token_logps``."""
    hidden = backbone_hidden(model, batch)
    predictors, _ = scored_positions(batch)
    return model.score(hidden[predictors.to(hidden.device)]).squeeze(-1).float()
