"""HRPO checkpoints: load a trained one (PEFT adapter + thinking modules + model config + run
settings), and write them so that a kill at any moment leaves the previous complete one as the
latest (completion markers, ``save_complete_checkpoint``).

    python -m hrpo.checkpoint --mark-complete runs/x/checkpoint-250   # a checkpoint saved before markers existed
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from pathlib import Path

from .data import left_padded

RUN_SETTINGS = "hrpo_run.json"


class CheckpointError(ValueError):
    pass


def write_run_settings(model, record: dict, folder) -> None:
    """The model config (with the thinking fields) and the run's settings (``record``) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(folder)
    (folder / RUN_SETTINGS).write_text(json.dumps(record, indent=2))


def adapter_config_for(model, folder: Path):
    """The adapter's config, its modules_to_save limited to modules the model has.

    Checkpoints written before hybrid thinking was opt-in listed all four thinking modules,
    also in ``embedding`` mode, where the projection was never used (nor trained); the model
    built for that source now has no projection, and its saved copy is left out."""
    from peft import PeftConfig

    adapter_config = PeftConfig.from_pretrained(folder)
    saved = getattr(adapter_config, "modules_to_save", None)
    if saved:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        adapter_config.modules_to_save = [m for m in saved if m.rsplit(".", 1)[-1] in names]
    return adapter_config


def read_run_settings(folder) -> dict | None:
    """The run-settings file (``hrpo_run.json``) in ``folder``, None if there is none: the one
    reader of the file (evaluation and --resume read it through here)."""
    path = Path(folder) / RUN_SETTINGS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def run_settings(path) -> dict:
    """The training run's settings, saved beside every checkpoint (in it, or in its parent folder)."""
    folder = Path(path)
    for candidate in (folder, folder.parent):
        settings = read_run_settings(candidate)
        if settings is not None:
            return settings
    raise CheckpointError(f"--checkpoint_path {folder}: no {RUN_SETTINGS} in it or its parent folder; the run's "
                          f"settings (task, prompt, temperature, hybrid thinking) are needed to evaluate it as trained")


def require_checkpoint_files(path) -> Path:
    """The adapter and the saved model config must both be there (without config.json the
    thinking options this adapter was trained with are unknown)."""
    folder = Path(path)
    if not (folder / "adapter_config.json").exists():
        raise CheckpointError(f"--checkpoint_path {folder}: no adapter_config.json (expected an HRPO output "
                              f"folder or a checkpoint-N folder in it)")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"--checkpoint_path {folder}: no config.json, so the thinking options this adapter "
                              f"was trained with (latent source, projection shape) are unknown; hrpo_gsm8k.py "
                              f"writes it beside every checkpoint")
    return folder


def load_checkpoint(path, dtype=None, device: str | None = None):
    """(model, tokenizer) from a folder written by hrpo_gsm8k.py (the output folder or a
    checkpoint-N inside it): the base model named in adapter_config.json, built with the
    saved config (thinking fields included), with the adapter and thinking modules on it.
    The saved config.json is required: without it the thinking options are unknown."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = require_checkpoint_files(path)
    adapter_config = folder / "adapter_config.json"
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter_config}: base_model_name_or_path is empty")
    config = AutoConfig.from_pretrained(folder)
    # The saved config carries the thinking fields of an HRPO run (the fork builds the modules
    # its latent source uses); a plain-GRPO run's has none (upstream's model).
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=dtype or torch.float32)
    # The thinking modules are float32 whatever the model dtype, as in training: cast them
    # before the adapter's copies are made and loaded, so that no saved value is rounded.
    for module in model.model.thinking_modules.values():
        module.float()
    model = PeftModel.from_pretrained(model, folder, adapter_name="default",
                                      config=adapter_config_for(model, folder))
    if device:
        model.to(device)
    tokenizer_source = folder if (folder / "tokenizer_config.json").exists() else base
    return model.eval(), left_padded(AutoTokenizer.from_pretrained(tokenizer_source))


# ---------------------------------------------------------------- kill-safe checkpoints
#
# The trainer writes checkpoint-N in place (several files, from several processes under
# DDP/ZeRO/FSDP). A checkpoint is complete once COMPLETE_MARKER is in it: written last, after
# every process has finished writing, by write-aside-and-rename, listing every file and its
# size. Anything without a valid marker (a save that a kill interrupted, a rotation that was
# deleting it) is a partial checkpoint: --resume passes over it and says so.

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    if folder.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def checkpoint_folders(output_dir) -> list[Path]:
    """checkpoint-N folders, by step."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listed_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".tmp-")}


def mark_complete(folder, step: int | None = None) -> Path:
    """Declare ``folder`` complete: flush its files to disk, then write the marker aside and
    rename it into place (a rename is atomic: the marker is either absent or whole)."""
    folder = Path(folder)
    files = _listed_files(folder)
    for name in files:
        _fsync(folder / name)
    tmp = folder / f".tmp-{COMPLETE_MARKER}"
    tmp.write_text(json.dumps({"step": step if step is not None else checkpoint_step(folder), "files": files},
                              indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / COMPLETE_MARKER)
    _fsync(folder)
    return folder / COMPLETE_MARKER


def incomplete_reason(folder) -> str | None:
    """None for a complete checkpoint, else why it is not one."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.exists():
        return "no completion marker: its save did not finish"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable {COMPLETE_MARKER} ({err})"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def latest_complete_checkpoint(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer partial checkpoint, why), ...])."""
    skipped = []
    for folder in reversed(checkpoint_folders(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def discard_checkpoint(folder) -> None:
    """Delete a checkpoint folder, marker first: a deletion cut short leaves a partial
    checkpoint (ignored), never a damaged one that looks complete."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        _fsync(folder)
    shutil.rmtree(folder, ignore_errors=True)


def rotate_checkpoints(output_dir, keep: int | None, protected=()) -> list[Path]:
    """After a checkpoint is complete: delete partial checkpoints older than the newest
    complete one (nothing can resume from them), and the oldest complete ones beyond
    ``keep`` (None or <= 0: keep all). The newest complete one and ``protected`` stay."""
    folders = checkpoint_folders(output_dir)
    complete = [f for f in folders if incomplete_reason(f) is None]
    if not complete:
        return []
    newest = checkpoint_step(complete[-1])
    stale = [f for f in folders if f not in complete and checkpoint_step(f) < newest]
    keep_set = {complete[-1].resolve()} | {Path(p).resolve() for p in protected if p}
    surplus = []
    if keep and keep > 0:
        removable = [f for f in complete if f.resolve() not in keep_set]
        surplus = removable[:max(0, len(complete) - max(keep, len(keep_set)))]
    for folder in stale + surplus:
        discard_checkpoint(folder)
    return stale + surplus


def save_complete_checkpoint(trainer, save, model, trial) -> None:
    """The trainer's ``_save_checkpoint``, kill-safe (``save``: the parent class's method).

    A rewritten checkpoint-N loses its marker before anything is written; the trainer writes
    the folder (every process its own part); then ``trainer.save_run_settings(folder)`` (the
    thinking config and run settings); after a barrier the saving process marks it complete;
    only then are old checkpoints rotated out (the trainer's own rotation, which could delete
    the last complete checkpoint while the new one is still partial, is held back)."""
    args = trainer.args
    run_dir = Path(trainer._get_output_dir(trial=trial))
    folder = run_dir / f"{CHECKPOINT_PREFIX}{trainer.state.global_step}"
    if args.should_save and folder.exists():
        discard_checkpoint(folder)  # a partial leftover of a killed save at this step, or a rewrite
    trainer.accelerator.wait_for_everyone()
    keep = args.save_total_limit
    args.save_total_limit = None  # the trainer's rotation waits until this one is complete
    try:
        save(model, trial)
    finally:
        args.save_total_limit = keep
    if args.should_save and hasattr(trainer, "save_run_settings"):
        trainer.save_run_settings(folder)
    trainer.accelerator.wait_for_everyone()  # every process's files (RNG states, ZeRO/FSDP shards) are there
    if args.should_save:
        mark_complete(folder, trainer.state.global_step)
        rotate_checkpoints(run_dir, keep, protected=[trainer.state.best_model_checkpoint])
    trainer.accelerator.wait_for_everyone()


def zero3_sharded(trainer) -> bool:
    engine = getattr(trainer, "deepspeed", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False) and engine is not None
                and engine.config.get("zero_optimization", {}).get("stage") == 3)


@contextlib.contextmanager
def trained_adapter_only_under_zero3(trainer):
    """Under ZeRO-3 the trainer saves a PEFT model from DeepSpeed's consolidated state dict
    without the frozen parameters, from which TRL's frozen "ref" adapter cannot be saved (PEFT
    raised a KeyError on its modules_to_save copies): save the trained adapter only. DeepSpeed's
    own checkpoint files keep every adapter, for --resume."""
    model = trainer.model
    adapters = list(getattr(model, "peft_config", {}))
    if not (zero3_sharded(trainer) and len(adapters) > 1 and hasattr(model, "active_adapter")):
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model,
                                              selected_adapters=[model.active_adapter])
    try:
        yield
    finally:
        del model.save_pretrained


def load_trained_adapter(trainer, resume_from_checkpoint, model=None) -> None:
    """After the trainer's ``_load_from_checkpoint``: with TRL's frozen "ref" adapter beside
    "default", the trainer saves "ref" in a subfolder and, on resume, loads only the
    subfolders, so the trained "default" adapter (LoRA and thinking modules) would silently
    restart from its initial weights. Load it here, in place (the optimizer keeps its
    parameters). DeepSpeed restores the whole module state itself, every adapter included."""
    model = trainer.model if model is None else model
    folder = Path(resume_from_checkpoint)
    if getattr(trainer, "is_deepspeed_enabled", False) or not hasattr(model, "load_adapter"):
        return
    subfolders = [p for p in folder.iterdir() if p.is_dir() and (p / "adapter_config.json").exists()]
    if not subfolders or not (folder / "adapter_config.json").exists():
        return  # the trainer loaded the one adapter itself
    active = model.active_adapter
    model.load_adapter(str(folder), active, is_trainable=True)
    model.set_adapter(active)

def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hrpo.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mark-complete", metavar="FOLDER", required=True,
                        help="declare a checkpoint folder written before completion markers existed complete; "
                             "it must hold trainer_state.json (the trainer writes it last)")
    folder = Path(parser.parse_args(argv).mark_complete)
    if not (folder / "trainer_state.json").is_file() or not (folder / "adapter_config.json").is_file():
        parser.error(f"{folder}: no trainer_state.json or adapter_config.json: not a finished checkpoint")
    print(f"marked complete: {mark_complete(folder)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
