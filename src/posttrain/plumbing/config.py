"""One config dataclass per stage, filled from ``--config file.yaml`` and ``--key=value`` overrides.

Options shared by every training stage are declared once in :class:`TrainConfig`, and those of everything that
samples in :class:`SamplingConfig`; a stage's config extends one of them (dataclass inheritance, as open-instruct's
``DPOTrainingConfig(TrainingConfig)``) and redeclares only the defaults that truly differ, as a plain value
(``lr: float = 5e-7``) under the :func:`stage_config` decorator, which gives it the base's help text and choices. Fields carry their help text in
``metadata["help"]`` (shown by ``--help``). Unknown keys, in YAML or on the command line, are an error naming the key
and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = 0,
           maximum: float | None = None, above: float | None = None, below: float | None = None,
           unset: float | None = None, finite: bool = True) -> Any:
    """A dataclass field with its help text, and what values it allows: for enumerated strings the ``choices``; for
    numbers the range (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive; non-negative unless
    ``minimum`` says otherwise, ``minimum=None`` for no bound), finite unless ``finite=False``, and an ``unset``
    sentinel (e.g. -1 = "the algorithm's default") accepted besides. Checked by :func:`validate_config`."""
    kwargs: dict[str, Any] = {"choices": choices} if choices else {}
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        minimum = None if above is not None and minimum == 0 else minimum  # "above 0" says it all
        kwargs["range"] = {"minimum": minimum, "maximum": maximum, "above": above, "below": below, "unset": unset,
                           "finite": finite}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def field_metadata(cls: type, name: str) -> dict[str, Any]:
    """The help text and choices of field ``name`` of ``cls``: its own, else those of the nearest base that declares
    them (a subclass that only changes a default keeps the base's documentation)."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and declared.metadata.get("help"):
            return dict(declared.metadata)
    return {}


def stage_config(cls: type) -> type:
    """``@dataclass`` for a config that extends a base: a field redeclared with a plain default gets the base's
    metadata (help text, choices), so ``dataclasses.fields`` and ``--help`` document it once, as the base does."""
    cls = dataclass(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            f.metadata = types.MappingProxyType(field_metadata(cls, f.name))
    return cls


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field annotation like ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Path": Path})  # from __future__ annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    if origin is not None:
        return origin, False
    return annotation, False


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the key."""
    kind, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"'{key}' cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (list, dict):
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(parsed, kind):
                raise ValueError(value)
            return parsed
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is str and isinstance(value, (list, dict)):
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):  # YAML `batch_size: yes` is not 1
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"'{key}': cannot read {value!r} as {name}") from None


def build_config(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                 base: str | Path | None = None):
    """An instance of the dataclass ``cls`` from defaults, then ``base`` (a run's saved config.yaml: its options
    that ``cls`` still has), then the YAML file, then ``overrides``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources = []
    if base:
        saved = yaml.safe_load(Path(base).read_text(encoding="utf-8")) or {}
        if not isinstance(saved, dict):
            raise ConfigError(f"{base}: expected a mapping of key: value")
        sources.append((str(base), {k: v for k, v in saved.items() if str(k) in fields}))
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: invalid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of key: value")
        loaded.pop("launch", None)  # how a run ran, recorded beside its options in config.yaml; not an option
        sources.append((str(yaml_path), loaded))
    if overrides:
        sources.append(("command line", overrides))
    for where, mapping in sources:
        for key, value in mapping.items():
            key = str(key).replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{where}: unknown key '{key}' for {cls.__name__}{_closest(key, list(fields))}")
            values[key] = coerce(value, fields[key].type, key)
            choices = fields[key].metadata.get("choices")
            if choices and values[key] not in choices:
                raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {values[key]!r}")
    config = cls(**values)
    validate_config(config)
    return config


def _range_problem(value: float, bounds: dict[str, Any]) -> str | None:
    """Why ``value`` is outside ``bounds`` (an option's ``range`` metadata), or None."""
    if bounds.get("unset") is not None and value == bounds["unset"]:
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if isinstance(value, float) and math.isinf(value) and bounds.get("finite", True):
        return f"must be finite, got {value}"
    checks = [("minimum", lambda b: value >= b, "at least"), ("maximum", lambda b: value <= b, "at most"),
              ("above", lambda b: value > b, "greater than"), ("below", lambda b: value < b, "less than")]
    for key, holds, words in checks:
        if bounds.get(key) is not None and not holds(bounds[key]):
            unset = f" (or {bounds['unset']}: unset)" if bounds.get("unset") is not None else ""
            return f"must be {words} {bounds[key]}{unset}, got {value}"
    return None


def check_device(value: str) -> str | None:
    """Why ``value`` is not a usable torch device on this machine, or None."""
    import re

    import torch

    if value in ("auto", "cpu"):
        return None
    match = re.fullmatch(r"(cuda|mps|xpu)(?::(\d+))?", value)
    if not match:
        return f"is not a device: use auto, cpu, cuda or cuda:N, got {value!r}"
    kind, index = match.group(1), int(match.group(2) or 0)
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        return f"asks for {kind}, which this machine's torch ({torch.__version__}) cannot use; use --device=cpu"
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index >= count:
        return f"asks for {value}, but this machine has {count} {kind} device(s)"
    return None


def validate_config(config) -> None:
    """Every option of ``config`` within its declared range and choices, and its device usable here; raises
    :class:`ConfigError` naming the option."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        metadata = field_metadata(type(config), f.name)
        bounds = metadata.get("range")
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
            if problem := _range_problem(value, bounds):
                raise ConfigError(f"'{f.name}' {problem}")
        choices = metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"'{f.name}' must be one of {', '.join(choices)}, got {value!r}")
        if metadata.get("device") and (problem := check_device(str(value))):
            raise ConfigError(f"'{f.name}' {problem}")


def config_to_dict(config) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def save_config(config, path: Path, launch: dict[str, Any] | None = None) -> None:
    """The resolved options as YAML; ``launch``: how the run ran (world size, batches, backend), recorded under the
    ``launch`` key (not an option: reading the file back as a config ignores it)."""
    values = config_to_dict(config)
    if launch:
        values["launch"] = launch
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def help_lines(cls: type) -> str:
    """``--key (type, default): help`` for every field, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = getattr(kind, "__name__", str(kind)) + (" | None" if optional else "")
        if choices := f.metadata.get("choices"):
            name = " | ".join(choices)
        lines.append(f"  --{f.name}=VALUE  ({name}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_overrides(args: list[str], cls: type) -> dict[str, str]:
    """``['--lr=1e-4', '--steps', '10', '--packing']`` -> {'lr': '1e-4', 'steps': '10', 'packing': 'true'}."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options look like --key=value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown option '--{key}'{_closest(key, list(fields)).replace(chr(39), chr(39) + '--', 1)}")
        if not eq:
            is_flag = _base_type(fields[key].type)[0] is bool
            if is_flag and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"option '--{key}' needs a value")
        overrides[key] = value
        i += 1
    return overrides


# ---------------------------------------------------------------------------------------------------------------
# Options shared across configs: each declared and documented once.


def device_option() -> Any:
    field = option("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    field.metadata = types.MappingProxyType({**field.metadata, "device": True})
    return field


def chat_template_option() -> Any:
    return option("", "chatml | zephyr | tulu | harmony (channels, rendered from pieces) | a Jinja string; empty = the "
                      "tokenizer's own template")


def progress_option() -> Any:
    return option(True, "show progress bars")


def overwrite_option() -> Any:
    return option(False, "replace an existing output file")


def columns_option() -> Any:
    return option({}, "rename columns to the expected names, e.g. {conversation: messages, question: prompt}")


def skip_invalid_option() -> Any:
    return option(False, "drop malformed rows (reported with counts and reasons) instead of stopping at the first")


LR_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "hf", "vllm")


@dataclass
class TrainConfig:
    """Options of every training stage (pretrain, sft, rm, dpo); each stage's config extends this one."""

    model: str = option("", "local Hugging Face model directory to start from; empty = the tiny world's base model "
                            "(built if missing; dpo needs it set)")
    data: str = option("", "training rows (.jsonl / .json / .parquet / a saved datasets dir) in the stage's format "
                           "(see `posttrain STAGE --help` above); empty = the tiny world's set for this stage")
    eval_data: str = option("", "held-out rows of the same format, evaluated every eval_every steps and at the end; "
                                "empty = none (the tiny world's held-out set when data is empty)")
    out: str = option("runs/train", "run directory: config.yaml, command.txt, metrics.jsonl, tensorboard/, plots/, "
                                    "checkpoints/, and the final model in out/model")
    columns: dict = columns_option()
    skip_invalid: bool = skip_invalid_option()
    batch_size: int = option(16, "training units per micro-batch, over all processes (each of N processes takes "
                                 "1/N): conversations (rows when packing) for sft, sequences for pretrain, pairs / "
                                 "rankings / completions for rm, pairs (kto: examples) for dpo", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (the step's loss is normalised over the whole step, "
                                "so the gradient equals that of one batch of batch_size * grad_accum)", minimum=1)
    epochs: float = option(1.0, "passes over the data (ignored when max_steps > 0)", above=0)
    max_steps: int = option(0, "optimizer steps; 0 = from epochs")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norm weights)")
    warmup_steps: int = option(10, "linear warm-up steps from 0 to lr")
    lr_schedule: str = option("cosine", "decay after warm-up: constant | linear | cosine", choices=LR_SCHEDULES)
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = off")
    shuffle: bool = option(True, "shuffle the training units every epoch (seeded); false = file order")
    seed: int = option(0, "seed of the batch order (and of any freshly initialised weights)")
    precision: str = option("auto", "auto (bf16 autocast on a GPU, fp32 on CPU) | bf16 | fp32", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    compile: bool = option(False, "torch.compile each decoder layer (in place: same weights and parameter names; the "
                                  "first steps pay the compilation)")
    device: str = device_option()
    log_every: int = option(5, "log train metrics every N steps (and at the last step)", minimum=1)
    eval_every: int = option(0, "evaluate on eval_data every N steps; 0 = only at the end")
    save_every: int = option(100, "checkpoint every N steps; 0 = only at the end (and when interrupted)")
    keep_last: int = option(2, "checkpoints to keep (the newest intact one is never deleted)", minimum=1)
    resume: bool = option(False, "continue from the newest intact checkpoint in out (a finished run says so and does "
                                 "nothing); changed settings are refused except log_every, eval_every, save_every, "
                                 "keep_last, progress, device, max_bad_steps and deterministic")
    max_bad_steps: int = option(5, "optimizer steps in a row with a non-finite loss or gradient (each skipped) before "
                                   "the run stops with an error, its last good checkpoint kept", minimum=1)
    deterministic: bool = option(False, "deterministic kernels only (torch.use_deterministic_algorithms, cuDNN "
                                        "deterministic, no TF32) and no wall-clock values in metrics.jsonl: two "
                                        "identical runs write identical metrics")
    progress: bool = progress_option()


@dataclass
class ChatTrainConfig(TrainConfig):
    """Options of the training stages on chat data (sft, rm, dpo): the template and the length limit."""

    chat_template: str = chat_template_option()
    max_length: int = option(512, "longest sequence (prompt + completion) in tokens; longer rows are dropped "
                                  "(counted in the load report)", minimum=2)
    lora_r: int = option(0, "LoRA rank (peft); 0 = train every weight. With LoRA the reference of dpo / rl is the "
                            "starting model with its adapters disabled (no second copy), and out/model holds the "
                            "adapter in peft's format (`posttrain merge` writes a merged model)")
    lora_alpha: float = option(0.0, "LoRA alpha (the update is scaled by alpha / r); 0 = 2 * lora_r")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch", maximum=1)
    lora_target_modules: str = option("all-linear", "modules that get adapters: all-linear (every linear layer but "
                                                    "the output head) or comma-separated names, e.g. q_proj,v_proj")
    load_in_4bit: bool = option(False, "QLoRA: load the frozen base in 4-bit NF4 (needs bitsandbytes and a CUDA GPU; "
                                       "with lora_r > 0)")


@dataclass
class SamplingConfig:
    """Options of everything that samples from a policy (generate, bon, rs, scaling)."""

    model: str = option("", "policy model directory (local; required)")
    prompts: str = option("", "prompt rows: `prompt` (text or messages) or `messages` (a final assistant turn is "
                              "dropped); other columns are carried along and reach the reward")
    n: int = option(4, "completions sampled per prompt", minimum=1)
    max_new_tokens: int = option(128, "generation budget per completion, in tokens", minimum=1)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling; 1 = off", above=0, maximum=1)
    top_k: int = option(0, "top-k sampling; 0 = off")
    min_p: float = option(0.0, "min-p sampling; 0 = off", maximum=1)
    seed: int = option(0, "sampling seed (same seed and inputs -> same completions)")
    limit: int = option(0, "use only the first N prompts; 0 = all")
    batch_size: int = option(64, "sequences (prompts x n) per generate call (built-in engine)", minimum=1)
    backend: str = option("auto", "auto (vLLM when installed and on a GPU) | hf (built-in) | vllm", choices=BACKENDS)
    chat_template: str = chat_template_option()
    columns: dict = columns_option()
    skip_invalid: bool = skip_invalid_option()
    device: str = device_option()
