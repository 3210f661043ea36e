"""posttrain against another checkout of itself, interleaved, on a shared workload: is a change any slower?

Runs ``OTHER/benchmarks/STAGE.py --one`` with OTHER's source, then this checkout's, in fresh processes, repeated
(A B A B ...), and prints both with the ratio of train tokens/s. Usage (e.g. against the last release in ../baseline):

    python benchmarks/revisions.py --other ../baseline --stage sft --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_SHARED, ENV, ROOT, ensure_workload, table


def run_once(checkout: Path, stage: str, shared: Path, work: Path, tag: str) -> dict | None:
    env = {**os.environ, **ENV, "PYTHONPATH": str(checkout / "src")}
    proc = subprocess.run([sys.executable, str(checkout / "benchmarks" / f"{stage}.py"), "--shared", str(shared),
                           "--work", str(work), "--one", tag], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED ({checkout}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="root of the other posttrain checkout")
    parser.add_argument("--stage", choices=("sft", "rm", "dpo"), default="sft")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work")
    args = parser.parse_args()
    ensure_workload(args.shared, args.work)
    rows = []
    for rep in range(1, args.repeats + 1):
        for name, checkout in (("other", args.other.resolve()), ("this", ROOT)):
            result = run_once(checkout, args.stage, args.shared, args.work, f"{name}{rep}")
            if result:
                rows.append(result)
    print(table(rows))
    speed = {name: [r["train_tokens_per_s"] for r in rows if r["tag"].startswith(name)] for name in ("other", "this")}
    if speed["other"] and speed["this"]:
        print(f"\ntrain tok/s this / other = {statistics.mean(speed['this']) / statistics.mean(speed['other']):.3f}")


if __name__ == "__main__":
    main()
