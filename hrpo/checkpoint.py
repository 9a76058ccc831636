"""Load a trained HRPO checkpoint (PEFT adapter + thinking modules + model config + run settings)."""
from __future__ import annotations

import json
from pathlib import Path

from .data import left_padded

RUN_SETTINGS = "hrpo_run.json"


class CheckpointError(ValueError):
    pass


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


def run_settings(path) -> dict:
    """The training run's settings (``hrpo_run.json``), saved beside every checkpoint."""
    folder = Path(path)
    for candidate in (folder / RUN_SETTINGS, folder.parent / RUN_SETTINGS):
        if candidate.exists():
            return json.loads(candidate.read_text())
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
