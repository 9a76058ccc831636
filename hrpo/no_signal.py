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


class SkipStepsWithoutSignal(TrainerCallback):
    """``--skip_steps_without_signal``: the optimizer step of a batch in which no completion has a
    nonzero advantage (on any process) is skipped. With no KL term its gradient is exactly 0, and
    AdamW would still move every weight along its first moment (and decay it): in the demo's
    collapsed runs most of LoRA's path was walked on such steps, after the answer format had
    broken (bench/README.md, "The collapse, explained"). Skipping leaves the weights, AdamW's
    moments and its step count as they are; the learning-rate schedule still advances, as the
    step is counted.

    The trainer reports each micro-batch's advantages (``saw``); before the optimizer steps, the
    processes agree on whether any had signal, and without it every gradient is set to None, which
    torch's and bitsandbytes' optimizers read as "leave this parameter alone"."""

    def __init__(self, device):
        self.device = device
        self.signal = False
        self.skipped = 0  # optimizer steps skipped in this run (since this process started)

    def saw(self, advantages) -> None:
        self.signal = self.signal or bool((advantages != 0).any())

    def agreed_signal(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signal
        flag = torch.tensor([float(self.signal)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        signal, self.signal = self.agreed_signal(), False
        if not signal:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self.skipped += 1

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"--skip_steps_without_signal: {self.skipped} optimizer step(s) skipped without reward signal "
                  f"(weights and AdamW's state kept; up to step {state.global_step})")
