"""Three GRPO steps of a training run (hrpo.train) through unsloth on a CUDA machine (gpu_checks.sh):
wall time, peak memory, and whether every thinking module was updated.

    python -m scripts.gpu_grpo_steps WORK OUT    # WORK holds model/ and data/train.jsonl; writes OUT/grpo_3_steps.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hrpo.backend import import_unsloth

import_unsloth(torch.cuda.is_available())  # first: it patches transformers and TRL
from hrpo.settings_parser import parse_settings  # noqa: E402
from hrpo.run import build_trainer  # noqa: E402


def length_reward(completions, **_):
    """Varies within a group on a random model (GSM8K's reward would be all zero)."""
    from hrpo.rewards import completion_text

    return [len(completion_text(c)) / 64 for c in completions]


def run_args(work: Path, run: Path):
    return parse_settings([
        "--model_name", str(work / "model"), "--dataset_path", str(work / "data" / "train.jsonl"),
        "--output_dir", str(run), "--max_steps", "3", "--group_size", "4", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1", "--max_completion_length", "64", "--thinking_latent_source",
        "projection", "--backend", "unsloth", "--logging_steps", "1", "--save_steps", "3", "--warmup_ratio", "0",
        "--lr", "1e-3", "--lr_residual_gate", "1e-3", "--lr_residual_Lambda", "1e-3", "--lr_thinking_projection",
        "1e-3"])


def updated_thinking_modules(base_file: Path, adapter_file: Path) -> dict[str, bool]:
    """Per thinking module: whether any of its saved tensors differs from the base model's."""
    import torch
    from safetensors.torch import load_file
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    base, adapter = load_file(str(base_file)), load_file(str(adapter_file))
    updated = {}
    for name, value in adapter.items():
        for module in THINKING_MODULES:
            if module in name:
                key = name.split("base_model.model.", 1)[-1].replace(".modules_to_save.default", "")
                original = base.get(key)
                changed = original is None or not torch.equal(original.float(), value.float())
                updated[module] = updated.get(module, False) or changed
    return updated


def main(work: Path, out: Path) -> int:
    import torch
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    run = work / "run"
    start = time.perf_counter()
    trainer = build_trainer(run_args(work, run), reward_funcs=[length_reward])
    trainer.train()
    trainer.save_model(str(run))
    history = trainer.state.log_history
    (run / "log_history.json").write_text(json.dumps(history, indent=1))
    seconds = time.perf_counter() - start
    updated = updated_thinking_modules(work / "model" / "model.safetensors", run / "adapter_model.safetensors")
    report = {"trainer": [c.__name__ for c in type(trainer).__mro__[:2]], "seconds_3_steps": seconds,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "thinking_modules_updated": updated, "last_log": history[-2] if len(history) > 1 else history}
    (out / "grpo_3_steps.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    ok = len(updated) == len(THINKING_MODULES) and all(updated.values())
    print("ALL PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="holds model/ and data/train.jsonl; the run goes to run/")
    parser.add_argument("out", type=Path, help="grpo_3_steps.json is written here")
    cli = parser.parse_args()
    sys.exit(main(cli.work, cli.out))
