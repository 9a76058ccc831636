"""The metadata backend of the hybrid-thinking state: which rows of a batch really decode.

vLLM's Mamba metadata builder sorts rows into decodes and prefills by shape, and counts a
one-token prefill chunk that already has state (a prompt split 4 + 1 by chunked prefill) as a
decode. For a Mamba layer that is harmless; for hybrid thinking it would mix a prompt token. This
builder keeps the stock metadata (vLLM's runner expects its fields) and adds, per row in batch
order: the state slot, the query offsets, and whether the row decodes: one token, and the request
past its prompt (``CommonAttentionMetadata.is_prefilling`` is False).

It refuses what it cannot do right: a row that feeds several completion tokens at once
(speculative decoding, or a preempted request recomputed as one prefill) would need the
step-by-step latents of those tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata, BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor

from . import STATE_BACKEND


class HybridThinkingStateError(RuntimeError):
    """vLLM scheduled something hybrid thinking cannot compute exactly."""


@dataclass
class HybridThinkingStateMetadata(BaseMambaAttentionMetadata):
    """The stock Mamba metadata plus, per row in batch order (``num_reqs`` rows):
    ``row_slots`` int (the state slot), ``row_query_start_loc`` (num_reqs + 1,) (the row's tokens
    in the flat batch), ``row_decoding`` bool (a real decode step: mixed if still thinking),
    ``row_prefilling`` bool (a prompt chunk: never mixed, resets the marker state)."""

    row_slots: torch.Tensor | None = None
    row_query_start_loc: torch.Tensor | None = None
    row_decoding: torch.Tensor | None = None
    row_prefilling: torch.Tensor | None = None


def classify_rows(query_start_loc_cpu: torch.Tensor, is_prefilling_cpu: torch.Tensor,
                  num_reqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoding, prefilling) per row, from the query lengths and whether each request is still
    in its prompt; raises ``HybridThinkingStateError`` for a row that feeds several completion
    tokens at once. Rows without tokens (padding) are neither."""
    query_lens = torch.diff(query_start_loc_cpu[:num_reqs + 1])
    in_prompt = is_prefilling_cpu[:num_reqs].to(torch.bool)
    decoding = (query_lens == 1) & ~in_prompt
    prefilling = (query_lens >= 1) & in_prompt
    several = (query_lens > 1) & ~in_prompt
    if bool(several.any()):
        raise HybridThinkingStateError(
            f"vLLM scheduled {int(several.sum())} request(s) to feed several completion tokens in one step "
            f"(query lengths {query_lens[several].tolist()}): speculative decoding, or a preempted request "
            f"recomputed as one prefill. Hybrid thinking mixes each completion token with the latent of the "
            f"step before it, which a parallel prefill cannot compute: disable speculative decoding and size "
            f"the KV cache so that nothing is preempted")
    return decoding, prefilling


class HybridThinkingStateMetadataBuilder(BaseMambaAttentionMetadataBuilder[HybridThinkingStateMetadata]):
    """See the module docstring."""

    metadata_cls = HybridThinkingStateMetadata
    # CUDA graphs are untested (the state update is plain eager PyTorch in the model's forward).
    _cudagraph_support = AttentionCGSupport.NEVER
    # The runner may reuse a group's metadata with only the block table swapped (update_block_table):
    # that would keep stale row_slots, so always build afresh.
    supports_update_block_table = False
    needs_causal_conv1d_metadata = False

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False, **kwargs: Any) -> HybridThinkingStateMetadata:
        if self.use_spec_decode:
            raise HybridThinkingStateError("hybrid thinking does not support speculative decoding")
        m = common_attn_metadata
        if m.is_prefilling is None:
            raise HybridThinkingStateError("vLLM's CommonAttentionMetadata.is_prefilling is None: cannot tell "
                                           "decode rows from one-token prompt chunks")
        metadata = super().build(common_prefix_len, m, fast_build, **kwargs)
        num_reqs = m.num_reqs
        decoding, prefilling = classify_rows(m.query_start_loc_cpu, m.is_prefilling.cpu(), num_reqs)
        slots = mamba_get_block_table_tensor(m.block_table_tensor, m.seq_lens, self.kv_cache_spec,
                                             self.vllm_config.cache_config.mamba_cache_mode)
        if slots.dim() == 2:
            slots = slots[:, 0]
        device = m.query_start_loc.device
        return replace(metadata,
                       row_slots=slots[:num_reqs].to(torch.long),
                       row_query_start_loc=m.query_start_loc[:num_reqs + 1].to(torch.long),
                       row_decoding=decoding.to(device),
                       row_prefilling=prefilling.to(device))


class HybridThinkingStateBackend(AttentionBackend):
    """The state layer's backend: its metadata builder; an SSM-like (stateful) backend."""

    @staticmethod
    def get_name() -> str:
        return STATE_BACKEND

    @staticmethod
    def get_builder_cls() -> type[HybridThinkingStateMetadataBuilder]:
        return HybridThinkingStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True
