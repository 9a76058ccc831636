#!/usr/bin/env python3
"""HRPO training on multiple-choice STEM questions (MMLU's auxiliary train split by default).

    python hrpo_mmlu.py                                            # cais/mmlu, config auxiliary_train
    python hrpo_mmlu.py --dataset_path mc_train.jsonl              # a local file in MMLU's, ARC's or OBQA's layout
    python eval_gsm8k.py --checkpoint_path runs/x --dataset_path arc-challenge --greedy   # or mmlu-stem, openbookqa, qasc

hrpo_gsm8k.py with the defaults of HRPO's hrpo_mmlu.py: --task mmlu, 8 completions per prompt
(--num_generations, HRPO's --group_size) and 16 completions per micro-batch
(--per_device_train_batch_size). Every other flag and default is hrpo_gsm8k.py's
(configs/recipes/mmlu_qwen2.5_1.5b.yaml is the same setting as a recipe). HRPO's script reads
one training file merged from several sets; the default data here is MMLU's auxiliary_train.
"""
import sys

from hrpo.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__, task="mmlu", num_generations=8, per_device_train_batch_size=16))
