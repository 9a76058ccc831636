#!/usr/bin/env python3
"""The demo's closing lines: this run's held-out gain, and how often the same demo gained on
the seeds whose runs are kept (bench/learning.py records, e.g. bench/results/demo_seeds), so
that a user whose seed did not learn sees that this happens and how often.

    python scripts/demo_summary.py runs/demo bench/results/demo_seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_gain(run: Path) -> tuple[float, float] | None:
    """(accuracy at step 0, at the end) of a run folder, or None where it did not evaluate both."""
    paths = [run / "eval_step0.json", run / "eval_final.json"]
    if not all(path.exists() for path in paths):
        return None
    start, end = (json.loads(path.read_text())["metrics"]["accuracy"] for path in paths)
    return start, end


def seed_gains(records: Path) -> dict[int, float]:
    """Held-out gain per seed of the kept runs (one arm) under records/."""
    kept = [json.loads(path.read_text()) for path in sorted((records / "records").glob("*.json"))]
    arms = sorted({record["arm"] for record in kept})
    if len(arms) > 1:
        raise ValueError(f"{records}: records of {len(arms)} arms ({', '.join(arms)}), expected the demo's one")
    return dict(sorted((r["seed"], r["accuracy_end"] - r["accuracy_start"]) for r in kept))


def summary(run: Path, records: Path) -> list[str]:
    lines = []
    accuracies = run_gain(run)
    if accuracies is not None:
        start, end = accuracies
        lines.append(f"[demo] this run: held-out accuracy {start:.3f} -> {end:.3f} (gain {end - start:+.3f})")
    gains = seed_gains(records)
    if gains:
        positive = sum(gain > 0 for gain in gains.values())
        per_seed = ", ".join(f"{seed}: {gain:+.3f}" for seed, gain in gains.items())
        lines.append(f"[demo] this demo gained on {positive} of {len(gains)} seeds tried "
                     f"({records}; gain per seed {per_seed})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the demo's --output_dir")
    parser.add_argument("records", type=Path, help="a bench/learning.py output folder with records/ of the demo")
    args = parser.parse_args()
    try:
        lines = summary(args.run, args.records)
    except ValueError as err:
        print(f"demo_summary.py: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
