"""TRL's fused LM head on devices without Triton.

TRL 1.15's GRPOTrainer always computes the completions' log-probs through a fused LM head
(`trl.trainer.utils._ChunkedLogProbFunction`), whose kernel is Triton: on a CPU it fails with
"0 active drivers". unsloth's CPU mode reroutes it; the transformers backend does not import
unsloth, so on CPU it routes the kernel's slot here. CUDA keeps TRL's kernel.

The computation is the kernel's contract, in plain PyTorch, a block of rows at a time:
z = (h W^T + b) * logit_scale, soft-capped (c * tanh(z / c)) when asked, divided by the
temperature; returns (log p(target), entropy, log sum p^2, mean z, target is the first argmax),
each None unless asked (the log-probs always).
"""
from __future__ import annotations

import torch

OUTPUT_NAMES = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
ROW_ELEMENTS = 8 * 1024 * 1024  # logits per block of rows (32 MiB in float32)


def _scaled_logits(hidden, weight, bias, temperature, softcap, logit_scale):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def _block(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    logits = _scaled_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    log_z = torch.logsumexp(logits, dim=-1)
    log_p = logits - log_z.unsqueeze(-1)
    values = {"log_probs": log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
    if "entropy" in outputs:
        values["entropy"] = -(log_p.exp() * log_p).sum(-1)
    if "log_sum_sq_probs" in outputs:
        values["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1).detach()
    if "mean_logits" in outputs:
        values["mean_logits"] = logits.mean(-1).detach()
    if "is_top1" in outputs:
        values["is_top1"] = logits.argmax(-1) == targets
    return values


def chunked_log_probs(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
                      logit_scale=1.0, outputs=OUTPUT_NAMES[1:]):
    """Same arguments and results as TRL's ``ChunkedLogProbFunction.apply`` (chunk_size, a
    vocabulary tile width for the kernel, is not needed here)."""
    rows = max(1, ROW_ELEMENTS // max(1, weight.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):  # float32, as the kernel accumulates
        blocks = [_block(hidden[i:i + rows], weight, bias, targets[i:i + rows], temperature,
                         final_logit_softcapping, logit_scale, outputs)
                  for i in range(0, max(hidden.shape[0], 1), rows)]
        return tuple(torch.cat([b[name] for b in blocks]) if name in blocks[0] else None for name in OUTPUT_NAMES)


class DeviceDispatch:
    """Stands in TRL's kernel slot: the kernel where it runs (CUDA, XPU), this file elsewhere."""

    def __init__(self, kernel):
        self.kernel = kernel

    def apply(self, hidden, *args, **kwargs):
        if self.kernel is not None and hidden.device.type in ("cuda", "xpu"):
            return self.kernel.apply(hidden, *args, **kwargs)
        return chunked_log_probs(hidden, *args, **kwargs)


def route_trl_fused_head() -> bool:
    """Install DeviceDispatch in TRL's slot (idempotent); False when this TRL has no fused head."""
    from trl.trainer import utils as trl_utils

    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", "absent")
    if kernel == "absent":
        return False
    if not isinstance(kernel, DeviceDispatch):
        trl_utils._ChunkedLogProbFunction = DeviceDispatch(kernel)
    return True
