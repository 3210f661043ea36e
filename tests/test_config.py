"""Stage configs: defaults < YAML < command line, clear errors for unknown keys and bad values, --help."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import cli
from posttrain.plumbing.config import ConfigError, build_config, config_to_dict, parse_overrides, save_config
from posttrain.stages.pretrain import PretrainConfig
from posttrain.stages.sft import SFTConfig

SRC = Path(__file__).resolve().parents[1] / "src"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=120)


def write_yaml(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


# --------------------------------------------------------------------------------------------------------------
# build_config: defaults, YAML, overrides and their precedence


def test_defaults():
    config = build_config(SFTConfig)
    assert config == SFTConfig()
    assert config.batch_size == 16 and config.packing is False and config.lr == 3e-4 and config.columns == {}
    assert SFTConfig().columns is not SFTConfig().columns  # mutable defaults are not shared


def test_yaml_values_are_read_and_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlr: 1e-4\nepochs: 2\npacking: yes\ncolumns: {conversation: messages}\n"
                    "out: runs/x\nmax-length: 256\n")
    config = build_config(SFTConfig, path)
    assert config.batch_size == 8 and isinstance(config.batch_size, int)
    assert config.lr == pytest.approx(1e-4) and isinstance(config.lr, float)  # YAML reads 1e-4 as a string
    assert config.epochs == 2.0 and isinstance(config.epochs, float)
    assert config.packing is True
    assert config.columns == {"conversation": "messages"}
    assert config.out == "runs/x"
    assert config.max_length == 256  # dashes are accepted for underscores
    assert config.grad_accum == SFTConfig().grad_accum  # untouched keys keep their defaults


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"batch_size": 8, "lr": 0.01, "seed": 3})
    config = build_config(SFTConfig, path, {"batch_size": "4", "max_steps": "7"})
    assert config.batch_size == 4  # command line beats YAML
    assert config.lr == 0.01 and config.seed == 3  # YAML beats defaults
    assert config.max_steps == 7  # command line beats defaults
    assert config.grad_accum == 1  # default


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert build_config(SFTConfig, path) == SFTConfig()


def test_saved_config_round_trips(tmp_path):
    config = build_config(SFTConfig, None, {"batch_size": "4", "columns": "{a: messages}", "packing": "true",
                                           "lr": "2e-5"})
    save_config(config, tmp_path / "config.yaml")
    assert build_config(SFTConfig, tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(config)


def test_unknown_yaml_key_names_it_and_suggests_the_closest(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"batchsize": 4})
    with pytest.raises(ConfigError) as info:
        build_config(SFTConfig, path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'batchsize'" in message and "SFTConfig" in message
    assert "did you mean 'batch_size'?" in message

    path = write_yaml(tmp_path / "c.yaml", {"lerning_rate": 1e-4})  # no close match: the valid keys are listed
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate'.*valid keys: .*batch_size.*\blr\b"):
        build_config(SFTConfig, path)


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [4\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        build_config(SFTConfig, bad)
    bad.write_text("- batch_size\n- 4\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(SFTConfig, bad)


@pytest.mark.parametrize("key, value, type_name", [
    ("batch_size", "abc", "int"),
    ("batch_size", 2.5, "int"),
    ("batch_size", True, "int"),
    ("lr", "fast", "float"),
    ("packing", "maybe", "bool"),
    ("columns", "[a, b]", "dict"),
])
def test_type_errors_name_the_key(key, value, type_name):
    with pytest.raises(ConfigError) as info:
        build_config(SFTConfig, None, {key: value})
    assert str(info.value) == f"'{key}': cannot read {value!r} as {type_name}"


def test_null_for_a_required_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size:\n")
    with pytest.raises(ConfigError, match="'batch_size' cannot be empty"):
        build_config(SFTConfig, path)


# --------------------------------------------------------------------------------------------------------------
# command-line parsing


def test_parse_overrides_forms():
    args = ["--lr=1e-4", "--max_steps", "10", "--packing", "--max-length=64", "--columns={conversation: messages}"]
    overrides = parse_overrides(args, SFTConfig)
    assert overrides == {"lr": "1e-4", "max_steps": "10", "packing": "true", "max_length": "64",
                         "columns": "{conversation: messages}"}
    config = build_config(SFTConfig, None, overrides)
    assert (config.lr, config.max_steps, config.packing, config.max_length) == (1e-4, 10, True, 64)
    assert config.columns == {"conversation": "messages"}


@pytest.mark.parametrize("args, expected", [
    (["--packing"], True),
    (["--packing", "--batch_size=2"], True),
    (["--packing=true"], True),
    (["--packing=false"], False),
    (["--packing=0"], False),
    (["--packing", "false"], False),
    (["--packing", "no", "--batch_size=2"], False),
    ([], False),
])
def test_bool_flags(args, expected):
    config = build_config(SFTConfig, None, parse_overrides(args, SFTConfig))
    assert config.packing is expected


def test_unknown_cli_option_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["--batchsize=4"], SFTConfig)
    assert str(info.value) == "unknown option '--batchsize'; did you mean '--batch_size'?"
    with pytest.raises(ConfigError, match=r"unknown option '--blocksize'; did you mean '--block_size'\?"):
        parse_overrides(["--blocksize", "32"], PretrainConfig)


def test_bad_cli_arguments():
    with pytest.raises(ConfigError, match=r"unexpected argument 'data.jsonl'"):
        parse_overrides(["data.jsonl"], SFTConfig)
    with pytest.raises(ConfigError, match=r"option '--batch_size' needs a value"):
        parse_overrides(["--batch_size"], SFTConfig)
    with pytest.raises(ConfigError, match=r"'batch_size': cannot read 'abc' as int"):
        build_config(SFTConfig, None, parse_overrides(["--batch_size=abc"], SFTConfig))


# --------------------------------------------------------------------------------------------------------------
# the CLI wiring (in process, with the training function replaced)


@pytest.fixture
def captured(monkeypatch):
    """Replace train_sft so `posttrain sft ...` only builds the config."""
    import posttrain.stages.sft

    configs = []
    monkeypatch.setattr(posttrain.stages.sft, "train_sft", lambda config: configs.append(config))
    return configs


def test_cli_config_file_and_overrides(tmp_path, captured):
    path = write_yaml(tmp_path / "c.yaml", {"batch_size": 8, "lr": 0.01, "packing": True})
    assert cli.main(["sft", "--config", str(path), "--batch_size=4", "--packing=false"]) == 0
    assert cli.main(["sft", f"--config={path}"]) == 0
    first, second = captured
    assert (first.batch_size, first.lr, first.packing) == (4, 0.01, False)
    assert (second.batch_size, second.lr, second.packing) == (8, 0.01, True)


def test_cli_errors_in_process(tmp_path, captured, capsys):
    assert cli.main(["sft", "--batchsize=4"]) == 2
    err = capsys.readouterr().err
    assert err == "posttrain sft: error: unknown option '--batchsize'; did you mean '--batch_size'?\n"

    path = write_yaml(tmp_path / "c.yaml", {"batchsize": 4})
    assert cli.main(["sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'batchsize'" in err and "did you mean 'batch_size'?" in err and str(path) in err

    assert cli.main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not captured  # nothing ran


def test_stage_help_lists_every_field(capsys):
    for command, cls in (("sft", SFTConfig), ("pretrain", PretrainConfig)):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--config=FILE" in out
        for f in dataclasses.fields(cls):
            assert f"--{f.name}=VALUE" in out, f.name
            assert f.metadata["help"] in out
    assert cli.main(["sft", "-h"]) == 0
    assert "--batch_size=VALUE  (int, default 16)" in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    for args in ([], ["--help"], ["-h"], ["help"]):
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        for command in ("demo", "world build", "pretrain", "sft", "chat"):
            assert f"\n  {command} " in out, command
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# the real command line (subprocesses)


def test_cli_sft_help_subprocess():
    result = run_cli("sft", "--help")
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(SFTConfig):
        assert f"--{f.name}=" in result.stdout, f.name
    top = run_cli("--help")
    assert top.returncode == 0
    assert all(c in top.stdout for c in ("demo", "world build", "pretrain", "sft", "chat"))


@pytest.mark.parametrize("args, expected", [
    (["--batchsize=4"], "posttrain sft: error: unknown option '--batchsize'; did you mean '--batch_size'?"),
    (["--batch_size=abc"], "posttrain sft: error: 'batch_size': cannot read 'abc' as int"),
])
def test_cli_unknown_key_exits_2_with_one_line(args, expected):
    result = run_cli("sft", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [expected]
    assert result.stdout == ""
