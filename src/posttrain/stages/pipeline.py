"""``posttrain pipeline RECIPE``: a recipe's stages in order, each stage's output feeding the next (docs/recipes.md).

A recipe is a YAML file::

    vars:                               # optional; each one overridable with --NAME=VALUE
      prompts: ${world.data}/rl_train.jsonl
    steps:
      - name: sft                       # the step's sub-directory of the run directory, and its name in references
        stage: sft                      # a stage of STAGES below
        options:                        # the stage's options (`posttrain sft --help`), references allowed
          model: ${model}
          max_steps: 300
      - name: rm
        stage: rm
        options: {loss: bt, model: "${sft.model}"}

References: ``${STEP.model}`` (a training step's or rs's final model), ``${STEP.out}`` (the step's output: the
file a generate / score / select / bon / label step writes, a training step's run directory), ``${model}``
(``--model DIR``; default the tiny world's base model), ``${world.data}`` / ``${world.tokenizer}`` /
``${world.base_model}``, ``${run}`` (the run directory) and ``${NAME}`` for a var. A whole value ``${NAME}`` keeps
the var's type (``max_steps: ${steps}``); inside a longer string it is text (``reward: rm:${rm.model}``).

The run directory (``--out``, default ``runs/RECIPE``) has one sub-directory per step and ``pipeline.json``: per
step its settings (resolved options and the settings hashes of the steps it reads), status, outputs and seconds.
Rerun, a finished step with the same settings is skipped; a step whose settings changed is rerun from scratch, naming
what changed, and so is every later step that read its output (their inputs changed); a step that was interrupted
resumes (training stages from their last checkpoint, rs at its round; generate / score / select / bon / label start
over: they write their file at the end). Options that a training run may change on resume (device, progress,
log_every, ...: ``CHANGEABLE_ON_RESUME``) are not settings here either.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from posttrain.data.io import atomic_write_text
from posttrain.plumbing.config import ConfigError, build_config
from posttrain.plumbing.harness import CHANGEABLE_ON_RESUME
from posttrain.stages.bestofn import (BonConfig, GenerateConfig, ScoreConfig, SelectConfig, run_bon, run_generate,
                                     run_score, run_select)
from posttrain.stages.dpo import DPOConfig, train_dpo
from posttrain.stages.label import LabelConfig, run_label
from posttrain.stages.pretrain import PretrainConfig, train_pretrain
from posttrain.stages.rl import RLConfig, train_rl
from posttrain.stages.rm import RMConfig, train_rm
from posttrain.stages.rs import RSConfig, run_rs
from posttrain.stages.sft import SFTConfig, train_sft

# stage -> (config class, run function, what it leaves: "model" = a run directory with out/model (resumable from its
# checkpoints); "rs" = rs's run directory and the policy it returns; "file" = one JSONL file, written at the end)
STAGES: dict[str, tuple[type, Callable, str]] = {
    "pretrain": (PretrainConfig, train_pretrain, "model"),
    "sft": (SFTConfig, train_sft, "model"),
    "rm": (RMConfig, train_rm, "model"),
    "dpo": (DPOConfig, train_dpo, "model"),
    "rl": (RLConfig, train_rl, "model"),
    "rs": (RSConfig, run_rs, "rs"),
    "generate": (GenerateConfig, run_generate, "file"),
    "score": (ScoreConfig, run_score, "file"),
    "select": (SelectConfig, run_select, "file"),
    "bon": (BonConfig, run_bon, "file"),
    "label": (LabelConfig, run_label, "file"),
}
OUTPUTS = {"model": ("model", "out"), "rs": ("model", "out"), "file": ("out",)}
SET_BY_PIPELINE = ("out", "resume", "overwrite")  # every step's own directory, resumed, its file replaced
PIPELINE_OPTIONS = ("out", "model", "device", "progress")  # --KEY=VALUE of the pipeline itself
STEP_KEYS = ("name", "stage", "options")
REFERENCE = re.compile(r"\$\{([^}]*)\}")
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data; the checkout's recipes/ links to it


class RecipeError(ConfigError):
    """A recipe or a pipeline option is wrong; the message names the file, the line, the step and the option."""


@dataclass
class Step:
    name: str
    stage: str
    options: dict[str, Any]
    line: int  # 1-based line of the step in the recipe
    option_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    vars: dict[str, Any]
    steps: list[Step]
    var_lines: dict[str, int] = field(default_factory=dict)


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid: {', '.join(sorted(valid))}"


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: the path itself, else the built-in recipe NAME (``recipes/NAME.yaml``, shipped in the package)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.stem if path.parent == Path("recipes") and path.suffix == ".yaml" else name_or_path
    builtin = RECIPES_DIR / f"{name}.yaml"  # NAME, or recipes/NAME.yaml as each recipe's header writes it
    if builtin.is_file():
        return builtin
    known = ", ".join(p.stem for p in sorted(RECIPES_DIR.glob("*.yaml"))) or "none found"
    raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file, nor a built-in recipe ({known})")


def load_recipe(path: str | Path) -> Recipe:
    """The recipe at ``path``, its structure, stages and option names checked (values and references are checked by
    :func:`plan`); errors name the file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    where = lambda node, extra="": f"{path}:{node.start_mark.line + 1}: {extra}"  # noqa: E731
    if not isinstance(data, dict) or "steps" not in data:
        raise RecipeError(f"{path}: a recipe is a mapping with `steps:` (a list of {{name, stage, options}}) and "
                          "optional `vars:`")
    keys = {k.value: (k, v) for k, v in root.value}
    for key, (node, _) in keys.items():
        if key not in ("vars", "steps"):
            raise RecipeError(where(node, f"unknown key '{key}'{_closest(key, ('vars', 'steps'))}"))
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise RecipeError(where(keys["vars"][1], "`vars:` must be a mapping of NAME: value"))
    var_lines = {k.value: k.start_mark.line + 1 for k, _ in keys["vars"][1].value} if variables else {}
    for name in variables:
        if not re.fullmatch(r"[A-Za-z_]\w*", str(name)) or name in PIPELINE_OPTIONS + ("world", "run"):
            raise RecipeError(f"{path}:{var_lines[name]}: var '{name}': a var is a name (letters, digits, _) other "
                              f"than {', '.join(PIPELINE_OPTIONS + ('world', 'run'))}")
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise RecipeError(where(keys["steps"][1], "`steps:` must be a non-empty list of {name, stage, options}"))
    steps: list[Step] = []
    for node, raw in zip(keys["steps"][1].value, data["steps"]):
        if not isinstance(raw, dict):
            raise RecipeError(where(node, "a step is a mapping {name, stage, options}"))
        fields_ = {k.value: (k, v) for k, v in node.value}
        for key, (key_node, _) in fields_.items():
            if key not in STEP_KEYS:
                raise RecipeError(where(key_node, f"unknown key '{key}' of a step{_closest(key, STEP_KEYS)}"))
        name, stage = raw.get("name", raw.get("stage")), raw.get("stage")  # the name defaults to the stage
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise RecipeError(where(node, f"step name {name!r}: a step needs a `name` of letters, digits and _"))
        if any(s.name == name for s in steps) or name in variables or name in PIPELINE_OPTIONS + ("world", "run"):
            raise RecipeError(where(node, f"step '{name}': the name is taken (another step, a var or a built-in)"))
        if stage not in STAGES:
            raise RecipeError(where(fields_.get("stage", (node,))[0], f"step '{name}': unknown stage {stage!r}"
                                    f"{_closest(str(stage), STAGES)}"))
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise RecipeError(where(node, f"step '{name}': `options:` must be a mapping of option: value"))
        option_lines = {k.value: k.start_mark.line + 1 for k, _ in fields_["options"][1].value} if options else {}
        step = Step(name, stage, options, node.start_mark.line + 1, option_lines)
        for key in options:
            _check_option(path, step, str(key), f"{path}:{option_lines[key]}")
        steps.append(step)
    return Recipe(path, variables, steps, var_lines)


def _check_option(path: Path, step: Step, key: str, where: str) -> None:
    cls = STAGES[step.stage][0]
    valid = [f.name for f in dataclasses.fields(cls)]
    if key in SET_BY_PIPELINE and key in valid:
        raise RecipeError(f"{where}: step '{step.name}': '{key}' is set by the pipeline (the step's directory "
                          "under --out, resumed on a rerun)")
    if key not in valid:
        raise RecipeError(f"{where}: step '{step.name}' (stage {step.stage}): unknown option '{key}'"
                          f"{_closest(key, [v for v in valid if v not in SET_BY_PIPELINE])}")


def parse_arguments(argv: list[str]) -> tuple[str, dict[str, str]]:
    """``['recipe.yaml', '--model', 'DIR', '--sft.max_steps=2']`` -> ('recipe.yaml', {'model': 'DIR', ...})."""
    recipe, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if recipe is not None:
                raise RecipeError(f"unexpected argument {arg!r}: one recipe, then --key=value options")
            recipe, i = arg, i + 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    if recipe is None:
        raise RecipeError("posttrain pipeline needs a recipe: a YAML file or a built-in name (see --help)")
    return recipe, overrides


@dataclass
class PlannedStep:
    step: Step
    dir: Path
    options: dict[str, Any]  # as written, with the command line's --STEP.option overrides
    inputs: list[str]  # the earlier steps it reads
    settings: dict[str, Any]  # what decides whether a finished run of it still stands
    hash: str


def _substitute(value: Any, lookup: Callable[[str], Any]) -> Any:
    """``value`` with every ``${...}`` replaced by ``lookup(name)``; a whole-value reference keeps its type."""
    if not isinstance(value, str):
        if isinstance(value, list):
            return [_substitute(v, lookup) for v in value]
        if isinstance(value, dict):
            return {k: _substitute(v, lookup) for k, v in value.items()}
        return value
    if (whole := REFERENCE.fullmatch(value)) is not None:
        return lookup(whole.group(1).strip())
    return REFERENCE.sub(lambda m: str(lookup(m.group(1).strip())), value)


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(recipe: Recipe, overrides: dict[str, str], world) -> tuple[Path, list[PlannedStep], dict[str, Any]]:
    """(run directory, the steps with their settings, the context of references) for ``recipe`` under the command
    line's ``overrides``; every reference and option value is checked here, before anything runs. ``world``: the
    tiny world's paths (``WorldPaths``; its base model need not be built yet)."""
    path = recipe.path
    out = Path(overrides.get("out") or Path("runs") / path.stem)
    step_names = {s.name: s for s in recipe.steps}
    step_options: dict[str, dict[str, Any]] = {s.name: dict(s.options) for s in recipe.steps}
    variables = dict(recipe.vars)
    for key, value in overrides.items():
        if key in PIPELINE_OPTIONS:
            continue
        name, dot, option = key.partition(".")
        if dot:
            if name not in step_names:
                raise RecipeError(f"command line: --{key}: no step '{name}' in {path}{_closest(name, step_names)}")
            _check_option(path, step_names[name], option, f"command line: --{key}")
            step_options[name][option] = value
        elif key in variables:
            variables[key] = value
        else:
            raise RecipeError(f"command line: --{key}: not an option of the pipeline ({', '.join(PIPELINE_OPTIONS)}), "
                              f"a var of {path} ({', '.join(variables) or 'none'}) or STEP.OPTION"
                              f"{_closest(key, list(PIPELINE_OPTIONS) + list(variables))}")
    context: dict[str, Any] = {"world.data": str(world.data), "world.tokenizer": str(world.tokenizer),
                               "world.base_model": str(world.base_model), "run": str(out),
                               "model": overrides.get("model") or str(world.base_model)}
    for name, value in variables.items():
        def var_lookup(ref: str, name=name) -> Any:
            if ref not in context:
                raise RecipeError(f"{path}:{recipe.var_lines.get(name, '?')}: var '{name}': unknown reference "
                                  f"${{{ref}}} (vars may use ${{model}}, ${{run}}, ${{world.data}}, "
                                  f"${{world.tokenizer}}, ${{world.base_model}} and the vars above them)")
            return context[ref]
        context[name] = _substitute(value, var_lookup)
    planned: list[PlannedStep] = []
    for step in recipe.steps:
        step_dir = out / step.name
        earlier = {p.step.name: p for p in planned}
        inputs: list[str] = []

        def lookup(ref: str, key: str, step=step, earlier=earlier, inputs=inputs) -> Any:
            where = _where(recipe, step, key, overrides)
            if ref in context:
                return context[ref]
            target, dot, attribute = ref.partition(".")
            if not dot or target not in step_names:
                raise RecipeError(f"{where}: unknown reference ${{{ref}}}: not a step's output, a var "
                                  f"({', '.join(variables) or 'none'}) or ${{model}}, ${{run}}, ${{world.data}}, "
                                  f"${{world.tokenizer}}, ${{world.base_model}}")
            if target not in earlier:
                raise RecipeError(f"{where}: ${{{ref}}}: step '{target}' does not run before step '{step.name}'")
            kind = STAGES[step_names[target].stage][2]
            if attribute not in OUTPUTS[kind]:
                raise RecipeError(f"{where}: ${{{ref}}}: step '{target}' (stage {step_names[target].stage}) has "
                                  f"{' and '.join('${' + target + '.' + a + '}' for a in OUTPUTS[kind])}")
            if target not in inputs:
                inputs.append(target)
            return str(_expected_output(earlier[target], attribute))

        options = {key: _substitute(value, lambda ref, key=key: lookup(ref, key))
                   for key, value in step_options[step.name].items()}
        config = _build(recipe, step, options, step_dir, overrides)  # every value checked now
        # the settings as the stage reads them (`--sft.max_steps=2` and `max_steps: 2` are the same)
        kept = {k: json.loads(json.dumps(getattr(config, k), default=str)) for k in options
                if k not in CHANGEABLE_ON_RESUME}
        settings = {"stage": step.stage, "options": kept, "inputs": {n: earlier[n].hash for n in inputs}}
        planned.append(PlannedStep(step, step_dir, step_options[step.name], inputs, settings, _settings_hash(settings)))
    return out, planned, context


def _where(recipe: Recipe, step: Step, key: str | None, overrides: dict[str, str]) -> str:
    if key is not None and f"{step.name}.{key}" in overrides:
        return f"command line: --{step.name}.{key}: step '{step.name}'"
    line = step.option_lines.get(key, step.line) if key else step.line
    return f"{recipe.path}:{line}: step '{step.name}'" + (f", option '{key}'" if key else "")


def _expected_output(planned: PlannedStep, attribute: str) -> Path:
    """Where a step's output will be (the plan's checks; a run uses what the step returned)."""
    kind = STAGES[planned.step.stage][2]
    if attribute == "model":
        return planned.dir / "model"
    return planned.dir / f"{planned.step.stage}.jsonl" if kind == "file" else planned.dir


def _build(recipe: Recipe, step: Step, options: dict[str, Any], step_dir: Path, overrides: dict[str, str]):
    """The step's config: its options and the pipeline's (out, resume, overwrite; --device, --progress)."""
    cls, _, kind = STAGES[step.stage]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: overrides[k] for k in ("device", "progress") if k in overrides and k in names}
    values.update(options)
    values["out"] = str(step_dir / f"{step.stage}.jsonl") if kind == "file" else str(step_dir)
    values.update({k: True for k in ("resume", "overwrite") if k in names})
    try:
        return build_config(cls, overrides=values)
    except ConfigError as err:
        culprit = next((k for k in options if _fails(cls, k, options[k])), None)
        message = str(err).removeprefix("command line: ")
        raise RecipeError(f"{_where(recipe, step, culprit, overrides)} (stage {step.stage}): {message}") from None


def _fails(cls: type, key: str, value: Any) -> bool:
    try:
        build_config(cls, overrides={key: value})
    except ConfigError:
        return True
    return False


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two settings records, e.g. ``max_steps 300 -> 2; input sft changed``."""
    parts = []
    old_options, new_options = old.get("options", {}), new["options"]
    shown = lambda options, key: repr(options[key]) if key in options else "(default)"  # noqa: E731
    for key in sorted(set(old_options) | set(new_options)):
        if shown(old_options, key) != shown(new_options, key):
            parts.append(f"{key} {shown(old_options, key)} -> {shown(new_options, key)}")
    if old.get("stage") != new["stage"]:
        parts.insert(0, f"stage {old.get('stage')} -> {new['stage']}")
    changed_inputs = [n for n, h in new["inputs"].items() if old.get("inputs", {}).get(n) != h]
    if changed_inputs:
        parts.append(f"its input{'s' if len(changed_inputs) > 1 else ''} {', '.join(changed_inputs)} changed")
    return "; ".join(parts) or "settings changed"


def _outputs_exist(outputs: dict[str, str]) -> bool:
    return all(Path(p).exists() for p in outputs.values())


def run_pipeline(recipe_path_or_name: str | Path, overrides: dict[str, str] | None = None) -> dict:
    """Run a recipe (see the module docstring); ``overrides``: the command line's ``--KEY=VALUE`` (``out``,
    ``model``, ``device``, ``progress``, a var, or ``STEP.OPTION``). Returns ``{"out", "steps": {name: {"status":
    "ran" | "skipped", "outputs", "seconds"}}}`` and keeps the same in ``OUT/pipeline.json``."""
    from posttrain.stages.world import ensure_world

    overrides = dict(overrides or {})
    path = recipe_path(str(recipe_path_or_name))
    recipe = load_recipe(path)
    world = ensure_world(base_model=False, progress=False)
    out, planned, context = plan(recipe, overrides, world)
    state_path = out / "pipeline.json"
    if out.is_dir() and any(out.iterdir()) and not state_path.exists():
        raise FileExistsError(f"{out} holds something else than a pipeline's run (no pipeline.json): choose another "
                              "--out")
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    records: dict[str, dict] = state.get("steps", {})
    state = {"recipe": str(path), "overrides": overrides, "steps": records}
    outputs: dict[str, dict[str, str]] = {}
    summary: dict[str, dict] = {}

    def save() -> None:
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")

    for number, p in enumerate(planned, 1):
        name, record = p.step.name, records.get(p.step.name)
        label = f"step {number}/{len(planned)} {name} ({p.step.stage})"
        rerun_inputs = [n for n in p.inputs if summary[n]["status"] == "ran"]
        if record and record["hash"] == p.hash and record["status"] == "done" and _outputs_exist(record["outputs"]) \
                and not rerun_inputs:
            print(f"{label}: done, skipped")
            outputs[name] = record["outputs"]
            summary[name] = {"status": "skipped", "outputs": record["outputs"], "seconds": record["seconds"]}
            continue
        if record and record["hash"] != p.hash:
            print(f"{label}: settings changed ({_describe_change(record['settings'], p.settings)}); running it again "
                  f"from scratch")
            shutil.rmtree(p.dir, ignore_errors=True)
        elif record and rerun_inputs:  # an input ran again (its output was deleted): done or half-done work is stale
            print(f"{label}: its input{'s' if len(rerun_inputs) > 1 else ''} {', '.join(rerun_inputs)} ran again; "
                  "running it again from scratch")
            shutil.rmtree(p.dir, ignore_errors=True)
        elif record and record["status"] == "done":
            print(f"{label}: its output is missing ({', '.join(record['outputs'].values())}); running it again")
            shutil.rmtree(p.dir, ignore_errors=True)
        elif record:  # still "running": the process was killed
            print(f"{label}: {'killed' if record['status'] == 'running' else record['status']} last time; resuming it")
        else:
            print(f"{label}: running")
        options = _resolved(p, context, outputs)
        if any(context["world.base_model"] in str(value) for value in options.values()):
            ensure_world(base_model=True)  # pretrained once per machine (minutes), then cached
        config = _build(recipe, p.step, options, p.dir, overrides)
        p.dir.mkdir(parents=True, exist_ok=True)
        records[name] = {"stage": p.step.stage, "hash": p.hash, "settings": p.settings, "status": "running",
                         "outputs": {}, "seconds": record.get("seconds", 0.0) if record and record["hash"] == p.hash
                         else 0.0}
        save()
        started = time.time()
        try:
            result = STAGES[p.step.stage][1](config)
        except BaseException as err:
            records[name]["seconds"] = round(records[name]["seconds"] + time.time() - started, 1)
            records[name]["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            save()
            print(f"posttrain pipeline: {label} {records[name]['status']} ({type(err).__name__}); its directory is "
                  f"{p.dir}. Run the same command again to resume at this step.", file=sys.stderr)
            raise
        kind = STAGES[p.step.stage][2]
        outputs[name] = {"out": config.out} if kind == "file" else {"model": str(result), "out": str(p.dir)}
        records[name].update(status="done", outputs=outputs[name],
                             seconds=round(records[name]["seconds"] + time.time() - started, 1))
        save()
        summary[name] = {"status": "ran", "outputs": outputs[name], "seconds": records[name]["seconds"]}
        print(f"{label}: done in {time.time() - started:.0f} s -> {', '.join(outputs[name].values())}")
    return {"out": str(out), "steps": summary}


def _resolved(p: PlannedStep, context: dict[str, Any], outputs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The step's options with references to earlier steps replaced by what those steps returned."""
    def lookup(ref: str) -> Any:
        if ref in context:
            return context[ref]
        target, _, attribute = ref.partition(".")
        return outputs[target][attribute]

    return {key: _substitute(value, lookup) for key, value in p.options.items()}


HELP = """usage: posttrain pipeline RECIPE [--out DIR] [--model DIR] [--device D] [--progress=false] [--VAR=VALUE]
                          [--STEP.OPTION=VALUE ...]

Run a recipe's stages in order, each stage's output feeding the next, in one run directory (--out, default
runs/RECIPE) with a sub-directory per step and pipeline.json (each step's settings, status, outputs, seconds).
Run the same command again and finished steps are skipped ("done, skipped"), a step whose settings changed runs again
from scratch (saying what changed), and so does every later step that read its output; an interrupted step resumes
(a training stage from its last checkpoint).

RECIPE: a YAML file, or the name of a built-in recipe (recipes/NAME.yaml, shipped in the package).

options:
  --out=DIR            the run directory (default runs/RECIPE)
  --model=DIR          ${model} in the recipe: the model to post-train (default: the tiny world's base model)
  --device=D           every step's device (auto | cpu | cuda | cuda:N)
  --progress=false     no progress bars
  --VAR=VALUE          a var of the recipe's `vars:`
  --STEP.OPTION=VALUE  one option of one step, e.g. --sft.max_steps=50 (see `posttrain STAGE --help`)

recipe format:
  vars:                            # optional, each overridable with --NAME=VALUE
    prompts: ${world.data}/rl_train.jsonl
  steps:
    - name: sft                    # the step's directory under --out and its name in references
      stage: sft                   # one of the stages listed below
      options:                     # the stage's options; `out` (and resume / overwrite) are the pipeline's
        model: ${model}
        max_steps: 300
    - name: rm
      stage: rm
      options:
        model: ${sft.model}        # the final model of step sft
  references: ${STEP.model} (a training step's or rs's final model), ${STEP.out} (the file a generate / score /
  select / bon / label step writes; a training step's directory), ${model}, ${run} (the run directory),
  ${world.data}, ${world.tokenizer}, ${world.base_model}, ${VAR}. See docs/recipes.md.
"""


def recipe_summaries() -> list[str]:
    """``NAME  first header line`` of each built-in recipe."""
    lines = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        lines.append(f"  {path.stem:<12} {first}")
    return lines


def pipeline_command(argv: list[str]) -> int:
    """``posttrain pipeline ...`` (the CLI's entry point)."""
    if not argv or "-h" in argv or "--help" in argv:
        print(HELP + f"\nstages: {', '.join(STAGES)}\n\nrecipes ({RECIPES_DIR}):\n"
              + "\n".join(recipe_summaries() or ["  (none found)"]))
        return 0
    recipe, overrides = parse_arguments(argv)
    result = run_pipeline(recipe, overrides)
    print(f"pipeline complete: {result['out']} (state in {result['out']}/pipeline.json)")
    return 0
