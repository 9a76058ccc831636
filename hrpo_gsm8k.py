#!/usr/bin/env python3
"""GRPO training with HRPO hybrid latent reasoning and the thinking projection (GSM8K by default).

    python hrpo_gsm8k.py --lr_thinking_projection 1e-4                 # HRPO's recipe, Qwen2.5-1.5B
    python hrpo_gsm8k.py --config configs/recipes/cpu_demo.yaml         # a recipe; flags after it win
    python hrpo_gsm8k.py --model_name ./my-model --dataset_path train.jsonl --output_dir runs/x
    python hrpo_gsm8k.py ... --resume                                   # continue from the last checkpoint
    python hrpo_gsm8k.py ... --hybrid_thinking off                      # plain GRPO, same everything else
    python hrpo_gsm8k.py --task arith --eval_samples 64 --eval_on_start # offline task, held-out accuracy

Defaults are HRPO's published recipe; this project adds --lr_thinking_projection and the
projection's latent source and options. Every option of TRL's GRPOConfig and ModelConfig is a
flag and a YAML key; HRPO's flag names (--lr, --group_size, --lora_rank, --model_name) are
aliases of TRL's. Every input is checked before the model loads. The code is hrpo/train.py
(python -m hrpo.train, any task).
"""
import sys

from hrpo.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__, task="gsm8k"))
