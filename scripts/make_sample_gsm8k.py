#!/usr/bin/env python3
"""Write templated grade-school problems in GSM8K's format (question, answer "... #### N").

    python scripts/make_sample_gsm8k.py --out data/sample --train 64 --test 16
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hrpo.data import make_sample_problems, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=64, help="number of training problems")
    parser.add_argument("--test", type=int, default=16, help="number of test problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_jsonl(make_sample_problems(args.train, seed=args.seed), args.out / "train.jsonl")
    write_jsonl(make_sample_problems(args.test, seed=args.seed + 1), args.out / "test.jsonl")
    print(f"wrote {args.out / 'train.jsonl'} ({args.train}) and {args.out / 'test.jsonl'} ({args.test})")


if __name__ == "__main__":
    main()
