#!/usr/bin/env python3
"""HRPO training on multiple-choice STEM questions (MMLU's auxiliary train split by default).

    python hrpo_mmlu.py                                            # cais/mmlu, config auxiliary_train
    python hrpo_mmlu.py --dataset_path mc_train.jsonl              # a local file in MMLU's, ARC's or OBQA's layout
    python eval_gsm8k.py --checkpoint_path runs/x --dataset_path arc-challenge --greedy   # or mmlu-stem, openbookqa, qasc

hrpo_gsm8k.py with the mmlu task's defaults (--task mmlu); every other flag and default is
hrpo_gsm8k.py's.
"""
import sys

from hrpo.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__, task="mmlu"))
