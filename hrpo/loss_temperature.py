"""The loss's temperature when it is not the sampling one (``--loss_temperature``; default the
sampling temperature, the policy that sampled): TRL's fused LM head built at that temperature
for every log-prob TRL scores, and the on-policy check's second look at the sampling
temperature. The checks of the setting itself are in ``hrpo.config``."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fused_head_temperature(temperature: float):
    """TRL's GRPOTrainer builds, when it is made, the fused LM head through which it scores every
    log-prob (the loss's, the old policy's, the reference's, the entropy), at its sampling
    temperature. Made inside this context, the head divides the logits by ``temperature``
    instead; sampling keeps the trainer's temperature. A trainer that builds no head is an error."""
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.add_fused_lm_head
    built = []

    def add_fused_lm_head(model, *args, **kwargs):
        kwargs["temperature"] = temperature
        built.append(model)
        return original(model, *args, **kwargs)

    grpo_module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        grpo_module.add_fused_lm_head = original
    if not built:
        raise RuntimeError(f"--loss_temperature {temperature}: TRL's GRPOTrainer built no fused LM head, so the loss "
                           f"temperature could not be applied (a TRL other than 1.15?)")


class LogProbsAlsoAt:
    """Stands in TRL's fused-LM-head kernel slot during one scoring call: the kernel's own results,
    and besides, without gradient, the log-probs of the same hidden states and tokens at
    ``temperature`` (one more pass through the LM head), in ``found``, in the order of the
    scored tokens."""

    def __init__(self, kernel, temperature: float):
        self.kernel, self.temperature, self.found = kernel, temperature, []

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
        with torch.no_grad():
            again = self.kernel.apply(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                      targets, self.temperature, chunk_size, *rest[:2], ("log_probs",))
        self.found.append(again[0].detach().float())
        return self.kernel.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)

    def per_token(self, scored: torch.Tensor) -> torch.Tensor:
        """The values in ``found`` in place: ``scored`` marks the tokens the head scored
        (rows x completion positions), in the order it scored them; zero elsewhere."""
        values = torch.cat(self.found) if self.found else torch.zeros(0)
        if values.numel() != int(scored.sum()):
            raise RuntimeError(f"the on-policy check at the sampling temperature: TRL's fused LM head scored "
                               f"{values.numel()} tokens, the completion mask has {int(scored.sum())}")
        out = torch.zeros(scored.shape, dtype=torch.float32, device=scored.device)
        out[scored] = values.to(scored.device)
        return out


@contextlib.contextmanager
def log_probs_also_at(temperature: float):
    from trl.trainer import utils as trl_utils

    kernel = trl_utils._ChunkedLogProbFunction
    also = LogProbsAlsoAt(kernel, temperature)
    trl_utils._ChunkedLogProbFunction = also
    try:
        yield also
    finally:
        trl_utils._ChunkedLogProbFunction = kernel
