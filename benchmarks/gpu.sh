#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (tests never need one). Prints one table (benchmarks/gpu.py):
# bf16 matmul rate, SFT / DPO tokens/s and MFU on a 0.5B-shaped Qwen2, a GRPO step with the built-in engine and
# with vLLM, TRL on the same work where installed; appends it to benchmarks/results/gpu.jsonl.
#   make setup && bash benchmarks/gpu.sh                      # add `pip install vllm trl` for those rows
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch, transformers, accelerate, peft
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}")
PYEOF
"$PY" benchmarks/gpu.py "$@"
