"""A vLLM scheduler that refuses to preempt a hybrid-thinking request.

vLLM v1 preempts a running request when the KV cache runs out, frees its blocks and state slot,
and later recomputes prompt + completion as one prefill. Hybrid thinking cannot be recomputed that
way (each completion token was fed mixed with the latent of the step before it), so the resumed
request would continue from wrong states and its tokens would silently differ from the fork's.
This scheduler raises instead; the cure is a KV cache large enough for ``max_num_seqs`` requests
of ``max_model_len`` tokens (or fewer concurrent requests).
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler


class HybridThinkingPreemptionError(RuntimeError):
    """vLLM ran out of KV cache and would have recomputed a hybrid-thinking request unmixed."""


class HybridThinkingScheduler(Scheduler):
    """vLLM's (synchronous) scheduler, with preemption turned into an error."""

    def _preempt_request(self, request, timestamp, *args, **kwargs):
        raise HybridThinkingPreemptionError(
            f"vLLM ran out of KV cache and would preempt request {request.request_id!r}: a preempted request is "
            f"recomputed as one prefill, which cannot reproduce hybrid thinking's step-by-step latents. Give vLLM "
            f"more KV cache (VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization), or lower max_num_seqs or max_model_len")
