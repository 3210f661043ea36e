"""`posttrain pipeline`: recipes parsed and checked (errors name the file, the line, the step and the option), steps
skipped when done, rerun when their settings or inputs changed, resumed when killed mid-run; every recipe of
recipes/ end to end on the tiny world at the smallest sizes (a random tiny model as --model, 16-row data files)."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.plumbing.config import ConfigError
from posttrain.stages.pipeline import (RECIPES_DIR, RecipeError, load_recipe, parse_arguments, plan, recipe_path,
                                       run_pipeline)

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SMALL_RECIPE = """\
vars:
  steps: 2
  sft_data: ${{world.data}}/sft_heldout.jsonl
steps:
  - name: sft
    stage: sft
    options:
      model: ${{model}}
      data: ${{sft_data}}
      max_steps: ${{steps}}
      batch_size: 2
      save_every: {save_every}
  - name: gen
    stage: generate
    options:
      model: ${{sft.model}}
      prompts: ${{world.data}}/rl_heldout.jsonl
      limit: 2
      n: 2
      max_new_tokens: 4
  - name: scored
    stage: score
    options:
      data: ${{gen.out}}
      reward: gold
"""


def _small(tmp_path: Path, save_every: int = 0) -> Path:
    return _write(tmp_path, SMALL_RECIPE.format(save_every=save_every))


def test_references_resolve_with_types_and_inputs(world, tmp_path):
    """Vars (whole-value references keep their type), world paths, ${model}, step outputs; each step's inputs are
    the steps it reads; the command line overrides a var and one step's option."""
    recipe = load_recipe(_small(tmp_path))
    out, steps, context = plan(recipe, {"out": str(tmp_path / "run"), "model": "/models/mine", "steps": "3",
                                        "gen.n": "4"}, world)
    assert out == tmp_path / "run"
    sft, gen, scored = steps
    assert context["steps"] == "3" and context["sft_data"] == f"{world.data}/sft_heldout.jsonl"
    assert sft.settings["options"] == {"model": "/models/mine", "data": f"{world.data}/sft_heldout.jsonl",
                                       "max_steps": 3, "batch_size": 2}  # save_every: may change on resume
    assert gen.settings["options"]["model"] == str(tmp_path / "run" / "sft" / "model")
    assert gen.settings["options"]["n"] == 4
    assert scored.settings["options"]["data"] == str(tmp_path / "run" / "gen" / "generate.jsonl")
    assert [s.inputs for s in steps] == [[], ["sft"], ["gen"]]
    assert scored.settings["inputs"] == {"gen": gen.hash}
    assert steps[0].options["max_steps"] == "${steps}"  # as written: resolved again when the step runs
    # without the override, the var's YAML value is kept and ${model} is the world's base model
    _, steps, _ = plan(recipe, {}, world)
    assert steps[0].settings["options"]["max_steps"] == 2
    assert steps[0].settings["options"]["model"] == str(world.base_model)
    # the same value written in YAML or on the command line is the same setting
    assert plan(recipe, {"steps": "2"}, world)[1][0].hash == steps[0].hash


def test_arguments_and_builtin_recipes(monkeypatch):
    assert parse_arguments(["r.yaml", "--model", "DIR", "--sft.max_steps=2", "--progress"]) == (
        "r.yaml", {"model": "DIR", "sft.max_steps": "2", "progress": "true"})
    with pytest.raises(RecipeError, match="needs a recipe"):
        parse_arguments(["--model=DIR"])
    names = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert {"instructgpt", "tulu3", "r1", "minimal", "demo"} <= names
    assert recipe_path("minimal") == RECIPES_DIR / "minimal.yaml"
    monkeypatch.chdir("/")  # outside a checkout (an installed package): the headers' recipes/NAME.yaml is built in
    assert recipe_path("recipes/tulu3.yaml") == RECIPES_DIR / "tulu3.yaml"
    with pytest.raises(FileNotFoundError, match="no recipe 'nope'"):
        recipe_path("nope")
    for name in names:  # the header gives the exact command
        header = [line for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        assert any(f"run: posttrain pipeline recipes/{name}.yaml" in line for line in header), name


@pytest.mark.parametrize("text, overrides, message", [
    ("steps:\n  - name: a\n    stage: sfft\n", {},
     r"recipe.yaml:3: step 'a': unknown stage 'sfft'; did you mean 'sft'"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      lrr: 1\n", {},
     r"recipe.yaml:5: step 'a' \(stage sft\): unknown option 'lrr'; did you mean 'lr'"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      out: x\n", {},
     r"recipe.yaml:5: step 'a': 'out' is set by the pipeline"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      lr: 1\n      model: ${b.model}\n", {},
     r"recipe.yaml:6: step 'a', option 'model': unknown reference \$\{b.model\}"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      model: ${b.model}\n  - name: b\n    stage: sft\n", {},
     r"recipe.yaml:5: step 'a', option 'model': \$\{b.model\}: step 'b' does not run before step 'a'"),
    ("steps:\n  - name: g\n    stage: generate\n  - name: a\n    stage: sft\n    options:\n      model: ${g.model}\n",
     {}, r"recipe.yaml:7: step 'a', option 'model': \$\{g.model\}: step 'g' \(stage generate\) has \$\{g.out\}"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      max_steps: many\n", {},
     r"recipe.yaml:5: step 'a', option 'max_steps' \(stage sft\): 'max_steps': cannot read 'many' as int"),
    ("steps:\n  - name: a\n    stage: sft\n    options:\n      lr: -1\n", {},
     r"recipe.yaml:5: step 'a', option 'lr' \(stage sft\): 'lr' must be at least 0"),
    ("steps:\n  - name: a\n    stage: sft\n", {"a.lrr": "1"},
     r"command line: --a.lrr: step 'a' \(stage sft\): unknown option 'lrr'; did you mean 'lr'"),
    ("steps:\n  - name: a\n    stage: sft\n", {"b.lr": "1"}, r"command line: --b.lr: no step 'b'"),
    ("steps:\n  - name: a\n    stage: sft\n", {"stepz": "1"}, r"command line: --stepz: not an option of the pipeline"),
    ("steps:\n  - name: a\n    stage: sft\n", {"a.max_steps": "x"},
     r"command line: --a.max_steps: step 'a' \(stage sft\): 'max_steps': cannot read 'x' as int"),
    ("stepz: []\n", {}, r"recipe.yaml: a recipe is a mapping with `steps:`"),
    ("steps:\n  - name: a\n    stage: sft\n    option:\n      lr: 1\n", {},
     r"recipe.yaml:4: unknown key 'option' of a step; did you mean 'options'"),
    ("vars:\n  x: ${nope}\nsteps:\n  - stage: sft\n", {}, r"recipe.yaml:2: var 'x': unknown reference \$\{nope\}"),
    ("steps:\n  - name: a\n    stage: sft\n  - name: a\n    stage: rm\n", {},
     r"recipe.yaml:4: step 'a': the name is taken"),
])
def test_recipe_errors_name_file_line_step_and_option(world, tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(load_recipe(_write(tmp_path, text)), overrides, world)


def test_cli_reports_recipe_errors(tmp_path, capsys):
    from posttrain.cli import main

    path = _write(tmp_path, "steps:\n  - name: a\n    stage: dpoo\n")
    assert main(["pipeline", str(path)]) == 2
    assert f"{path}:3: step 'a': unknown stage 'dpoo'; did you mean 'dpo'?" in capsys.readouterr().err
    assert main(["pipeline", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "recipe format" in shown and all(name in shown for name in ("instructgpt", "tulu3", "r1", "minimal"))


def _steps(result: dict) -> dict[str, str]:
    return {name: step["status"] for name, step in result["steps"].items()}


def test_skip_when_done_rerun_on_change_and_downstream(world, tiny_model_dir, tmp_path, capsys):
    """A second run skips every finished step; a changed option reruns its step from scratch (naming the change)
    and every later step that read its output; a step whose own settings changed reruns alone with its followers;
    the device (a setting a resume may change) reruns nothing."""
    recipe = _small(tmp_path)
    args = {"out": str(tmp_path / "run"), "model": str(tiny_model_dir), "device": "cpu", "progress": "false"}
    first = run_pipeline(recipe, args)
    assert _steps(first) == {"sft": "ran", "gen": "ran", "scored": "ran"}
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert {name: s["status"] for name, s in state["steps"].items()} == {"sft": "done", "gen": "done", "scored": "done"}
    assert state["steps"]["scored"]["outputs"] == {"out": str(tmp_path / "run" / "scored" / "score.jsonl")}
    assert (tmp_path / "run" / "sft" / "model" / "complete.json").exists()
    capsys.readouterr()

    assert _steps(run_pipeline(recipe, args)) == {"sft": "skipped", "gen": "skipped", "scored": "skipped"}
    assert capsys.readouterr().out.count("done, skipped") == 3

    changed = run_pipeline(recipe, {**args, "sft.lr": "0.001"})
    assert _steps(changed) == {"sft": "ran", "gen": "ran", "scored": "ran"}
    shown = capsys.readouterr().out
    assert "sft (sft): settings changed (lr (default) -> 0.001); running it again from scratch" in shown
    assert "gen (generate): settings changed (its input sft changed)" in shown
    assert "scored (score): settings changed (its input gen changed)" in shown

    only_last = run_pipeline(recipe, {**args, "sft.lr": "0.001", "scored.reward": "verifier:math"})
    assert _steps(only_last) == {"sft": "skipped", "gen": "skipped", "scored": "ran"}
    assert "reward 'gold' -> 'verifier:math'" in capsys.readouterr().out

    args = {**args, "sft.lr": "0.001", "scored.reward": "verifier:math"}
    assert _steps(run_pipeline(recipe, {**args, "device": "auto"})) == {"sft": "skipped", "gen": "skipped",
                                                                        "scored": "skipped"}
    capsys.readouterr()

    # an output deleted: its step runs again, and so does every step that read it
    (tmp_path / "run" / "gen" / "generate.jsonl").unlink()
    assert _steps(run_pipeline(recipe, args)) == {"sft": "skipped", "gen": "ran", "scored": "ran"}
    shown = capsys.readouterr().out
    assert "gen (generate): its output is missing" in shown and "scored (score): its input gen ran again" in shown


def test_failed_step_is_named_and_rerun_resumes_there(world, tiny_model_dir, tmp_path, capsys):
    """A step that fails leaves a message naming it and its status; the finished steps before it stay done."""
    recipe = _write(tmp_path, SMALL_RECIPE.format(save_every=0).replace("${world.data}/rl_heldout.jsonl",
                                                                         str(tmp_path / "missing.jsonl")))
    args = {"out": str(tmp_path / "run"), "model": str(tiny_model_dir), "device": "cpu", "progress": "false"}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_pipeline(recipe, args)
    assert "step 2/3 gen (generate) failed" in capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert state["steps"]["sft"]["status"] == "done" and state["steps"]["gen"]["status"] == "failed"
    # its input runs again (its model was deleted): the failed step's half-done work is stale, started over
    shutil.rmtree(tmp_path / "run" / "sft" / "model")
    (tmp_path / "run" / "gen" / "stale.txt").write_text("from the failed try")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_pipeline(recipe, args)
    assert "gen (generate): its input sft ran again; running it again from scratch" in capsys.readouterr().out
    assert not (tmp_path / "run" / "gen" / "stale.txt").exists()
    (tmp_path / "missing.jsonl").write_text((world.data / "rl_heldout.jsonl").read_text())
    assert _steps(run_pipeline(recipe, args)) == {"sft": "skipped", "gen": "ran", "scored": "ran"}
    assert "gen (generate): failed last time; resuming it" in capsys.readouterr().out


def test_refuses_a_directory_that_is_not_a_pipeline_run(tmp_path, world):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(FileExistsError, match="no pipeline.json"):
        run_pipeline(_small(tmp_path), {"out": str(tmp_path / "run")})


def test_step_killed_mid_run_resumes_from_its_checkpoint(world, tiny_model_dir, tmp_path, capsys):
    """The pipeline is SIGKILLed while its SFT step trains (after a checkpoint is on disk); the rerun resumes that
    step from the checkpoint (resumes.jsonl, "resumed from step k"), not from step 0, and runs the rest."""
    recipe = _small(tmp_path, save_every=2)
    out = tmp_path / "run"
    steps = 40
    command = [sys.executable, "-m", "posttrain.cli", "pipeline", str(recipe), f"--out={out}",
               f"--model={tiny_model_dir}", "--device=cpu", "--progress=false", f"--steps={steps}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    try:
        while not list((out / "sft" / "checkpoints").glob("step-*[0-9]")):
            assert process.poll() is None and time.time() < deadline, "the pipeline ended before a checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "sft" / "model").exists(), "SFT finished before the kill; the test did not test a resume"
    state = json.loads((out / "pipeline.json").read_text())
    assert state["steps"]["sft"]["status"] == "running"

    result = run_pipeline(recipe, {"out": str(out), "model": str(tiny_model_dir), "device": "cpu",
                                   "progress": "false", "steps": str(steps)})
    shown = capsys.readouterr().out
    assert _steps(result) == {"sft": "ran", "gen": "ran", "scored": "ran"}
    assert "sft (sft): killed last time; resuming it" in shown
    resumed = [json.loads(line) for line in (out / "sft" / "resumes.jsonl").read_text().splitlines()]
    assert len(resumed) == 1 and resumed[0]["step"] >= 2
    assert f"resumed from step {resumed[0]['step']} of {steps}" in shown
    logged = [r["step"] for r in map(json.loads, (out / "sft" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert logged == list(range(1, steps + 1))  # each step once: the killed run's later steps replaced


# ---------------------------------------------------------------------------------------------------------------
# every recipe end to end at the smallest sizes

SIZES = {  # per stage: the smallest run that still goes through every part of the stage
    "sft": {"max_steps": 1, "batch_size": 2, "eval_data": "", "save_every": 0},
    "rm": {"max_steps": 1, "batch_size": 2, "eval_data": "", "save_every": 0},
    "dpo": {"max_steps": 1, "batch_size": 2, "eval_data": "", "save_every": 0},
    "rl": {"max_steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 8, "eval_data": "", "save_every": 0,
           "num_minibatches": 1, "generation_batch_size": 64},
    "generate": {"limit": 4, "n": 2, "max_new_tokens": 8},
    "bon": {"limit": 4, "n": 2, "max_new_tokens": 8},
    "rs": {"limit": 4, "n": 2, "max_new_tokens": 8, "sft_batch_size": 2},
}


def small_run(name: str, world, model, tmp_path: Path, **extra: str) -> dict:
    """``posttrain pipeline recipes/NAME.yaml`` with --model ``model``, every step at :data:`SIZES` and every data
    file of the world it reads cut to its first 16 rows."""
    small = tmp_path / "data"
    small.mkdir(exist_ok=True)
    overrides = {"out": str(tmp_path / name), "model": str(model), "device": "cpu", "progress": "false", **extra}
    for step in load_recipe(recipe_path(name)).steps:
        overrides.update({f"{step.name}.{k}": str(v) for k, v in SIZES.get(step.stage, {}).items()})
        for key, value in step.options.items():
            if isinstance(value, str) and value.startswith("${world.data}/") and key in ("data", "prompts"):
                file = value.removeprefix("${world.data}/")
                rows = (world.data / file).read_text().splitlines(keepends=True)[:16]
                (small / file).write_text("".join(rows))
                overrides[f"{step.name}.{key}"] = str(small / file)
    return run_pipeline(recipe_path(name), overrides)


def _check_run(result: dict, name: str, tmp_path: Path) -> None:
    steps = load_recipe(recipe_path(name)).steps
    assert _steps(result) == {s.name: "ran" for s in steps}
    state = json.loads((tmp_path / name / "pipeline.json").read_text())
    assert all(s["status"] == "done" for s in state["steps"].values())
    for step in steps:
        assert (tmp_path / name / step.name).is_dir(), step.name
        for output in result["steps"][step.name]["outputs"].values():
            assert Path(output).exists(), (step.name, output)


@pytest.mark.parametrize("name", ["minimal", "instructgpt", "tulu3", "demo"])
def test_recipe_end_to_end(name, world, tiny_model_dir, tmp_path):
    _check_run(small_run(name, world, tiny_model_dir, tmp_path), name, tmp_path)


def test_instructgpt_trains_its_rm_on_rankings(world, tiny_model_dir, tmp_path):
    """The reward model of instructgpt: K ranked completions per prompt, InstructGPT's all-pairs loss."""
    recipe = load_recipe(recipe_path("instructgpt"))
    rm = next(s for s in recipe.steps if s.name == "rm")
    assert rm.options["loss"] == "kcomparisons" and rm.options["data"].endswith("rankings_train.jsonl")
    assert len(json.loads((world.data / "rankings_train.jsonl").read_text().splitlines()[0])["completions"]) >= 3


def _reasoning_world(world) -> str | None:
    """Why the r1 recipe cannot run as written yet, or None."""
    from posttrain.data.templates import CHAT_TEMPLATES

    if not (world.data / "sft_reasoning_train.jsonl").exists():
        return "the tiny world has no sft_reasoning_train.jsonl yet"
    if "harmony" not in CHAT_TEMPLATES:
        return "no harmony chat template yet"
    return None


def test_r1_end_to_end(world, tiny_model_dir, tmp_path):
    if reason := _reasoning_world(world):
        pytest.skip(reason)
    _check_run(small_run("r1", world, tiny_model_dir, tmp_path), "r1", tmp_path)
