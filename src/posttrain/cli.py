"""The ``posttrain`` command line. Each training stage takes ``--config file.yaml`` and ``--key=value`` overrides of
its config dataclass; ``posttrain STAGE --help`` lists every key with its type, default and meaning."""

from __future__ import annotations

import sys
from typing import Callable

USAGE = """usage: posttrain COMMAND [options]

The post-training pipeline of the RLHF book, on any local Hugging Face model or the built-in tiny world.

commands:
  demo         the whole pipeline on the tiny world (offline, CPU, minutes); prints a before/after table
  world build  build the tiny world (tokenizer, datasets; --base-model: the pretrained base model) in the cache
               and optionally copy it to a directory
  pretrain     next-token pretraining on plain text (`text` rows)
  sft          instruction fine-tuning on conversations, loss on assistant turns only
  rm           reward models: --loss bt | margin | kcomparisons | plackett_luce | orm | prm
  dpo          direct alignment: --loss dpo | cdpo | robust | ipo | dpo_nll | simpo | orpo | kto
  rl           online RL against a reward or a verifier: --algo reinforce | rloo | ppo | grpo | dr_grpo | gspo |
               cispo (KL to a reference, DAPO options, PPO's critic)
  chat         talk to a model (one-shot --prompt, or interactive)
  serve        an OpenAI-compatible chat-completions server for a local model (127.0.0.1 by default)
  label        AI-feedback preference labels: an LLM judge picks chosen/rejected from completion pairs
  generate     N sampled completions per prompt (KV-cache engine; vLLM on a GPU when installed)
  score        the reward matrix R of generated completions, with any reward (RM, verifier, judge, gold, sums)
  select       rejection-sampling selection: top_per_prompt | top_k, or best-vs-worst preference pairs
  bon          best-of-N at inference: generate, score and keep each prompt's best completion
  rs           rejection-sampling fine-tuning: generate -> score -> select -> SFT, for R rounds
  scaling      inference-time scaling: best-of-n reward, pass@n, maj@n and the best-of-n KL against log n
  merge        merge a LoRA adapter directory (a --lora_r run's out/model) into its base: a plain model directory
  pipeline     a recipe (recipes/NAME.yaml: instructgpt, tulu3, r1, minimal, demo) of stages in order, each one's
               output feeding the next; a rerun skips finished steps and resumes the interrupted one
  eval         evaluate a model on prompts: pass@k, maj@k, win-rate vs a baseline (with a CI), KL to a
               reference, lengths; n-gram decontamination against a training set
  overopt      reward-model over-optimization on the tiny world: gold and proxy reward against sqrt(KL)
               for best-of-n and RL against proxy RMs trained on more or less preference data

Training stages run data-parallel under `accelerate launch` (DDP, FSDP): see docs/scaling.md.

Run `posttrain COMMAND --help` for the options of a command.
"""


def _stage(config_cls, run: Callable, description: str, argv: list[str]) -> int:
    from pathlib import Path

    from posttrain.plumbing.config import build_config, help_lines, parse_overrides

    if "-h" in argv or "--help" in argv:
        print(f"{description}\n\noptions (also accepted as keys of --config file.yaml):\n"
              f"  --config=FILE  YAML file of options; command-line options override it\n{help_lines(config_cls)}")
        return 0
    yaml_path = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            yaml_path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            yaml_path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    overrides = parse_overrides(rest, config_cls)
    config = build_config(config_cls, yaml_path, overrides)
    saved = Path(getattr(config, "out", "")) / "config.yaml"
    if getattr(config, "resume", False) and saved.is_file():
        # --resume continues the run as it was: options not given now keep the values in its config.yaml (so
        # `posttrain sft --resume --out DIR` is enough); the harness checks the ones given against the checkpoint.
        config = build_config(config_cls, yaml_path, overrides, base=saved)
    run(config)
    return 0


def _world(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="posttrain world", description="The tiny world.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the cached world; with DIR, also write tokenizer/, data/ "
                                         "(and base-model/) there")
    build.add_argument("dir", nargs="?", default=None,
                       help="output directory (omit to only fill the cache, $POSTTRAIN_CACHE or ~/.cache/posttrain)")
    build.add_argument("--base-model", "--base_model", action="store_true",
                       help="also pretrain (or reuse the cached) base model")
    args = parser.parse_args(argv)
    from posttrain.stages.world import ensure_world, write_world

    if args.dir is None:
        paths = ensure_world(base_model=args.base_model)
    else:
        paths = write_world(args.dir, base_model=args.base_model)
    print(f"tokenizer: {paths.tokenizer}\ndata:      {paths.data}")
    if args.base_model:
        print(f"base model: {paths.base_model}")
    return 0


def _merge(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="posttrain merge", description="Merge a peft LoRA adapter into its base "
                                     "model and write a plain Hugging Face model directory (with the tokenizer).")
    parser.add_argument("--adapter", required=True, help="the adapter directory (adapter_config.json), e.g. the "
                        "out/model of a run trained with --lora_r")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", default=None, help="the base model directory; default: the adapter config's "
                        "base_model_name_or_path")
    args = parser.parse_args(argv)
    from posttrain.stages.merge import merge_adapter

    print(f"merged model: {merge_adapter(args.adapter, args.out, base=args.base)}")
    return 0


def _dispatch(command: str, argv: list[str]) -> int:
    match command:
        case "merge":
            return _merge(argv)
        case "pipeline":
            from posttrain.stages.pipeline import pipeline_command

            return pipeline_command(argv)
        case "eval":
            from posttrain.stages.eval import EvalConfig, run_eval

            return _stage(EvalConfig, run_eval, "posttrain eval: pass@k, maj@k, win-rate with an interval, KL, "
                          "lengths and n-gram contamination of a model on a prompt set (docs/evaluation.md).", argv)
        case "overopt":
            from posttrain.stages.overopt import OveroptConfig, run_overopt

            return _stage(OveroptConfig, run_overopt, "posttrain overopt: reward-model over-optimization on the "
                          "tiny world (proxy RMs on more or less data; best-of-n and RL against each; gold "
                          "and proxy reward against sqrt(KL)).", argv)
        case "sft":
            from posttrain.stages.sft import SFTConfig, train_sft

            return _stage(SFTConfig, train_sft, "posttrain sft: instruction fine-tuning (loss on assistant turns).\n"
                          "data: `messages` rows (a list of {role, content}), or `prompt`/`completion` rows.", argv)
        case "rm":
            from posttrain.stages.rm import RMConfig, train_rm

            return _stage(RMConfig, train_rm, "posttrain rm: train a reward model (see --loss).\n"
                          "data: bt/margin: prompt/chosen/rejected (+ margin or score_chosen/score_rejected); "
                          "kcomparisons/plackett_luce:\nprompt/completions (best first); orm: prompt/completion/label "
                          "(0/1); prm: prompt/steps/labels (-1/0/1 per step).", argv)
        case "dpo":
            from posttrain.stages.dpo import DPOConfig, train_dpo

            return _stage(DPOConfig, train_dpo, "posttrain dpo: direct alignment from preference pairs (kto: unpaired examples).\n"
                          "data: prompt/chosen/rejected (text or messages), or chosen/rejected conversations sharing "
                          "all but the last turn;\nkto also takes unpaired prompt/completion/label (bool) rows.", argv)
        case "rl":
            from posttrain.stages.rl import RLConfig, train_rl

            return _stage(RLConfig, train_rl, "posttrain rl: online RL against a reward (RLHF) or a verifier (RLVR): "
                          "--algo reinforce | rloo | ppo | grpo | dr_grpo | gspo | cispo.\n"
                          "data: prompt rows (`prompt` or `messages`) plus the columns the reward reads (e.g. "
                          "`answer` for verifier:math).", argv)
        case "pretrain":
            from posttrain.stages.pretrain import PretrainConfig, train_pretrain

            return _stage(PretrainConfig, train_pretrain, "posttrain pretrain: next-token pretraining on text.\n"
                          "data: `text` rows.", argv)
        case "demo":
            from posttrain.stages.demo import DemoConfig, run_demo

            return _stage(DemoConfig, run_demo, "posttrain demo: the pipeline on the tiny world.", argv)
        case "chat":
            from posttrain.stages.chat import ChatConfig, run_chat

            return _stage(ChatConfig, run_chat, "posttrain chat: talk to a model with its chat template.", argv)
        case "serve":
            from posttrain.stages.serve import ServeConfig, run_serve

            return _stage(ServeConfig, run_serve, "posttrain serve: an OpenAI-compatible API for a local model.", argv)
        case "label":
            from posttrain.stages.label import LabelConfig, run_label

            return _stage(LabelConfig, run_label, "posttrain label: preference labels from an LLM judge.", argv)
        case "generate":
            from posttrain.stages.bestofn import GenerateConfig, run_generate

            return _stage(GenerateConfig, run_generate, "posttrain generate: N completions per prompt.", argv)
        case "score":
            from posttrain.stages.bestofn import ScoreConfig, run_score

            return _stage(ScoreConfig, run_score, "posttrain score: the reward matrix of generated completions.", argv)
        case "select":
            from posttrain.stages.bestofn import SelectConfig, run_select

            return _stage(SelectConfig, run_select, "posttrain select: rejection-sampling selection rules.", argv)
        case "bon":
            from posttrain.stages.bestofn import BonConfig, run_bon

            return _stage(BonConfig, run_bon, "posttrain bon: best-of-N sampling with a reward.", argv)
        case "rs":
            from posttrain.stages.rs import RSConfig, run_rs

            return _stage(RSConfig, run_rs, "posttrain rs: rejection-sampling fine-tuning.", argv)
        case "scaling":
            from posttrain.stages.scaling import ScalingConfig, run_scaling

            return _stage(ScalingConfig, run_scaling, "posttrain scaling: the test-time-scaling plot.", argv)
        case "world":
            return _world(argv)
        case _:
            print(f"posttrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        from posttrain import __version__

        print(__version__)
        return 0
    from transformers.utils import logging as hf_logging

    from posttrain.data import DataError, RenderError, TemplateNotPrefixStableError
    from posttrain.plumbing.checkpoint import CheckpointError
    from posttrain.plumbing.config import ConfigError
    from posttrain.plumbing.harness import NonFiniteError

    hf_logging.disable_progress_bar()  # our own progress bars say what is going on

    try:
        return _dispatch(argv[0], argv[1:])
    except (ConfigError, DataError, RenderError, TemplateNotPrefixStableError, FileNotFoundError, FileExistsError,
            ValueError) as err:
        print(f"posttrain {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError, ChildProcessError) as err:  # the run stopped; what is on disk is intact
        print(f"posttrain {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
