"""The ``vllm.LLM(...)`` keyword arguments for a hybrid-thinking model folder (shared by tests and
the trainer). Imports no vLLM, so it can be called before vLLM is.

What they set, and why:
- ``hf_overrides["architectures"]``: the plugin's hybrid architecture for the folder's one (the
  checkpoint keeps its stock name, which plain transformers and plain vLLM load);
- ``hf_overrides["layer_types"]``: a config whose ``layer_types`` are all full attention (Qwen2's)
  makes vLLM's ``ModelConfig.is_hybrid`` false and then vLLM keeps no per-request state; they are
  renamed ``HYBRID_LAYER_TYPE`` (vLLM's Llama and Qwen2 build full attention for any name but
  "sliding_attention"). Sliding-window layers are refused;
- ``hf_overrides["hrpo_latent_temperature"]``: the temperature of the softmax the embedding latent
  uses. The model does not see per-request sampling parameters; greedy decoding in the fork uses
  no temperature (1.0), sampling at T uses T;
- ``hf_overrides["hrpo_sample_noise"]``: whether a config's exploration noise is drawn (the fork draws
  it when sampling; greedy decoding drops Gaussian noise and sharpens Gumbel weights without noise);
- ``enable_prefix_caching=False``: a cached prefix skips the step-by-step mixing;
- ``scheduler_cls`` (with ``async_scheduling=False``, as that scheduler is synchronous): a
  scheduler that raises rather than preempt (a preempted request is recomputed unmixed).
"""
from __future__ import annotations

from pathlib import Path

from . import ARCHITECTURES

HYBRID_LAYER_TYPE = "hybrid_thinking_full_attention"
SCHEDULER = "hrpo.vllm_plugin.scheduler.HybridThinkingScheduler"
FULL_ATTENTION = ("full_attention", "attention")


def hybrid_hf_overrides(model: str | Path, latent_temperature: float = 1.0, sample_noise: bool = False) -> dict:
    """The hf_overrides that select the hybrid architecture (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model), local_files_only=True)
    if getattr(config, "thinking_latent_source", None) is None:
        raise ValueError(f"{model}: config.thinking_latent_source is not set; not a hybrid-thinking checkpoint")
    architectures = list(getattr(config, "architectures", None) or [])
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ValueError(f"{model}: architectures {architectures}; the vLLM plugin supports one of "
                         f"{sorted(ARCHITECTURES)}")
    if not latent_temperature > 0:
        raise ValueError(f"latent_temperature must be > 0, got {latent_temperature!r}")
    overrides = {"architectures": [ARCHITECTURES[architectures[0]]],
                 "hrpo_latent_temperature": float(latent_temperature), "hrpo_sample_noise": bool(sample_noise)}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - set(FULL_ATTENTION))
        if other:
            raise ValueError(f"{model}: layer_types {other} are not supported by the vLLM plugin (full attention only)")
        overrides["layer_types"] = [HYBRID_LAYER_TYPE] * len(layer_types)
    return overrides


def hybrid_llm_kwargs(model: str | Path, *, latent_temperature: float = 1.0, sample_noise: bool = False,
                      dtype: str = "float32", **overrides) -> dict:
    """``LLM(**hybrid_llm_kwargs(folder, ...))`` decodes the folder's hybrid model like the fork.
    ``overrides``: any other ``LLM`` argument (``max_num_batched_tokens``, ``enforce_eager``, ...);
    the settings hybrid thinking needs cannot be overridden to unsafe values."""
    kwargs = {
        "model": str(model),
        "hf_overrides": hybrid_hf_overrides(model, latent_temperature, sample_noise),
        "dtype": dtype,
        "enable_prefix_caching": False,
        "async_scheduling": False,
        "scheduler_cls": SCHEDULER,
    }
    for key in ("enable_prefix_caching", "async_scheduling", "scheduler_cls", "hf_overrides", "model"):
        if key in overrides and overrides[key] != kwargs[key]:
            raise ValueError(f"{key}={overrides[key]!r} cannot be combined with hybrid thinking "
                             f"(needs {kwargs[key]!r})")
    kwargs.update(overrides)
    return kwargs
