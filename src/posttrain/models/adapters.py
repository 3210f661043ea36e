"""LoRA and QLoRA through peft: adapters on a loaded model, the reference as the adapter-disabled base, adapter
directories that load like models, and merging.

A stage trains LoRA by wrapping its model once (:func:`add_lora`); every posttrain function that takes a model takes
the wrapped one (``backbone_hidden`` reaches the backbone through ``get_base_model``, everything else peft forwards).
Checkpoints and the final ``out/model`` are in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``); wherever posttrain takes a model
directory it also takes such an adapter directory, applied to its base and merged (:func:`load_adapter_dir`).
``posttrain merge`` (``posttrain.stages.merge``) writes the merged model as a plain HF directory.

The reference model of DPO and RL, when it is the starting model, is that very model with its adapters switched off
(:func:`reference_context`): no second copy of the weights in memory (the LoRA paper's point; TRL does the same
when ``ref_model`` is None and a peft config is given).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ADAPTER_CONFIG = "adapter_config.json"
# HF head classes whose head must be trained and saved in full next to the adapters (peft's modules_to_save)
HEAD_MODULES = ("score", "classifier")


class AdapterError(ValueError):
    """A LoRA setting or an adapter directory that cannot be used; the message names what and why."""


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter directory was trained on (``base_model_name_or_path``)."""
    config_path = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{config_path}: not a readable peft adapter config ({err})") from None
    if not base or not Path(base).is_dir():
        raise AdapterError(f"{config_path}: its base model {base!r} is not a local directory; pass the base with "
                           "--base (posttrain merge) or move it back")
    return Path(base)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: str, base_path: str | Path,
             gradient_checkpointing: bool = False):
    """``model`` (a causal LM or a head model) wrapped by peft with fresh LoRA adapters of rank ``r`` on
    ``target_modules`` (comma-separated names, or ``all-linear``); a head model's head is trained in full. Only the
    adapters (and the head) require gradients. ``base_path`` is recorded in the adapter config."""
    from peft import LoraConfig, get_peft_model

    targets: Any = target_modules if target_modules == "all-linear" else \
        [name.strip() for name in target_modules.split(",") if name.strip()]
    heads = [name for name in HEAD_MODULES if isinstance(getattr(model, name, None), torch.nn.Module)]
    # a head model's task type tells a later merge which head class to rebuild (sequence: a scalar reward model;
    # token: an outcome/process reward model or a critic); its head is saved in full (modules_to_save)
    task = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}
    task_type = next((t for suffix, t in task.items() if type(model).__name__.endswith(suffix)), None)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      modules_to_save=heads or None, bias="none", task_type=task_type)
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, lora)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise AdapterError(f"--lora_target_modules={target_modules!r}: {err}") from None
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    if gradient_checkpointing:  # checkpointed blocks need an input that requires grad when the embeddings are frozen
        wrapped.enable_input_require_grads()
    return wrapped


def lora_from_config(model, config, base_path: str | Path, *, resized: bool = False):
    """:func:`add_lora` with a training config's ``lora_*`` options (after peft's k-bit preparation of a 4-bit
    base); ``model`` unchanged when ``lora_r`` is 0. ``resized``: the embeddings grew for the tokenizer, new rows
    an adapter would not save, so refused."""
    if not config.lora_r:
        return model
    if resized:
        raise AdapterError(f"the tokenizer has tokens the model {base_path} lacks: the new embedding rows would be "
                           "trained but not saved with the adapter; train without --lora_r or use the model's own "
                           "tokenizer and chat template")
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return add_lora(model, r=config.lora_r, alpha=config.lora_alpha or 2 * config.lora_r,
                    dropout=config.lora_dropout, target_modules=config.lora_target_modules, base_path=base_path,
                    gradient_checkpointing=config.gradient_checkpointing)


def reference_context(model) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory under which ``model`` computes as its reference, without gradients: a peft model with
    its adapters disabled (the base weights, shared; its train/eval mode restored on exit), any other model as it
    is."""
    if not is_peft(model):
        return torch.no_grad

    @contextlib.contextmanager
    def adapters_off():
        training = model.training
        model.eval()  # as a separate reference model would be: no dropout
        try:
            with torch.no_grad(), model.disable_adapter():
                yield
        finally:
            model.train(training)

    return adapters_off


def quantization_config(config):
    """QLoRA's 4-bit NF4 base with bf16 compute when a training config asks (``--load_in_4bit``), or None. Needs
    ``--lora_r``, bitsandbytes and a CUDA GPU; without them a clear error, not an import failure in transformers."""
    if not config.load_in_4bit:
        return None
    if not config.lora_r:
        raise AdapterError("--load_in_4bit trains LoRA adapters on a frozen 4-bit base: set --lora_r too")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AdapterError("--load_in_4bit needs bitsandbytes (pip install 'posttrain[qlora]') and a CUDA GPU") \
            from None
    if not torch.cuda.is_available():
        raise AdapterError("--load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_adapter_dir(path: str | Path, load_base: Callable[[Path], Any], *, merge: bool = True,
                     base: str | Path | None = None):
    """The model of an adapter directory: its base (``base``, else the adapter config's) loaded with
    ``load_base(base_dir)``, the adapters (and any trained head) applied from ``path``, merged into plain weights
    unless ``merge`` is False."""
    from peft import PeftModel

    if not (Path(path) / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG}; not a peft adapter directory")
    if base is not None and not Path(base).is_dir():
        raise AdapterError(f"base model {base}: not a local directory")
    base_dir = Path(base) if base is not None else adapter_base(path)
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(load_base(base_dir), str(path), is_trainable=not merge)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise AdapterError(f"{path}: cannot apply the adapter to its base {base_dir}: {err}") from None
    return model.merge_and_unload() if merge else model


def adapter_head_kind(adapter: str | Path) -> str | None:
    """The head of a head model's adapter directory: "scalar" (sequence classification: a BT reward model),
    "outcome" or "process" (token classification with 1 or 3 outputs); None for a causal LM's adapter."""
    task = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("task_type")
    if task == "SEQ_CLS":
        return "scalar"
    if task == "TOKEN_CLS":
        return "process" if _head_outputs(Path(adapter)) == 3 else "outcome"
    return None


def _head_outputs(adapter: Path) -> int:
    """The number of outputs of the head saved in full in an adapter directory (3: a process reward model)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".score." in f".{key}" and key.endswith("weight"):
                return f.get_slice(key).get_shape()[0]
    raise AdapterError(f"{adapter}: a head model's adapter without its head's weights")
