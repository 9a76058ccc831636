#!/usr/bin/env python3
"""Write the arith task's generated problems as GSM8K-format files (question, answer "... #### N").

    python -m scripts.make_arith_data --out data/arith --difficulty 2
    python hrpo_gsm8k.py --task arith --dataset_path data/arith/train.jsonl ...

The files hold exactly what `--dataset_path generated:D` generates in memory: the train
split (2,000) and the test split (200), no test question in train.
"""
import argparse
from pathlib import Path

from hrpo.data import write_jsonl
from hrpo.tasks.arith import CALIBRATED_DIFFICULTY, DIFFICULTIES, SPLIT_SIZES, generated_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/arith"), help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--difficulty", type=int, default=CALIBRATED_DIFFICULTY, choices=DIFFICULTIES)
    args = parser.parse_args()
    for split in SPLIT_SIZES:
        path = write_jsonl(generated_split(split, args.difficulty), args.out / f"{split}.jsonl")
        print(f"wrote {path} ({SPLIT_SIZES[split]} problems, difficulty {args.difficulty})")


if __name__ == "__main__":
    main()
