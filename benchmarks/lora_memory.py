"""Peak memory of full fine-tuning against LoRA for DPO and GRPO, where LoRA's reference is the adapter-disabled
policy instead of a second copy of the model (docs/scaling.md).

Each configuration runs 2 optimizer steps in a fresh process on the CPU and reports its peak resident memory
(VmHWM) and its trainable parameters: full fine-tuning, LoRA with the reference loaded as a second copy
(``--ref_model`` = the same directory), and LoRA with the reference as the adapter-disabled policy (the default). The model is a randomly initialised Qwen2 of the 0.5B class's shape (hidden
896, 24 layers, 14 heads, 2 KV heads, MLP 4864) with the tiny world's tokenizer, so its small vocabulary leaves
~0.36 B parameters. DPO runs with a live reference (--precompute_ref=false: the reference is in memory during
training, as in TRL's default), GRPO with a KL penalty (beta 0.04).

    .venv/bin/python benchmarks/lora_memory.py            # prints the table, appends to benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ENV  # noqa: E402

SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, max_position_embeddings=1024, tie_word_embeddings=True)


def make_model(out: Path) -> Path:
    """The 0.5B-shaped Qwen2 with the tiny world's tokenizer (built once)."""
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import load_tokenizer
    from posttrain.stages.world import ensure_world

    tokenizer = load_tokenizer(ensure_world(base_model=False, progress=False).tokenizer)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def one(args: list[str]) -> None:
    """Run one CLI command in this process and print its peak memory as the last JSON line."""
    from posttrain import cli

    code = cli.main(args)
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--out=")))
    trainable = None
    if (run / "model" / "adapter_model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
            trainable = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    print(json.dumps({"rc": code, "peak_gib": peak_kb / 2**20, "trainable": trainable}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE.parent / "bench-work" / "lora-memory")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "lora_memory.jsonl")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one)
    from posttrain.stages.world import ensure_world

    model = make_model(args.work / "qwen2-0.5b-shape")
    data = ensure_world(base_model=False, progress=False).data
    common = [f"--model={model}", "--max_steps=2", "--progress=false", "--device=cpu", "--save_every=0",
              "--warmup_steps=0"]
    stages = {
        "dpo": ["dpo", f"--data={data / 'preference_heldout.jsonl'}", "--batch_size=2", "--precompute_ref=false"],
        "grpo": ["rl", f"--data={data / 'rl_train.jsonl'}", "--reward=gold", "--batch_size=2", "--group_size=2",
                 "--max_new_tokens=16", "--beta=0.04"],
    }
    rows = []
    for stage, stage_args in stages.items():
        configs = (("full fine-tuning", []),
                   ("LoRA r=16, reference = a second copy", ["--lora_r=16", f"--ref_model={model}"]),
                   ("LoRA r=16, reference = adapters disabled", ["--lora_r=16"]))
        for k, (label, extra) in enumerate(configs):
            out = args.work / "runs" / f"{stage}-{k}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            command = [sys.executable, __file__, "--one", *stage_args, *common, *extra, f"--out={out}"]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ENV})
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines or json.loads(lines[-1])["rc"]:
                sys.exit(f"FAILED: {' '.join(command)}\n{done.stderr[-3000:]}")
            result = {"stage": stage, "config": label, **json.loads(lines[-1])}
            rows.append(result)
            print(json.dumps(result), flush=True)
    full = {r["stage"]: r["peak_gib"] for r in rows if r["config"] == "full fine-tuning"}
    for r in rows:
        r["vs full"] = f"{r['peak_gib'] / full[r['stage']]:.2f}x"
        r["peak_gib"] = round(r["peak_gib"], 2)
    print("| stage | config | trainable parameters | peak RSS GiB | vs full |\n|---|---|---|---|---|")
    for r in rows:
        trainable = "all" if r["trainable"] is None else f"{r['trainable']:,}"
        print(f"| {r['stage']} | {r['config']} | {trainable} | {r['peak_gib']:.2f} | {r['vs full']} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
