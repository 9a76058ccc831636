"""The per-request state of hybrid thinking, kept in vLLM's state cache (as Mamba layers keep theirs).

A decoding step mixes the token it feeds with a latent of the PREVIOUS step, so each running
request carries from one step to the next:

- ``ints``: int64 (3 + k,), [answer-marker automaton state after the tokens fed so far, the noise
  key: the call's seed folded with the tokens fed so far (``transformers.hybrid_thinking.exploration``),
  whether the kept top-k below is this request's last step's, then the k token ids of that top-k];
- ``floats``: float32 (hidden_size + k,), the final (post-norm) hidden state of its last position
  (the latent of every source is a function of it, the embedding latent through the LM head), then
  the k kept probabilities.

k is the top-k of the embedding latent (``thinking_latent_topk``), 0 without one: the model keeps the
top-k of the logits vLLM computes for sampling, so that the next step's latent needs no second LM
head (``HybridThinkingMixin.compute_logits``). In that order in each slot's bytes (vLLM packs a
layer's states back to back in one page), so that the int64 view starts 8-byte aligned whatever the
hidden size.

vLLM allocates and frees one slot per request for layers derived from ``MambaBase``; this layer
has no weights and does no computation (the model reads and writes ``kv_cache`` itself). It is
registered in ``static_forward_context`` under a name with exactly one integer, because vLLM's
cache binder derives a layer index from the name (``extract_layer_index``).
"""
from __future__ import annotations

import torch

from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaCopySpec
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from . import STATE_BACKEND

INT_SLOTS = 3  # [marker state, noise key, kept top-k ready], then the kept top-k's token ids
MARKER_SLOT = 0
NOISE_KEY_SLOT = 1
KEPT_READY_SLOT = 2


def state_shapes(hidden_size: int, topk: int = 0) -> tuple[tuple[int, ...], ...]:
    return (INT_SLOTS + topk,), (hidden_size + topk,)


STATE_DTYPES = (torch.int64, torch.float32)


def state_bytes(hidden_size: int, topk: int = 0) -> int:
    """The bytes of one request's state."""
    return sum(shape[0] * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in zip(state_shapes(hidden_size, topk), STATE_DTYPES))


def _whole_state_copy_spec(state: torch.Tensor, block_ids: list[int], cur_block_idx: int,
                           num_accepted_tokens: int) -> MambaCopySpec:
    """The whole slot of one block (what vLLM's prefix caching in align mode would copy). Prefix
    caching is refused for hybrid thinking (a cached prefix cannot carry step-wise latents), so
    this only satisfies ``IsHybrid``'s contract."""
    src = state[block_ids[cur_block_idx]]
    return MambaCopySpec(start_addr=src.data_ptr(), num_elements=src.numel())


STATE_COPY_FUNCS = (_whole_state_copy_spec, _whole_state_copy_spec)


def state_layer_name(num_hidden_layers: int) -> str:
    """The layer name: one integer, past every decoder layer's index, so that it never shares an
    index with an attention layer."""
    return f"hrpo_thinking_state.{num_hidden_layers}"


class HybridThinkingState(MambaBase):
    """The weightless layer that owns the hybrid-thinking state slots (see the module docstring)."""

    def __init__(self, hidden_size: int, prefix: str, topk: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.topk = topk
        self.prefix = prefix
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix!r} in vLLM's static forward context")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    def get_state_shape(self):
        return state_shapes(self.hidden_size, self.topk)

    def get_state_dtype(self):
        return STATE_DTYPES

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum[STATE_BACKEND]

    @property
    def hidden(self) -> torch.Tensor:
        """(slots, hidden_size) float32."""
        return self.kv_cache[1][:, :self.hidden_size]

    @property
    def ints(self) -> torch.Tensor:
        """(slots, INT_SLOTS) int64."""
        return self.kv_cache[0][:, :INT_SLOTS]

    @property
    def kept_probs(self) -> torch.Tensor:
        """(slots, topk) float32: the kept top-k probabilities of each request's last step."""
        return self.kv_cache[1][:, self.hidden_size:]

    @property
    def kept_ids(self) -> torch.Tensor:
        """(slots, topk) int64: their token ids."""
        return self.kv_cache[0][:, INT_SLOTS:]
