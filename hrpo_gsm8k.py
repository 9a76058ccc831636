#!/usr/bin/env python3
"""GRPO training on GSM8K with HRPO hybrid latent reasoning (the user's main job).

Not built yet: the trainer, rewards, evaluation and the offline demo are the open issue
"GRPO training on GSM8K". Until it lands this entry point says so and exits non-zero,
rather than pretending to train.
"""
import sys

MISSING = [
    "patch.py (optimizer parameter groups with lr_thinking_projection)",
    "the HRPO trainer on TRL 1.15 GRPOTrainer (rollouts through hybrid sampling, replay loss)",
    "GSM8K rewards and answer normalisation, eval_gsm8k.py, the offline SmolLM2 demo",
]


def main() -> int:
    print("hrpo_gsm8k.py: training is not implemented yet. Missing:", file=sys.stderr)
    for item in MISSING:
        print(f"  - {item}", file=sys.stderr)
    print("What works today: hybrid sampling and the replay pass in the transformers fork "
          "(see README, 'Hybrid generation').", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
