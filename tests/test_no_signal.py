"""The warning when GRPO has had no reward signal for several logged steps (hrpo.no_signal)."""
import types
import warnings

import pytest

from hrpo import run as hrpo_run
from hrpo.no_signal import NO_SIGNAL_LOGS, NoSignalWarning
from testing.training import length_reward, save_training_workspace, tiny_training_args

ARGS = types.SimpleNamespace(max_completion_length=64)


def state(step: int, main: bool = True):
    return types.SimpleNamespace(global_step=step, is_world_process_zero=main)


def logged(reward: float, zero_std: float = 1.0, clipped: float = 1.0) -> dict:
    return {"reward": reward, "frac_reward_zero_std": zero_std, "completions/clipped_ratio": clipped, "loss": 0.0}


def feed(callback, rows, main: bool = True) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, row in enumerate(rows, start=1):
            callback.on_log(ARGS, state(step, main), None, logs=row)
    return [str(w.message) for w in caught]


def test_warns_once_after_the_streak_and_names_the_cut_completions():
    messages = feed(NoSignalWarning(), [logged(0.0)] * (NO_SIGNAL_LOGS + 3))
    assert len(messages) == 1
    assert f"last {NO_SIGNAL_LOGS} logged steps" in messages[0] and f"step {NO_SIGNAL_LOGS})" in messages[0]
    assert "100% of the last step's completions were cut at --max_completion_length 64" in messages[0]


def test_a_step_with_reward_resets_the_streak_and_other_logs_are_ignored():
    rows = [logged(0.0)] * (NO_SIGNAL_LOGS - 1) + [logged(0.125, zero_std=0.5)] + [logged(0.0)] * (NO_SIGNAL_LOGS - 1)
    rows.insert(2, {"eval_accuracy": 0.0, "eval_frac_reward_zero_std": 1.0})  # an evaluation log neither counts nor breaks the streak
    assert feed(NoSignalWarning(), rows) == []
    # a new streak after a reset warns again
    assert len(feed(NoSignalWarning(), rows + [logged(0.0)])) == 1


def test_no_warning_while_some_group_differs_and_the_cause_only_when_it_is_one():
    # rewards that vary inside a group carry signal even at mean 0 (e.g. negative and positive rewards)
    assert feed(NoSignalWarning(), [logged(0.0, zero_std=0.875)] * 2 * NO_SIGNAL_LOGS) == []
    # equal rewards but answered (e.g. every group solved): warned, without blaming the length limit
    messages = feed(NoSignalWarning(), [logged(1.0, clipped=0.25)] * NO_SIGNAL_LOGS)
    assert len(messages) == 1 and "last mean reward 1)" in messages[0] and "were cut" not in messages[0]


def test_only_the_main_process_warns():
    assert feed(NoSignalWarning(), [logged(0.0)] * NO_SIGNAL_LOGS, main=False) == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_training_workspace(tmp_path_factory.mktemp("no_signal"))


def zero_reward(completions, **_):
    return [0.0] * len(completions)


@pytest.mark.parametrize("reward, warned", [(zero_reward, True), (length_reward, False)])
def test_a_training_run_reads_trls_own_metric_names(workspace, tmp_path, reward, warned):
    """End to end: the trainer carries the callback and TRL logs the metrics it reads."""
    args = tiny_training_args(workspace, tmp_path / "out", "--max_steps", "2", "--logging_steps", "1",
                              "--hybrid_thinking", "off", "--save_steps", "10")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[reward])
    watch = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoSignalWarning))
    watch.patience = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("no reward signal" in str(w.message) for w in caught) == warned
