#!/usr/bin/env python3
"""Training curves of an HRPO run, as PNG files beside its logs, and a summary.

    python scripts/plot_run.py runs/demo          # reads log_history.json or the last trainer_state.json

Curves: reward, embeds_ratio, hidden_ratio, completion length, KL and the projection's
drift from its initial weights (those present in the log). The summary prints the reward
per step and the held-out accuracy before and after training (eval_step0.json and
eval_final.json, when the run evaluated).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hrpo.metric_names import GATE_RATIO_METRIC, HIDDEN_RATIO_METRIC, RENAMED_METRICS

CURVES = [
    ("reward", "reward"),
    (GATE_RATIO_METRIC, "embeds_ratio (mean gate a)"),
    (HIDDEN_RATIO_METRIC, "hidden_ratio (mean sqrt(1 - a^2))"),
    ("completions/mean_length", "completion length (tokens)"),
    ("kl", "KL to the reference"),
    ("thinking_projection/drift", "projection drift ||W - W0|| / ||W0||"),
    ("thinking_projection/drift_abs", "projection drift ||W - W0||"),
]


def log_history(run: Path) -> list[dict]:
    """The run's logged rows, metrics of earlier runs under their current names."""
    return [{RENAMED_METRICS.get(key, key): value for key, value in row.items()} for row in _logged_rows(run)]


def _logged_rows(run: Path) -> list[dict]:
    direct = run / "log_history.json"
    if direct.exists():
        return json.loads(direct.read_text())
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if not states:
        raise FileNotFoundError(f"{run}: no log_history.json and no checkpoint-*/trainer_state.json")
    return json.loads(states[-1].read_text())["log_history"]


def held_out(run: Path) -> dict:
    """Held-out accuracy by when it was measured ("step 0", "end"), where the run evaluated."""
    found = {}
    for when, name in (("step 0", "eval_step0.json"), ("end", "eval_final.json")):
        if (run / name).exists():
            found[when] = json.loads((run / name).read_text())["metrics"]
    return found


def held_out_title(run: Path) -> str:
    parts = [f"{when} {m['accuracy']:.3f}" for when, m in held_out(run).items()]
    return f"\nheld-out greedy accuracy: {', '.join(parts)}" if parts else ""


def print_summary(run: Path) -> None:
    rewards = [row["reward"] for row in log_history(run) if "reward" in row and "step" in row]
    print(f"reward per step ({len(rewards)} steps): " + " ".join(f"{r:.2f}" for r in rewards))
    for when, m in held_out(run).items():
        print(f"held-out accuracy at {when}: {m['accuracy']:.3f} ({m['correct']}/{m['total']})")


def plot(run: Path, out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [row for row in log_history(run) if "step" in row]
    out = out or run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    present = [(key, title) for key, title in CURVES if any(key in row for row in history)]
    if not present:
        raise ValueError(f"{run}: the log has none of {[k for k, _ in CURVES]}")
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.3 * len(present)), sharex=True)
    axes = axes if len(present) > 1 else [axes]
    for ax, (key, title) in zip(axes, present):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(f"HRPO run: {run}{held_out_title(run)}", fontsize=10)
    fig.tight_layout()
    target = out / "curves.png"
    fig.savefig(target, dpi=110)
    written.append(target)
    print(f"wrote {target}")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run's --output_dir")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG (default RUN/plots)")
    args = parser.parse_args()
    try:
        plot(args.run, args.out)
        print_summary(args.run)
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_run.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
