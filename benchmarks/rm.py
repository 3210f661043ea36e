"""Reward-model benchmarks.

1. Training throughput: posttrain `rm --loss bt` vs TRL's RewardTrainer on the shared CPU workload `rm`
   (../shared/bench: tiny Llama as LlamaForSequenceClassification, 8 pairs = 16 sequences per step in file order,
   max length 256, 40 steps, AdamW lr 1e-4 constant, grad-clip 1, fp32, 2 threads), measured with the shared
   harness (benchlib). Interleaved runs, fresh process each. Target: >= 1.4x TRL's train tokens/s.
2. K-wise forward saving: one step of `kcomparisons` (each of the K completions of a ranking forwarded once) vs
   the same loss computed the pairwise way (every pair's chosen and rejected forwarded: 2 * C(K,2) sequences),
   on the tiny world's K=4 rankings.
3. Length-sorted scoring: padded positions and time of scoring completions in padded batches in file order vs
   sorted by length (the book's tip), and posttrain's scorer (which sorts).

Usage: python benchmarks/rm.py [--repeats 2] [--skip-trl] [--only train|kwise|scoring]
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_workload, interleaved_runs, ratio_line, table, training_bench_parser


def run_posttrain_once(shared: Path, model: Path, data: Path, tag: str) -> dict:
    sys.path.insert(0, str(shared))
    import benchlib  # noqa: E402
    from workloads import WORKLOADS  # noqa: E402

    benchlib.setup_threads(2)
    rss_after_import = benchlib.peak_rss_mb()
    from posttrain.stages.rm import RMConfig, train_rm

    wl = WORKLOADS["rm"]
    counter = benchlib.TokenCounter()
    timer = benchlib.StepTimer(counter)

    def on_step_end(step: int, info: dict) -> None:
        counter.c["grad_tokens"] += info["tokens"]
        timer.mark()

    with tempfile.TemporaryDirectory() as out:
        config = RMConfig(loss="bt", model=str(model), data=str(data / wl["data"]), out=out,
                          max_length=wl["max_length"], batch_size=wl["batch_size"], max_steps=wl["steps"],
                          lr=wl["lr"], lr_schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                          shuffle=False, seed=0, precision="fp32", device="cpu", save_every=0, log_every=10,
                          progress=False)
        started = time.perf_counter()
        timer.start()
        train_rm(config, on_step_end=on_step_end)
        train_s = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"lib": "posttrain", "stage": "rm", "tag": tag, "workload": wl, **timer.summary(warmup=wl["warmup"]),
            "peak_rss_mb": benchlib.peak_rss_mb(), "peak_rss_after_imports_mb": rss_after_import, "train_s": train_s,
            "log_history": [{"step": r["step"], "loss": r["train/loss"], "accuracy": r.get("rm/accuracy")}
                            for r in records if "train/loss" in r],
            "env": benchlib.env_info()}


def kwise_saving(steps: int = 6) -> None:
    """Time per step: K-wise (each completion once) vs pairwise expansion (2 per pair), same rankings."""
    import torch

    from posttrain.models import load_tokenizer, use_segment_attention
    from posttrain.stages.rm import RMConfig, RMLoss, _load_model, group_loss, load_groups
    from posttrain.stages.world import ensure_world

    torch.set_num_threads(2)
    paths = ensure_world(base_model=True)
    tokenizer = load_tokenizer(paths.base_model)
    config = RMConfig(loss="kcomparisons", max_length=512)
    groups, _ = load_groups(paths.data / "rankings_train.jsonl", tokenizer, config)
    model = _load_model(str(paths.base_model), RMLoss.kcomparisons, tokenizer, "cpu")
    use_segment_attention(model)
    pad = tokenizer.pad_token_id
    batch = 8
    rows = []
    for name in ("k-wise (each completion once)", "pairwise expansion"):
        times, sequences = [], 0
        for step in range(steps):
            chunk = groups[step * batch : (step + 1) * batch]
            started = time.perf_counter()
            if name.startswith("k-wise"):
                loss, _, _ = group_loss(model, chunk, RMLoss.kcomparisons, pad, "cpu")
                sequences = sum(len(g.examples) for g in chunk)
            else:  # every pair (i, j) of every ranking as its own chosen/rejected forward
                from posttrain.stages.rm import Group

                pairs = [Group([g.examples[i], g.examples[j]]) for g in chunk
                         for i, j in itertools.combinations(range(len(g.examples)), 2)]
                loss, _, _ = group_loss(model, pairs, RMLoss.bt, pad, "cpu")
                sequences = 2 * len(pairs)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        rows.append((name, sequences, statistics.median(times[1:])))
    print("\n| K=4 rankings, 8 per step | sequences forwarded / step | s/step (median) |\n|---|---|---|")
    for name, sequences, seconds in rows:
        print(f"| {name} | {sequences} | {seconds:.3f} |")
    print(f"\nforward saving: {rows[1][1] / rows[0][1]:.1f}x fewer sequences, {rows[1][2] / rows[0][2]:.2f}x faster")


def scoring_saving(limit: int = 512, batch_size: int = 32) -> None:
    """Padded batches in file order vs length-sorted, and posttrain's padding-free scorer."""
    import torch

    from posttrain.rewards import ScalarRewardModel, conversation
    from posttrain.data.render import render_conversation
    from posttrain.stages.world import ensure_world

    torch.set_num_threads(2)
    paths = ensure_world(base_model=True)
    with tempfile.TemporaryDirectory() as out:
        from posttrain.stages.rm import RMConfig, train_rm

        model_dir = train_rm(RMConfig(loss="bt", out=out, max_steps=1, progress=False, device="cpu", save_every=0))
        scorer = ScalarRewardModel(model_dir, device="cpu")
        rows = [json.loads(line) for line in (paths.data / "rankings_train.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows for _ in r["completions"]][:limit]
        completions = [c for r in rows for c in r["completions"]][:limit]
        encoded = [render_conversation(scorer.tokenizer, conversation(p, c), "final_turn_only")[0]
                   for p, c in zip(prompts, completions)]
        pad = scorer.tokenizer.pad_token_id
        model = scorer.model

        def padded(order: list[int]) -> tuple[int, float]:
            model.config._attn_implementation = "sdpa"
            positions, started = 0, time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(order), batch_size):
                    chunk = [encoded[i] for i in order[s : s + batch_size]]
                    width = max(len(x) for x in chunk)
                    ids = torch.full((len(chunk), width), pad)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for b, x in enumerate(chunk):
                        ids[b, : len(x)] = torch.tensor(x)
                        mask[b, : len(x)] = 1
                    model(input_ids=ids, attention_mask=mask)
                    positions += ids.numel()
            return positions, time.perf_counter() - started

        real = sum(len(x) for x in encoded)
        file_order = padded(list(range(len(encoded))))
        sorted_order = padded(sorted(range(len(encoded)), key=lambda i: -len(encoded[i])))
        started = time.perf_counter()
        scorer(prompts, completions)
        flat_s = time.perf_counter() - started
    print(f"\n| scoring {len(encoded)} completions ({real} real tokens) | positions computed | seconds |\n|---|---|---|")
    print(f"| padded batches of {batch_size}, file order | {file_order[0]} | {file_order[1]:.2f} |")
    print(f"| padded batches of {batch_size}, sorted by length | {sorted_order[0]} | {sorted_order[1]:.2f} |")
    print(f"| posttrain's scorer (sorted, batches of <= 8192 padded tokens) | ~{sorted_order[0]} | {flat_s:.2f} |")


def main() -> None:
    parser = training_bench_parser(__doc__, "rm")
    parser.add_argument("--only", choices=("train", "kwise", "scoring"))
    args = parser.parse_args()
    if args.one:
        model, data = ensure_workload(args.shared, args.work)
        print(json.dumps(run_posttrain_once(args.shared, model, data, args.one)))
        return
    if args.only in (None, "train"):
        model, data = ensure_workload(args.shared, args.work)
        rows = interleaved_runs(__file__, "rm", args.shared, args.work, model, data, repeats=args.repeats,
                                skip_trl=args.skip_trl, results=args.results)
        print(table(rows))
        print("\n" + ratio_line(rows, target=1.4))
    if args.only in (None, "kwise"):
        kwise_saving()
    if args.only in (None, "scoring"):
        scoring_saving()


if __name__ == "__main__":
    main()
