#!/usr/bin/env bash
# All GPU checks in one run (for a lent CUDA machine; writes a summary under ${OUT:-gpu-results}).
# Needs ./setup.sh (or --no-venv) done on that machine; builds its models from configs (no hub).
set -uo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-.venv/bin/python}
out=${OUT:-gpu-results}
mkdir -p "$out"
{
  echo "== nvidia-smi"; nvidia-smi -L
  echo "== pytest -m gpu and the CUDA-sensitive tests"
  "$py" -m pytest -q -m "gpu" tests 2>&1 | tail -5
  "$py" -m pytest -q tests/test_hybrid_thinking.py tests/test_thinking_projection.py tests/test_training.py 2>&1 | tail -3
  echo "== decoding (tiny Qwen2, hidden 256, CUDA)"
  "$py" bench/decoding.py --model tiny-qwen2 --device cuda --new-tokens 128 512 --json "$out/decoding_tiny_cuda.json"
  echo "== training step (tiny Qwen2, CUDA, transformers backend)"
  "$py" bench/train_step.py --model tiny --steps 4 --json "$out/train_step_tiny_cuda.json"
} 2>&1 | tee "$out/summary.txt"
