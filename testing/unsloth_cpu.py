"""Run unsloth's CUDA model code (the fast forward paths of unsloth.models.llama) on a CPU.

unsloth's fast paths call a few Triton kernels (RMSNorm, RoPE) and keep per-CUDA-device RoPE
caches. Here those are swapped for plain PyTorch stand-ins that compute the textbook formulas,
so that everything else in the fast paths (our HRPO wiring included) runs unchanged on a CPU.
The kernels themselves are unsloth's to test, on a GPU (`gpu_checks.sh`).

Importing `unsloth.models.llama` patches transformers' and TRL's classes for the whole process,
so call `install` only in a process of its own: the tests run `testing.unsloth_fast_checks`,
`testing.unsloth_grpo_checks` and `testing.unsloth_peft_checks` as subprocesses.
`load_hybrid_thinking_helpers` patches nothing and can be called anywhere.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

UNSLOTH_MODELS = Path(__file__).resolve().parent.parent / "unsloth" / "tree" / "unsloth" / "models"


def load_hybrid_thinking_helpers():
    """The unsloth fork's helpers (``unsloth/models/hybrid_thinking.py``) loaded on their own:
    ``unsloth.models`` cannot be imported without Triton (CPU machines)."""
    spec = importlib.util.spec_from_file_location("hybrid_thinking_helpers", UNSLOTH_MODELS / "hybrid_thinking.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rms_norm(layernorm, X, gemma=False, save_output=False, reuse_grad=False):
    eps = getattr(layernorm, "variance_epsilon", getattr(layernorm, "eps", 1e-6))
    weight = layernorm.weight.float() + (1.0 if gemma else 0.0)
    Xf = X.float()
    out = Xf * torch.rsqrt(Xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight).to(X.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(Q, K, cos, sin, position_ids=None):
    """Q, K: (batch, heads, seq, head_dim); cos/sin: (rows, head_dim) tables."""
    seq = Q.shape[2]
    if position_ids is None:
        c, s = cos[:seq][None, None], sin[:seq][None, None]
    else:
        position_ids = position_ids.reshape(-1, seq).long()
        c, s = cos[position_ids][:, None], sin[position_ids][:, None]
    c, s = c.to(Q.dtype), s.to(Q.dtype)
    return Q * c + rotate_half(Q) * s, K * c + rotate_half(K) * s


class RopeTables(nn.Module):
    """Stand-in for unsloth's per-device RoPE cache: the same interface, one CPU table."""

    def __init__(self, config):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.current_rope_size = config.max_position_embeddings

    def extend_rope_embedding(self, x, seq_len, materialize_len=None):
        if seq_len > self.current_rope_size:
            raise ValueError(f"RopeTables: {seq_len} positions asked, {self.current_rope_size} built")

    def get_cached(self, seq_len=None, device_index=None):
        return self.cos, self.sin


def install():
    """Import unsloth's GPU model code and put the CPU stand-ins in place. Returns the module."""
    import unsloth  # noqa: F401  (first, as unsloth requires)
    import unsloth.models.llama as fast

    fast.fast_rms_layernorm = rms_norm
    fast.fast_rope_embedding = rope
    fast.DEVICE_COUNT = 1  # per-device decode scratch: one device, the CPU
    fast.FastLlamaModel.pre_patch()
    from unsloth.models.qwen2 import FastQwen2Model
    FastQwen2Model.pre_patch()
    return fast


def use_rope_tables(model):
    """Give the model and each attention module CPU RoPE tables."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tables = RopeTables(base.config)
    base.model.rotary_emb = tables
    for layer in base.model.layers:
        layer.self_attn.rotary_emb = tables
    return model


def prepare_like_from_pretrained(model, tokenizer=None, max_seq_length: int = 512):
    """What FastLlamaModel.from_pretrained does to a loaded model that the fast paths rely on:
    `max_seq_length` on every module, CPU RoPE tables, and unsloth's generate wrapper."""
    import types

    import unsloth.models.llama as fast

    for module in model.modules():
        module.max_seq_length = max_seq_length
    model.config.dtype = next(model.parameters()).dtype  # the fast paths read the dtype from the config
    use_rope_tables(model)
    if model.generate.__name__ != "unsloth_fast_generate":
        model._old_generate = model.generate
        model.generate = types.MethodType(fast.unsloth_fast_generate, model)
    if tokenizer is not None:
        model._saved_temp_tokenizer = tokenizer
    return model


def peft_like_get_peft_model(model, modules_to_save, r: int = 4):
    """A LoRA model shaped like FastLlamaModel.get_peft_model's, as far as the GRPO rewrite
    reads it: plain PEFT LoRA on the seven projections (unsloth's fused LoRA kernels are
    Triton), the thinking copies prepared by the fork's helper, and the for_training /
    for_inference switches the rewritten trainer calls."""
    import functools

    from peft import LoraConfig, get_peft_model

    import unsloth.models.llama as fast
    from unsloth.models.hybrid_thinking import prepare_thinking_modules_for_training

    from hrpo import LORA_TARGETS

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             modules_to_save=list(modules_to_save)))
    prepare_thinking_modules_for_training(model)
    model.for_training = functools.partial(fast.FastLlamaModel.for_training, model)
    model.for_inference = functools.partial(fast.FastLlamaModel.for_inference, model)
    return model
