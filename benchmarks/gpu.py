"""The GPU check (run by benchmarks/gpu.sh on a machine with a CUDA GPU): one table of

* the measured bf16 matmul rate (the MFU denominator: 8192^3 matmuls, best of 10),
* SFT and DPO training tokens/s and MFU on a randomly initialised Qwen2 of the 0.5B class's shape (hidden 896,
  24 layers, 14 heads, 2 KV heads, MLP 4864, Qwen2's 151,936-token vocabulary), bf16 autocast, with and without
  gradient checkpointing, and with --compile,
* seconds per GRPO step with the built-in engine and with vLLM (where vllm imports),
* TRL's trainers on the same model and data where trl imports (../shared/bench/trl_bench.py).

MFU = tokens/s x 6 N / matmul rate, N the parameters outside the embedding (a lower bound: attention's own FLOPs
are left out). Tests never depend on a GPU; the numbers go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "bench"
SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, max_position_embeddings=4096, tie_word_embeddings=True)
VOCAB = 151_936


def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12)
    return best


def make_model(out: Path) -> tuple[Path, int]:
    """The 0.5B-shaped Qwen2 with a byte-level tokenizer of the tiny world's family grown to Qwen2's vocabulary
    size (random weights: speed only); returns (dir, parameters outside the embedding)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import load_tokenizer
    from posttrain.stages.world import ensure_world

    tokenizer = load_tokenizer(ensure_world(base_model=False, progress=False).tokenizer)
    config = Qwen2Config(vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPE)
    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    with torch.device("meta"):
        shape_only = Qwen2ForCausalLM(config)
    return out, sum(p.numel() for name, p in shape_only.named_parameters() if "embed_tokens" not in name)


def posttrain_run(args: list[str], out: Path) -> dict:
    """One CLI run in a fresh process; the median train/tokens_per_s and step time after the first 3 steps."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", *args, f"--out={out}", "--progress=false",
                           "--log_every=1", "--save_every=0"], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["step"] > 3 and "train/tokens_per_s" in r]
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steady) if steady else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE.parent / "bench-work" / "gpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "gpu.jsonl")
    args = parser.parse_args()
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    from posttrain.stages.world import ensure_world

    peak = matmul_tflops()
    model, n_params = make_model(args.work / "qwen2-0.5b-shape")
    data = ensure_world(base_model=False, progress=False).data
    common = [f"--model={model}", f"--max_steps={args.steps}", "--precision=bf16", "--warmup_steps=0", "--device=cuda"]
    runs = {
        "sft": ["sft", f"--data={data / 'sft_train.jsonl'}", "--batch_size=64", "--max_length=512"],
        "sft +grad ckpt": ["sft", f"--data={data / 'sft_train.jsonl'}", "--batch_size=64", "--gradient_checkpointing"],
        "sft +compile": ["sft", f"--data={data / 'sft_train.jsonl'}", "--batch_size=64", "--compile"],
        "dpo": ["dpo", f"--data={data / 'preference_train.jsonl'}", "--batch_size=32"],
        "grpo hf engine": ["rl", f"--data={data / 'rl_train.jsonl'}", "--reward=gold", "--batch_size=16",
                           "--group_size=8", "--max_new_tokens=128", "--rollout_engine=hf"],
    }
    if importlib.util.find_spec("vllm") is not None:
        runs["grpo vllm engine"] = [*runs["grpo hf engine"][:-1], "--rollout_engine=vllm", "--tis_cap=2"]
    rows = [{"run": "bf16 matmul 8192^3", "value": f"{peak:.0f} TFLOP/s"}]
    for name, stage_args in runs.items():
        started = time.perf_counter()
        result = posttrain_run([*stage_args, *common], args.work / "runs" / name.replace(" ", "-"))
        seconds = time.perf_counter() - started
        tps = result.get("tokens_per_s")
        mfu = f"{tps * 6 * n_params / (peak * 1e12):.1%}" if tps and not name.startswith("grpo") else "-"
        rows.append({"run": f"posttrain {name}", "value": result.get("error") or f"{tps:,.0f} tok/s",
                     "mfu": mfu, "wall_s": round(seconds, 1)})
    if importlib.util.find_spec("trl") is not None and (SHARED / "trl_bench.py").exists():
        for stage in ("sft", "dpo", "grpo"):
            done = subprocess.run([sys.executable, str(SHARED / "trl_bench.py"), stage, "--model", str(model),
                                   "--data", str(args.work / "trl-data"), "--bf16", "--steps", str(args.steps)],
                                  capture_output=True, text=True)
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
            rows.append({"run": f"TRL {stage}", "value": json.loads(line).get("train_tokens_per_s") if line else
                         (done.stderr.strip().splitlines() or ["failed"])[-1][:80]})
    print(f"device: {torch.cuda.get_device_name()}; model: Qwen2 0.5B shape, {n_params / 1e6:.0f} M parameters "
          "outside the embedding")
    print("| run | value | MFU | wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['value']} | {r.get('mfu', '-')} | {r.get('wall_s', '-')} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
