"""A vLLM plugin that decodes HRPO hybrid-thinking models with stock vLLM.

Stock vLLM feeds each generated token's embedding; a hybrid-thinking model (the transformers
fork's ``hybrid_thinking``) feeds, while a completion is thinking, a gated mix of that embedding
and a latent computed from the previous decoding step. This package makes vLLM do the same
through its plugin points only (no fork, no monkeypatching):

- ``models``: ``HybridThinkingLlamaForCausalLM`` / ``HybridThinkingQwen2ForCausalLM``, subclasses
  of vLLM's models that declare themselves hybrid (``IsHybrid``) so that vLLM keeps a per-request
  state for them, load the thinking modules and mix the decode inputs;
- ``state``: the weightless state layer (a ``MambaBase``) that owns that per-request state;
- ``backend``: its metadata backend, which tells real decode rows from one-token prefill chunks;
- ``scheduler``: a scheduler that refuses preemption (vLLM would recompute a preempted request as
  one unmixed prefill);
- ``recorder``: while a trainer asks for it, each request's thinking flags and latent inputs, which
  vLLM's outputs do not carry (``hrpo.vllm_rollouts`` hands them to the trainer's replay);
- ``engine_args``: the ``LLM(...)`` keyword arguments for a hybrid model folder (no vLLM import).

``register`` is the ``vllm.general_plugins`` entry point (pyproject.toml); vLLM calls it in every
process it starts. Nothing here imports vLLM at import time, so ``hrpo`` stays importable without it.
"""
from __future__ import annotations

ARCHITECTURES = {
    "LlamaForCausalLM": "HybridThinkingLlamaForCausalLM",
    "Qwen2ForCausalLM": "HybridThinkingQwen2ForCausalLM",
}
# The name of the state backend in vLLM's mamba backend registry.
STATE_BACKEND = "HRPO_HYBRID_THINKING"


def register() -> None:
    """Register the hybrid architectures (under new names, never over the stock ones, so plain
    vLLM models are unchanged) and the state backend. Idempotent: vLLM may call it more than once."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    supported = set(ModelRegistry.get_supported_archs())
    for hybrid in ARCHITECTURES.values():
        if hybrid not in supported:
            ModelRegistry.register_model(hybrid, f"hrpo.vllm_plugin.models:{hybrid}")
    if STATE_BACKEND not in MambaAttentionBackendEnum.__members__:
        register_backend(STATE_BACKEND, "hrpo.vllm_plugin.backend.HybridThinkingStateBackend", is_mamba=True)
