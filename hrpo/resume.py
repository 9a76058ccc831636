"""Resume: which checkpoint a run continues from, which of its saved settings come back (all but
where and how often it logs, saves and evaluates, and how long it runs), when a run is
finished, and what another run length does to the learning-rate schedule."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from .checkpoint import RUN_SETTINGS, CheckpointError, latest_complete_checkpoint, read_run_settings
from .config import Settings, marked_fields
from .errors import UsageError
from .settings_parser import SettingsParser

# Fields a resumed run may change: where and how often it logs, saves and evaluates, how long it
# runs, where it reports; HRPO's own say so in their metadata. Every other saved setting comes
# from the checkpoint.
RESUME_MAY_CHANGE = {"output_dir", "resume_from_checkpoint", "report_to", "run_name", "push_to_hub", "disable_tqdm",
                     *marked_fields("resume_may_change")}
# The run's length: the checkpoint's unless given; given otherwise, check_run_length says what it does.
RUN_LENGTH = {"max_steps", "num_train_epochs"}
RESUME_MAY_CHANGE_PREFIXES = ("eval_", "logging_", "save_", "hub_", "log_", "dataloader_", "num_completions")
# Resolved when not given, from the machine (hrpo.config.HRPOConfig) or from other fields (TRL's GRPOConfig,
# transformers' TrainingArguments): restored only where the run set them.
DERIVED_DEFAULTS = {"bf16", "fp16", "use_cpu", "gradient_checkpointing", "dtype", "generation_batch_size",
                    "steps_per_generation", "do_eval", "disable_tqdm", "logging_dir"}


def resume_checkpoint(settings: Settings) -> Path | None:
    """The checkpoint --resume continues from (see ``find_checkpoint``)."""
    return find_checkpoint(settings.training.resume, Path(settings.training.output_dir))


def find_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``resume`` "latest"), or the complete
    checkpoint folder given (a path, or a name inside ``output_dir``)."""
    from .checkpoint import incomplete_reason

    if not resume:
        return None
    if resume == "latest":
        return latest_complete_checkpoint(output_dir)[0]
    folder = Path(resume).expanduser()
    if not folder.is_dir() and (output_dir / resume).is_dir():
        folder = output_dir / resume
    if not folder.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint folder (a path, or a checkpoint-N folder in "
                         f"--output_dir {output_dir})")
    reason = incomplete_reason(folder)
    if reason is not None:
        raise UsageError(f"--resume {resume}: {folder} is not a complete checkpoint ({reason})")
    return folder


def check_output_dir(settings: Settings) -> None:
    from .checkpoint import COMPLETE_MARKER

    output_dir = Path(settings.training.output_dir)
    if settings.training.resume and settings.training.resume != "latest":
        resume_checkpoint(settings)  # names a bad folder
    elif settings.training.resume:
        folder, skipped = latest_complete_checkpoint(output_dir)
        if folder is None:
            partial = "".join(f"; {folder.name} is partial ({why})" for folder, why in skipped)
            hint = (f". A checkpoint written before completion markers existed can be declared complete with "
                    f"`python -m hrpo.checkpoint --mark-complete FOLDER` ({COMPLETE_MARKER})") if skipped else ""
            raise UsageError(f"--resume: no complete checkpoint-* folder in --output_dir {output_dir} to resume "
                             f"from{partial}{hint}")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise UsageError(f"--output_dir {output_dir} exists and is not empty: pass --resume to continue from its "
                         f"last checkpoint, or choose another --output_dir")


def saved_settings(folder: Path, parser: SettingsParser) -> tuple[dict, dict]:
    """What a checkpoint was trained with, by field name: (every setting a resumed run may not
    change, with the value it had; those to set again: every one of them, whether the run was
    given it, took an entry script's default or a default that has changed since, except the
    ones resolved from the machine or from other fields where the run did not set them). From
    its run-settings file, with the thinking fields of its config.json (what the model was
    built with) over them. A file of an earlier version (flag names as keys, every flag
    listed) is read too."""
    from transformers.hybrid_thinking.config import ThinkingConfig, thinking_enabled

    config_file = folder / "config.json"
    try:
        run = read_run_settings(folder)
        config = json.loads(config_file.read_text()) if config_file.exists() else None
    except (CheckpointError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume: {folder}: {err}") from None
    if run is None and config is None:
        raise UsageError(f"--resume: {folder} has neither {RUN_SETTINGS} nor config.json: its settings are unknown")
    run = run or {}
    names = parser.field_names()
    values = run.get("settings", run)
    given = set(run["given"]) if "given" in run else {names.get(key) for key in values} - DERIVED_DEFAULTS
    effective, restore = {}, {}
    for key, value in values.items():
        name = names.get(key)
        if name is None or name in RESUME_MAY_CHANGE or name.startswith(RESUME_MAY_CHANGE_PREFIXES):
            continue
        effective[name] = value
        if (name in given or name not in DERIVED_DEFAULTS) and not isinstance(value, dict):
            restore[name] = value
    if thinking_enabled(SimpleNamespace(**(config or {}))):  # fields it predates take their defaults
        fields = ThinkingConfig.from_config(SimpleNamespace(**config)).to_dict()
        thinking = {k: v for k, v in fields.items() if k != "answer_marker"}
        effective.update(thinking)
        restore.update(thinking)
    return effective, restore


def take_checkpoint_settings(values, given: set[str], output_dir: Path, parser: SettingsParser) -> None:
    """On --resume, the checkpoint's settings become the parser's defaults: a field left out
    takes the checkpoint's value, a field given with another value is an error (it would
    continue a different run on the same weights). ``values``: the raw values given."""
    folder = find_checkpoint(values.resume, output_dir)
    if folder is None:
        return  # check_output_dir says so
    effective, restore = saved_settings(folder, parser)
    for name in sorted((given & set(effective)) - RUN_LENGTH):
        current = getattr(values, name, None)
        if _comparable(current) != _comparable(effective[name]):
            raise UsageError(f"--{name} {current!r} conflicts with the checkpoint being resumed ({folder}): "
                             f"it was trained with --{name} {effective[name]!r}. Leave the flag out to continue with "
                             f"the checkpoint's value, or start a new run in another --output_dir")
    parser.set_defaults(**{name: value for name, value in restore.items() if name not in given})


def _comparable(value):
    value = getattr(value, "value", value)  # transformers' enums
    return [_comparable(v) for v in value] if isinstance(value, (list, tuple)) else value


def finished_run(settings: Settings) -> str | None:
    """On --resume: why the run in --output_dir is finished (its final files are there and it
    reached the asked --max_steps, or ran the asked epochs with --max_steps -1), else None."""
    output_dir = Path(settings.training.output_dir)
    history = output_dir / "log_history.json"
    if not settings.training.resume or not history.exists():
        return None
    steps = [row["step"] for row in json.loads(history.read_text()) if "step" in row]
    done = max(steps, default=0)
    training = settings.training
    if training.max_steps > 0:
        return None if training.max_steps > done else f"it finished at step {done} ({history} is its final log)"
    final = _saved_values(output_dir)
    if final.get("max_steps", -1) > 0 or final.get("num_train_epochs") != training.num_train_epochs:
        return None  # it ran another length than the epochs asked for now: asked to train on
    return f"it finished its {training.num_train_epochs:g} epoch(s) at step {done} ({history} is its final log)"


def _saved_values(folder: Path) -> dict:
    """A run-settings file's values by name ({} without one)."""
    run = read_run_settings(folder) or {}
    return run.get("settings", run)


# Schedules whose multiplier does not depend on the run's length (constant_with_warmup does, through a warmup ratio).
LENGTH_FREE_SCHEDULES = {"constant", "reduce_lr_on_plateau"}


def schedule_depends_on_length(training) -> bool:
    name = str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type))
    if name == "constant_with_warmup":
        return 0 < training.warmup_steps < 1
    return name not in LENGTH_FREE_SCHEDULES


def lr_multiplier(training, total_steps: int, step: int) -> float:
    """The schedule's learning-rate multiplier at ``step`` of a ``total_steps`` run (transformers' own
    schedule, warmup as the Trainer computes it)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer, training.get_warmup_steps(total_steps),
                              total_steps, scheduler_specific_kwargs=training.lr_scheduler_kwargs or {})
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def check_run_length(settings: Settings) -> None:
    """On --resume: another run length than the checkpoint's would silently reshape the learning-
    rate schedule (a finished 30-step cosine run resumed for 60 steps jumps from multiplier 0 back
    to 0.59). That is an error unless --extend_lr_schedule asks for it; then it is said."""
    from .checkpoint import checkpoint_step

    folder, training = resume_checkpoint(settings), settings.training
    saved = _saved_values(folder) if folder else {}
    if "max_steps" not in saved or not schedule_depends_on_length(training):
        return
    old = (saved["max_steps"], saved.get("num_train_epochs", training.num_train_epochs))
    new = (training.max_steps, training.num_train_epochs)
    step = checkpoint_step(folder) or 0
    if old[0] == new[0] and (new[0] > 0 or old[1] == new[1]) or 0 < new[0] <= step:
        return  # the same length, or nothing left to train
    length = lambda steps, epochs: f"--max_steps {steps}" if steps > 0 else f"--num_train_epochs {epochs:g}"
    change = f"{length(*old)} -> {length(*new)}"
    if old[0] > 0 and new[0] > 0:
        change += (f": at step {step} the learning-rate multiplier goes {lr_multiplier(training, old[0], step):.3f} "
                   f"-> {lr_multiplier(training, new[0], step):.3f}")
    schedule = f"the {training.lr_scheduler_type.value} learning-rate schedule"
    if not training.extend_lr_schedule:
        raise UsageError(f"--resume from {folder} with another run length ({change}) would rebuild {schedule} over "
                         f"the new length. Pass --extend_lr_schedule to do so, keep the checkpoint's length, or start "
                         f"a new run in another --output_dir")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[hrpo] --extend_lr_schedule: {schedule} is rebuilt over the new length ({change})", flush=True)
