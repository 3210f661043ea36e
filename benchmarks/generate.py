"""Generation benchmark: posttrain's engine vs a naive loop vs the generation inside TRL's GRPOTrainer.

Shared GRPO workload (../shared/bench): the tiny Llama (5.26 M params), `rl.jsonl` prompts, 8 samples per prompt,
32 new tokens at most, temperature 1, fp32, 2 threads. Generated tokens per second of generation time:

  posttrain engine, GRPO-sized calls   2 prompts x 8 samples per call (what GRPOTrainer generates per step)
  posttrain engine, large batches      64 sequences per call (prompts sorted by length, left-padded)
  naive loop                           one `model.generate` per prompt and sample (batch of 1)
  TRL GRPOTrainer                      its generated tokens / time inside `generate` (the shared runner's diag),
                                       in a fresh process, same model and prompts

Usage: python benchmarks/generate.py [--prompts 32] [--skip-trl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import DEFAULT_SHARED, HERE, ensure_workload, run_subprocess


def measure_posttrain(model_dir: Path, data: Path, prompts: int) -> list[tuple[str, int, float]]:
    import torch

    from posttrain.data.render import render_prompt
    from posttrain.models.generation import HFEngine, SamplingParams

    torch.set_num_threads(2)
    rows = [json.loads(line) for line in (data / "rl.jsonl").read_text().splitlines()][:prompts]
    conversations = [r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
                     for r in rows]
    engine = HFEngine.from_path(model_dir, device="cpu")
    params = SamplingParams(n=8, max_new_tokens=32, temperature=1.0, seed=0)
    results = []
    engine.generate(conversations[:2], params)  # warm-up
    for name, batch in (("posttrain engine, 2 prompts x 8 per call (GRPO step size)", 16),
                        ("posttrain engine, 64 sequences per call", 64)):
        engine.batch_size = batch
        started = time.perf_counter()
        out = engine.generate(conversations, params)
        seconds = time.perf_counter() - started
        results.append((name, sum(len(c.token_ids) for s in out for c in s), seconds))

    model, tokenizer = engine.model, engine.tokenizer
    from transformers import GenerationConfig

    from posttrain.data.render import end_of_turn_token_ids

    config = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=1.0, top_p=None, top_k=None,
                              eos_token_id=end_of_turn_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for messages in conversations[: max(4, prompts // 4)]:  # a quarter of the prompts: it is slow
            ids = torch.tensor([render_prompt(tokenizer, messages)])
            for _ in range(8):
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                tokens += output.shape[1] - ids.shape[1]
    results.append(("naive loop: one model.generate per sample", tokens, time.perf_counter() - started))
    return results


def measure_trl(shared: Path, model: Path, data: Path) -> tuple[str, int, float] | None:
    result = run_subprocess([sys.executable, str(shared / "trl_bench.py"), "grpo", "--model", str(model), "--data",
                             str(data), "--tag", "generate-bench"], HERE / "results" / "generate.jsonl")
    if result is None:
        return None
    tokens = result["counts_in_window"]["generated_tokens"]
    return ("TRL GRPOTrainer generation (16 sequences per call)", tokens, result["diag_in_window"]["generate_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--work", type=Path, default=HERE.parent / "bench-work")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    model, data = ensure_workload(args.shared, args.work)
    rows = measure_posttrain(model, data, args.prompts)
    if not args.skip_trl and (trl := measure_trl(args.shared, model, data)):
        rows.append(trl)
    print("\n| engine | generated tokens | seconds | generated tok/s |\n|---|---|---|---|")
    for name, tokens, seconds in rows:
        print(f"| {name} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} |")


if __name__ == "__main__":
    main()
