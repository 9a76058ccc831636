#!/usr/bin/env python3
"""HRPO training on MATH (competition mathematics), answers graded by mathematical equivalence.

    python hrpo_math.py                                            # EleutherAI/hendrycks_math, train split
    python hrpo_math.py --dataset_path MATH/ --output_dir runs/m   # a local MATH folder (MATH/train/<subject>/<n>.json)
    python eval_gsm8k.py --checkpoint_path runs/m --dataset_path math500 --greedy

hrpo_gsm8k.py with the defaults of HRPO's hrpo_math.py: --task math, 8 completions per prompt
(--num_generations, HRPO's --group_size) and 16 completions per micro-batch
(--per_device_train_batch_size); completions up to 1024 tokens. Every other flag and default is
hrpo_gsm8k.py's (configs/recipes/math_qwen2.5_1.5b.yaml is the same setting as a recipe).
"""
import sys

from hrpo.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__, task="math", num_generations=8, per_device_train_batch_size=16))
