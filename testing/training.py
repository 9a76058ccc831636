"""Short training runs (hrpo.train) on a tiny model: the workspace, the flags, a reward
and what to compare afterwards.

Importing it does not import transformers: the training entry points import unsloth first.
"""
from __future__ import annotations

from pathlib import Path

from hrpo.data import write_jsonl
from hrpo.rewards import completion_text
from hrpo.tasks.arith import make_problems


def save_training_workspace(root: Path, problems: int = 16) -> Path:
    """A tiny plain model (model/) and generated arithmetic problems (train.jsonl) in ``root``."""
    from testing.tiny import PLAIN_CHAT_TEMPLATE, save_tiny_chat_model

    save_tiny_chat_model(root / "model", chat_template=PLAIN_CHAT_TEMPLATE)
    write_jsonl(make_problems(problems, difficulty=3), root / "train.jsonl")
    return root


def tiny_training_argv(workspace: Path, out: Path, *extra: str) -> list[str]:
    """The command line of one training step on ``workspace``, every rate high enough to move."""
    return ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--group_size", "4", "--max_completion_length", "10",
            "--max_prompt_length", "512", "--lora_rank", "4", "--lr", "1e-2", "--lr_residual_gate", "1e-2",
            "--lr_residual_Lambda", "1e-2", "--lr_thinking_projection", "1e-2", "--warmup_ratio", "0",
            "--save_steps", "1", *extra]


def tiny_training_args(workspace: Path, out: Path, *extra: str):
    """The settings (``hrpo.config.Settings``) of one training step on ``workspace``."""
    from hrpo.settings_parser import parse_settings

    return parse_settings(tiny_training_argv(workspace, out, *extra))


def length_reward(completions, **_):
    """Varies inside every group, so advantages (and gradients) are not zero."""
    return [float(len(completion_text(c))) / 10.0 for c in completions]


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def module_of(name: str) -> str:
    """The thinking module a parameter belongs to, else "lora" or "other"."""
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    return next((m for m in THINKING_MODULES if m in name), "lora" if "lora_" in name else "other")
