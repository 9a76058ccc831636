#!/usr/bin/env python3
"""Evaluate a trained HRPO checkpoint on held-out problems of its task (any task; the name is
HRPO's). The code is ``hrpo/evaluate.py`` (``python -m hrpo.evaluate``); see its --help.

    python eval_gsm8k.py --checkpoint_path experiments/run --greedy
"""
import sys

from hrpo.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
