"""A warning when GRPO has had nothing to learn from for several logged steps.

GRPO's advantage is a completion's reward minus its group's mean: when the completions of
every group earn the same reward (typically all 0), every advantage is 0 and the policy
cannot move back. The typical way
in, at small scale, is a policy that stops answering within ``max_completion_length`` (every
completion cut, TRL's ``completions/clipped_ratio`` at 1.0); such a run usually stays there
for the rest of its steps, so a user is better told early than at the final evaluation.
"""
from __future__ import annotations

import warnings

from transformers import TrainerCallback

NO_SIGNAL_LOGS = 5  # consecutive logged training steps without signal before the warning


def without_signal(logs: dict) -> bool:
    """A logged training step in which no group's rewards differed (TRL's metric name)."""
    return logs["frac_reward_zero_std"] >= 1.0


class NoSignalWarning(TrainerCallback):
    """Warns once per streak of ``NO_SIGNAL_LOGS`` logged steps without signal, on the main process."""

    def __init__(self, patience: int = NO_SIGNAL_LOGS):
        self.patience = patience
        self.streak = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "frac_reward_zero_std" not in logs:
            return  # evaluation and the final summary log other metrics
        self.streak = self.streak + 1 if without_signal(logs) else 0
        if self.streak == self.patience and state.is_world_process_zero:
            warnings.warn(self.message(args, state, logs), stacklevel=2)

    def message(self, args, state, logs: dict) -> str:
        clipped = logs.get("completions/clipped_ratio")
        cause = (f"; {clipped:.0%} of the last step's completions were cut at --max_completion_length "
                 f"{args.max_completion_length} (the policy has stopped answering within the limit)"
                 if clipped is not None and clipped >= 0.9 else "")
        return (f"no reward signal: in each of the last {self.patience} logged steps (up to step "
                f"{state.global_step}) every group's completions earned the same reward (last mean reward "
                f"{logs.get('reward', float('nan')):.3g}){cause}. GRPO's advantages are all 0, so training "
                f"cannot move by itself; a lower --learning_rate, a longer --max_completion_length or --resume "
                f"from an earlier checkpoint may help")
