"""--skip_steps_without_signal (hrpo.no_signal.SkipStepsWithoutSignal): a step whose batch has no
reward signal leaves the weights and AdamW's state as they are; without the option AdamW moves
them on its moments (the demo's collapse, bench/README.md)."""
import types

import pytest
from transformers import TrainerCallback

from hrpo import run as hrpo_run
from hrpo.config import refuse_unsupported_step_skipping
from hrpo.errors import UsageError
from testing.training import save_training_workspace, tiny_training_args, trainable


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_training_workspace(tmp_path_factory.mktemp("skip_steps"))


class SignalOnce:
    """Rewards that differ inside every group on the first call, then 0 everywhere."""

    def __init__(self):
        self.calls = 0
        self.__name__ = "signal_once"

    def __call__(self, completions, **_):
        self.calls += 1
        return [float(i % 2) if self.calls == 1 else 0.0 for i in range(len(completions))]


class Snapshots(TrainerCallback):
    """The trainable weights and AdamW's step counts after each optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.steps = trainer, [], []

    def on_step_end(self, *args, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in trainable(self.trainer.model).items()})
        state = self.trainer.optimizer.state
        self.steps.append(sorted({int(s["step"]) for s in state.values() if "step" in s}))


def run_three_steps(workspace, out, *flags, hold: bool = False):
    args = tiny_training_args(workspace, out, "--max_steps", "3", "--logging_steps", "1", "--save_steps", "10",
                              "--beta", "0", "--weight_decay", "0.1", *flags)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[SignalOnce()])
    if hold:
        from bench.collapse import HoldWithoutSignal

        trainer.add_callback(HoldWithoutSignal(trainer).callback)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    return trainer, snapshots


def moved(before: dict, after: dict) -> float:
    return max((after[n] - before[n]).abs().max().item() for n in before)


@pytest.mark.parametrize("hybrid", ["on", "off"])
def test_steps_without_signal_leave_weights_and_adamw_state(workspace, tmp_path, hybrid):
    trainer, snap = run_three_steps(workspace, tmp_path / "skip", "--hybrid_thinking", hybrid,
                                    "--skip_steps_without_signal")
    assert moved(snap.weights[0], snap.weights[2]) == 0.0  # steps 2 and 3: no signal, nothing moves
    assert snap.steps == [[1], [1], [1]]  # AdamW stepped once
    assert trainer.step_skipper.skipped == 2
    assert trainer.state.global_step == 3  # the steps are counted (the schedule advances)


def test_without_the_option_adamw_keeps_moving(workspace, tmp_path):
    _, snap = run_three_steps(workspace, tmp_path / "coast", "--hybrid_thinking", "off")
    assert moved(snap.weights[0], snap.weights[1]) > 1e-4  # the first moment carries on with zero gradient
    assert snap.steps == [[1], [2], [3]]


def test_refused_where_skipping_is_not_what_would_happen():
    ok = types.SimpleNamespace(beta=0.0, fp16=False, deepspeed=None)
    refuse_unsupported_step_skipping(ok, deepspeed=False)
    with pytest.raises(UsageError, match="not with fp16"):
        refuse_unsupported_step_skipping(types.SimpleNamespace(beta=0.0, fp16=True, deepspeed=None))
    with pytest.raises(UsageError, match="not with DeepSpeed"):
        refuse_unsupported_step_skipping(ok, deepspeed=True)
    with pytest.raises(UsageError, match="needs --beta 0"):
        refuse_unsupported_step_skipping(types.SimpleNamespace(beta=0.04, fp16=False, deepspeed=None))


def test_the_same_weights_as_undoing_the_step_afterwards(workspace, tmp_path):
    """bench.collapse's counterfactual (AdamW steps, then weights and state are put back) is the
    independent reference: skipping the step must leave the same weights after every step."""
    _, skipped = run_three_steps(workspace, tmp_path / "skip", "--skip_steps_without_signal")
    _, held = run_three_steps(workspace, tmp_path / "hold", hold=True)
    for after_skip, after_hold in zip(skipped.weights, held.weights):
        assert moved(after_hold, after_skip) < 1e-7
    assert skipped.steps == held.steps == [[1], [1], [1]]
