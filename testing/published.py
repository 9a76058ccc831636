"""HRPO's published training settings: the one table the recipes and task scripts are checked
against (tests/test_recipes.py).

Keys are HRPO's own flag names (its scripts' argparse options, each an alias of one of our
fields) and the GRPOConfig values its scripts fix. Sources: the argparse defaults of HRPO's
``hrpo_gsm8k.py``, ``hrpo_math.py`` and ``hrpo_mmlu.py``, the GRPOConfig they build, and the
training command of HRPO's README (Qwen2.5-3B-Instruct on GSM8K).

Not in the table: the data (HRPO's MATH script reads a local MATH folder, its MMLU script a
training file merged from several sets, ours default to the hub's; see the recipes), the
optimizer on a CPU (paged 8-bit AdamW needs CUDA) and the differences we keep on purpose
(docs/design.md, "Where we differ from HRPO's code").
"""
from __future__ import annotations

# Every HRPO training script sets these the same way (argparse defaults, GRPOConfig arguments).
COMMON = {
    "model_name": "Qwen/Qwen2.5-1.5B-Instruct",
    "lora_rank": 32,
    "lora_alpha": 64,  # 2 x lora_rank
    "lr": 5e-6,
    "beta": 0.005,
    "residual_r_min": 0.99,
    "residual_r_max": 0.999,
    "lr_residual_gate": 1e-4,
    "lr_residual_Lambda": 1e-3,
    "weight_decay": 0.1,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "cosine",
    "optimizer": "paged_adamw_8bit",
    "max_grad_norm": 0.1,
    "temperature": 0.5,
    "gradient_accumulation_steps": 4,
    "max_prompt_length": 1024,
    "max_completion_length": 1024,
    "seed": 42,
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "num_train_epochs": 1,
    "save_steps": 250,
    "save_total_limit": 3,
    "logging_steps": 1,
    "loss_type": "grpo",  # TRL 0.15's only loss: each completion's mean, then the mean over the batch
}

GSM8K = {**COMMON, "group_size": 4, "per_device_train_batch_size": 8}
PUBLISHED = {
    "HRPO hrpo_gsm8k.py": GSM8K,
    "HRPO hrpo_math.py": {**COMMON, "group_size": 8, "per_device_train_batch_size": 16},
    "HRPO hrpo_mmlu.py": {**COMMON, "group_size": 8, "per_device_train_batch_size": 16},
    # README: python hrpo_gsm8k.py --model_name Qwen/Qwen2.5-3B-Instruct --residual_r_min 0.98 --group_size 8
    "HRPO README, Qwen2.5-3B on GSM8K": {**GSM8K, "model_name": "Qwen/Qwen2.5-3B-Instruct", "residual_r_min": 0.98,
                                         "group_size": 8},
}

# Which published setting each of our recipes and task scripts is, and what it changes on
# purpose (a model HRPO's script lists but publishes no command for).
OURS = {
    "configs/recipes/gsm8k_qwen2.5_1.5b.yaml": ("HRPO hrpo_gsm8k.py", {}),
    "configs/recipes/gsm8k_qwen2.5_3b.yaml": ("HRPO README, Qwen2.5-3B on GSM8K", {}),
    "configs/recipes/gsm8k_llama3.2_1b.yaml": ("HRPO hrpo_gsm8k.py", {"model_name": "meta-llama/Llama-3.2-1B-Instruct"}),
    "configs/recipes/math_qwen2.5_1.5b.yaml": ("HRPO hrpo_math.py", {}),
    "configs/recipes/mmlu_qwen2.5_1.5b.yaml": ("HRPO hrpo_mmlu.py", {}),
    "hrpo_gsm8k.py": ("HRPO hrpo_gsm8k.py", {}),
    "hrpo_math.py": ("HRPO hrpo_math.py", {}),
    "hrpo_mmlu.py": ("HRPO hrpo_mmlu.py", {}),
}
