"""Subprocess entry: the fork's FastLlamaModel.get_peft_model on a bfloat16 model, on a CPU.

    python -m testing.unsloth_peft_checks <arch> <out.json>

unsloth's GPU get_peft_model (the seed's change 6 and the thinking copies' precision) runs
here with two CPU stand-ins: the check that unsloth's GPU trainer patch is in place (its CPU
mode leaves TRL's Trainer alone) and torch.cpu.empty_cache. Its fused LoRA kernels are
Triton, so the training loss goes through the model's mixing of thinking inputs (the
transformers fork's mix_thinking_inputs, which both backends call), not the whole forward.
Writes the thinking copies' dtypes and Lambda's change after 5 AdamW steps (lr 1e-3) as JSON.
Run in its own process: unsloth patches model classes for the whole process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo import LORA_TARGETS
from testing.tiny import tiny_model, tiny_tokenizer



def main(arch: str, out: str) -> None:
    from testing import unsloth_cpu

    fast = unsloth_cpu.install()
    import unsloth.device_type as device_type
    from transformers.trainer import Trainer

    Trainer._inner_training_loop.__name__ = "_fast_inner_training_loop"  # stand-in: no GPU trainer patch on CPU
    if not hasattr(device_type._DEVICE_MODULE, "empty_cache"):
        device_type._DEVICE_MODULE.empty_cache = lambda: None

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection").to(torch.bfloat16)
    unsloth_cpu.prepare_like_from_pretrained(model, tokenizer)
    model = fast.FastLlamaModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                               modules_to_save=list(THINKING_MODULES), use_gradient_checkpointing=False)
    copies, originals = {}, {}
    for name, module in model.named_modules():
        if hasattr(module, "modules_to_save") and name.rsplit(".", 1)[-1] in THINKING_MODULES:
            leaf = name.rsplit(".", 1)[-1]
            copies[leaf] = sorted({str(p.dtype) for p in module.modules_to_save["default"].parameters()})
            originals[leaf] = sorted({str(p.dtype) for p in module.original_module.parameters()})
    base = model.get_base_model().model
    lam = base.thinking_residual_Lambda.modules_to_save["default"].Lambda
    params = [p for n, p in model.named_parameters() if p.requires_grad and "thinking" in n]
    torch.manual_seed(0)
    embeds = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    hidden = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    target = torch.randn(2, 6, 32)
    before = lam.detach().clone()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(5):
        optimizer.zero_grad()
        mixed, _ = base.mix_thinking_inputs(embeds, mask, None, hidden)
        loss = (mixed.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    Path(out).write_text(json.dumps({
        "copies": copies, "originals": originals, "lambda_dtype": str(lam.dtype),
        "lambda_requires_grad": lam.requires_grad,
        "lambda_change": (lam.detach().float() - before.float()).abs().max().item(),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
