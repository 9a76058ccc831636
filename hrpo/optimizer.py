"""The optimizer of the HRPO trainer: six parameter groups, each with its own rate.

    main (LoRA) with weight decay | main without weight decay (biases, norms)
    thinking_residual_gate_r/_i   | thinking_residual_Lambda
    thinking_projection's matrices with weight decay | its LayerNorm without weight decay

A model has only the thinking modules its latent source uses (no thinking_projection in
``embedding`` mode, none with hybrid thinking off): a group whose modules are absent is
empty, and the six groups are there all the same.

Works with whatever optimizer class the trainer's arguments choose (paged 8-bit AdamW on
CUDA, torch AdamW on CPU). Call it after building the trainer and before train().
"""
from __future__ import annotations

from transformers.hybrid_thinking.modeling import GATE_MODULES, LAMBDA_MODULE, PROJECTION_MODULE


def thinking_group(name: str) -> str | None:
    """Which thinking group a parameter name belongs to, or None for a main parameter."""
    if any(m in name for m in GATE_MODULES):
        return "gate"
    if LAMBDA_MODULE in name:
        return "lambda"
    if PROJECTION_MODULE in name:
        return "projection"
    return None


def _decays(name: str, param) -> bool:
    lowered = name.lower()
    return param.ndim >= 2 and "norm" not in lowered and not lowered.endswith(".bias")


def group_of(name: str, param) -> str:
    """The optimizer group of a trainable parameter: the projection and the main weights
    are split into decayed matrices and undecayed norms/biases."""
    group = thinking_group(name)
    if group == "projection":
        return "projection" if _decays(name, param) else "projection_no_decay"
    if group is not None:
        return group
    return "main_decay" if _decays(name, param) else "main_no_decay"


def parameter_groups(model, learning_rate: float, weight_decay: float, lr_residual_gate: float,
                     lr_residual_Lambda: float, lr_thinking_projection: float) -> list[dict]:
    """The six groups over the trainable parameters, always six and named (a group can
    be empty: with LoRA nothing trainable lacks weight decay; without
    --thinking_projection_layernorm the projection has no norm).

    Lambda gets no weight decay: decay pulls Lambda towards 0, i.e. a towards exp(-5.5 r),
    far from its initialisation in [0.99, 1]. The gates and the projection's matrices decay
    with the main weight decay (the seed's group uses args.weight_decay); the projection's
    LayerNorm weight and bias do not (decay would pull the norm's gain towards 0), as for
    the main model's norms and biases.
    """
    groups = {
        "main_decay": {"params": [], "lr": learning_rate, "weight_decay": weight_decay},
        "main_no_decay": {"params": [], "lr": learning_rate, "weight_decay": 0.0},
        "gate": {"params": [], "lr": lr_residual_gate, "weight_decay": weight_decay},
        "lambda": {"params": [], "lr": lr_residual_Lambda, "weight_decay": 0.0},
        "projection": {"params": [], "lr": lr_thinking_projection, "weight_decay": weight_decay},
        "projection_no_decay": {"params": [], "lr": lr_thinking_projection, "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[group_of(name, param)]["params"].append(param)
    return [{"name": key, **value} for key, value in groups.items()]


def patch_trainer_optimizer(trainer, lr_residual_gate: float | None = None, lr_residual_Lambda: float | None = None,
                            lr_thinking_projection: float | None = None, model=None):
    """Give ``trainer`` an optimizer with the six groups over ``model`` (default: the trainer's),
    of the class its args choose; a rate not given is the trainer's args' (HRPO's default where
    the args are a plain GRPOConfig)."""
    from transformers import Trainer

    from .config import hrpo_setting

    args = trainer.args
    model = trainer.model if model is None else model
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    rates = {"lr_residual_gate": lr_residual_gate, "lr_residual_Lambda": lr_residual_Lambda,
             "lr_thinking_projection": lr_thinking_projection}
    rates = {name: hrpo_setting(args, name) if rate is None else rate for name, rate in rates.items()}
    groups = parameter_groups(model, args.learning_rate, args.weight_decay, **rates)
    optimizer_kwargs.pop("lr", None)
    optimizer_kwargs.pop("weight_decay", None)
    trainer.optimizer = optimizer_cls(groups, **optimizer_kwargs)
    return trainer.optimizer
