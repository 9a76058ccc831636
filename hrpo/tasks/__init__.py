"""Tasks: prompt format, data, answer extraction and reward (see base.Task).

    gsm8k  grade-school math word problems (openai/gsm8k or a local file)
    arith  generated GSM8K-format arithmetic problems of a chosen difficulty (offline, CPU-scale)
    math   MATH competition problems (EleutherAI/hendrycks_math, MATH-500 or a local copy), graded by equivalence
    mmlu   multiple-choice STEM questions (MMLU auxiliary train; MMLU-STEM, ARC-Challenge, OpenBookQA, QASC)
    reasoning_gym  reasoning-gym's procedural generators by name (gsm_symbolic: GSM8K's templates), offline
"""
from __future__ import annotations

from .base import SYSTEM_PROMPTS, Task, system_prompt_text


def _registry() -> dict:
    from . import arith, gsm8k, math, mc, reasoning_gym

    return {task.name: task for task in (gsm8k.TASK, arith.TASK, math.TASK, mc.TASK, reasoning_gym.TASK)}


TASK_NAMES = ("gsm8k", "arith", "math", "mmlu", "reasoning_gym")


def get_task(name: str) -> Task:
    tasks = _registry()
    if name not in tasks:
        raise ValueError(f"--task {name!r}: expected one of {sorted(tasks)}")
    return tasks[name]


__all__ = ["SYSTEM_PROMPTS", "TASK_NAMES", "Task", "get_task", "system_prompt_text"]
