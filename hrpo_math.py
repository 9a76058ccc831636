#!/usr/bin/env python3
"""HRPO training on MATH (competition mathematics), answers graded by mathematical equivalence.

    python hrpo_math.py                                            # EleutherAI/hendrycks_math, train split
    python hrpo_math.py --dataset_path MATH/ --output_dir runs/m   # a local MATH folder (MATH/train/<subject>/<n>.json)
    python eval_gsm8k.py --checkpoint_path runs/m --dataset_path math500 --greedy

hrpo_gsm8k.py with the math task's defaults: --task math and longer completions
(--max_completion_length 2048); every other flag and default is hrpo_gsm8k.py's.
"""
import sys

from hrpo.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__, task="math", max_completion_length=2048))
