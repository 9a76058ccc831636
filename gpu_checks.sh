#!/usr/bin/env bash
# All GPU checks in one run, for a CUDA machine (also an air-gapped one): writes a summary and
# JSON under ${OUT:-gpu-results}. Models are built from configs (no hub).
# Either ./setup.sh was done on that machine, or .offline-bundle/ came along
# (scripts/prepare_offline_bundle.sh: the patched fork sources and the missing wheels), which is
# installed into /tmp here, on top of the machine's own torch / transformers / peft / triton.
set -uo pipefail
cd "$(dirname "$0")"
source scripts/gpu_env.sh || exit 1
out=${OUT:-gpu-results}
work=$(mktemp -d)
mkdir -p "$out"
{
  echo "== nvidia-smi"; nvidia-smi -L
  for arch in llama qwen2; do
    echo "== unsloth fast paths vs the transformers fork, $arch, hidden 1024, bf16 (real Triton kernels)"
    "$py" -m bench.unsloth_gpu --arch "$arch" --source projection --json "$out/unsloth_fast_path_$arch.json" \
      2>&1 | tail -25
  done
  echo "== hrpo_gsm8k.py: 3 GRPO steps through unsloth (Qwen2, hidden 1024), peak memory"
  "$py" -m bench.unsloth_gpu --arch qwen2 --build-only "$work/model"
  "$py" -m scripts.make_arith_data --out "$work/data" --difficulty 3
  "$py" -m scripts.gpu_grpo_steps "$work" "$out" 2>&1 | tail -25
  echo "== sharded training on this GPU (one process): ZeRO-3 (when deepspeed is installed) and FSDP 2, 2 steps"
  # The whole model is sharded even with one process (ZeRO-3 partitions every parameter and
  # gathers it per module); checks: the thinking modules gathered for sampling and the replay
  # (on-policy), saved whole (full shapes, float32), the checkpoint's logits in one process.
  for cfg in zero3 fsdp; do
    if [ "$cfg" = zero3 ] && ! "$py" -c "import deepspeed" 2>/dev/null; then
      echo "SKIP zero3: deepspeed is not installed (pip install deepspeed, or add its wheel to the bundle)"; continue
    fi
    "$py" -m accelerate.commands.launch --config_file "configs/$cfg.yaml" --num_processes 1 \
      -m testing.run_training --record "$work/rec-$cfg" -- --model_name "$work/model" \
      --dataset_path "$work/data/train.jsonl" --output_dir "$work/run-$cfg" --backend transformers \
      --max_steps 2 --save_steps 2 --group_size 4 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
      --max_completion_length 32 --thinking_latent_source projection --warmup_ratio 0 --lr 1e-3 \
      --lr_residual_gate 1e-3 --lr_residual_Lambda 1e-3 --lr_thinking_projection 1e-3 2>&1 | tail -4
    expect=$([ "$cfg" = zero3 ] && echo DEEPSPEED || echo FSDP)
    "$py" -m scripts.check_scaled_run "$work/run-$cfg" "$work/rec-$cfg" --expect "$expect" --bf16 --replay-bound 1.0 --logits-bound 0.05 \
      --json "$out/sharded_$cfg.json" 2>&1 | tail -14
    # the dtypes the thinking modules' forward read in the last step (FSDP2: float32; DeepSpeed bf16: bfloat16,
    # docs/scaling.md "Mixed precision")
    "$py" -c "import sys, torch; r = torch.load(sys.argv[1], weights_only=False); print('$cfg: thinking forward read', sorted({p['dtype'] for m in r['thinking_forward'].values() for p in m.values()}))" \
      "$work/rec-$cfg/rank0-step2.pt" 2>&1 | tail -1
  done
  echo "== FSDP 2 in bf16 through accelerate: the thinking modules' forward reads float32 (their own float32 unit)"
  "$py" -m pytest -q -m gpu tests/test_sharded_precision.py 2>&1 | tail -3
  echo "== pytest -m gpu, and the suites whose numbers CUDA could change"
  "$py" -m pytest -q -m gpu tests --deselect tests/test_sharded_precision.py 2>&1 | tail -5
  timeout 240 "$py" -m pytest -q -x tests/test_hybrid_thinking.py tests/test_thinking_projection.py tests/test_training.py \
    tests/test_unsloth_fast_path.py tests/test_unsloth_grpo.py 2>&1 | tail -3
  echo "== hybrid rollouts through CUDA graphs (static cache, the compiled decoding step)"
  # expected: compiled faster than eager; hybrid compiled <= 1.05x plain compiled for projection and
  # embedding+top64, <= 1.15x for embedding; 1 host sync per token on the compiled path, as plain sampling
  "$py" -m bench.decoding --model tiny-qwen2 --device cuda --batch 8 --new-tokens 256 --compile \
    --json "$out/decoding_compiled_cuda.json" 2>&1 | tail -8
  "$py" -m pytest -q tests/test_compiled_rollouts.py 2>&1 | tail -3
  echo "== decoding and training-step benches (transformers backend, tiny Qwen2)"
  "$py" -m bench.decoding --model tiny-qwen2 --device cuda --new-tokens 128 512 --json "$out/decoding_tiny_cuda.json"
  "$py" -m bench.train_step --model tiny --steps 4 --json "$out/train_step_tiny_cuda.json"
  if "$py" -c "import vllm" 2>/dev/null; then
    echo "== vLLM with the hrpo plugin: greedy parity, noise keys, training on its rollouts; rollout bench"
    "$py" -m pytest -q -s tests/test_vllm_plugin.py tests/test_vllm_rollouts.py 2>&1 \
      | grep -E "compared|checked|gaps|unmixed|passed|failed|Error" | tail -24
    "$py" -m bench.engine_rollouts --model tiny-qwen2 --prompts 8 32 --new-tokens 256 --hf \
      --json "$out/engine_rollouts_tiny_cuda.json" 2>&1 | tail -22
  else
    echo "SKIP vLLM: not installed (pip install -r requirements-vllm-cuda.txt)"
  fi
} 2>&1 | tee "$out/summary.txt"
rm -rf "$work"
