"""Checks that the model a trainer is given really does hybrid thinking: its thinking modules
(``find_thinking_base``), a forward that applies the thinking inputs and hands generation the
last hidden state, and rollouts sampled with the model's latent source. A model that would
train plain GRPO while logging HRPO is an error."""
from __future__ import annotations

import torch
from transformers.hybrid_thinking.modeling import HybridThinkingMixin

from .distributed import gathered_parameters


def find_thinking_base(model) -> HybridThinkingMixin:
    for module in model.modules():
        if isinstance(module, HybridThinkingMixin):
            if not module.has_thinking_modules:
                raise ValueError(f"{type(model).__name__} was built without hybrid thinking: set the thinking fields "
                                 f"(thinking_latent_source, ...) on the config before the model is built "
                                 f"(hrpo_gsm8k.py does), or load an HRPO checkpoint")
            return module
    raise ValueError(f"{type(model).__name__} has no HRPO thinking modules: load the model with the "
                     f"transformers fork (Qwen2 or Llama)")


def verify_hybrid_forward(model, base) -> None:
    """Refuse a model whose forward ignores the thinking inputs (for instance a forward
    replaced by a fast path that does not know them): it would train plain GRPO while
    logging HRPO."""
    with gathered_parameters(model):
        _verify_hybrid_forward(model, base)


@torch.no_grad()
def _verify_hybrid_forward(model, base) -> None:
    device = next(model.parameters()).device
    input_ids = torch.tensor([[1, 2, 3, 4]], device=device)
    mask = torch.tensor([[False, False, True, True]], device=device)
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG stream alone
    latents = torch.randn(1, 4, base.config.hidden_size, device=device, generator=generator) * 10
    was_training = model.training
    model.eval()
    try:
        plain = model(input_ids=input_ids).logits
        mixed = model(input_ids=input_ids, thinking_mask=mask, thinking_latents=latents,
                      thinking_hidden=latents).logits
        noisy = model(input_ids=input_ids, thinking_mask=mask, thinking_latents=latents, thinking_hidden=latents,
                      thinking_noise=latents).logits if base.config.thinking_latent_noise == "gaussian" else None
    finally:
        model.train(was_training)
    if torch.equal(plain[:, 2:], mixed[:, 2:]):
        raise RuntimeError(f"{type(model).__name__}'s forward does not apply the HRPO thinking inputs: a forward "
                           f"that does not know them is active (unsloth without the HRPO fork's series? run "
                           f"./setup.sh), or use hrpo_gsm8k.py --backend transformers")
    if noisy is not None and torch.equal(noisy[:, 2:], mixed[:, 2:]):
        raise RuntimeError(f"{type(model).__name__}'s forward ignores thinking_noise (Gaussian latent noise is "
                           f"configured): the replay would not feed the noise that sampling fed. Run ./setup.sh "
                           f"(both forks of one version), or use hrpo_gsm8k.py --backend transformers")
    verify_hidden_state_handover(model, base, input_ids)


@torch.no_grad()
def verify_hidden_state_handover(model, base, input_ids) -> None:
    """A projection source needs the forward to hand generation the last position's hidden
    state (``return_last_hidden_state``); without it generation falls back to the embedding
    method and the projection never gets a gradient."""
    source = base.config.thinking_latent_source
    if source == "embedding":
        return
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, return_last_hidden_state=True)
    finally:
        model.train(was_training)
    if getattr(out, "last_hidden_state", None) is None:
        raise RuntimeError(f"thinking_latent_source={source!r} needs the last hidden state, but "
                           f"{type(model).__name__}'s forward returned no last_hidden_state when asked "
                           f"(return_last_hidden_state=True): a forward without the HRPO fork's hand-over is "
                           f"active (run ./setup.sh), or use hrpo_gsm8k.py --backend transformers")


def check_rollout_source(out, base) -> None:
    """Refuse rollouts sampled with another latent source than the model's (generation fell
    back to the embedding method because the forward returned no hidden state): training
    on them would leave the projection without a gradient."""
    wanted = base.config.thinking_latent_source
    if out.thinking_latent_source != wanted:
        raise RuntimeError(f"the rollouts were sampled with thinking_latent_source={out.thinking_latent_source!r}, "
                           f"but the model is configured for {wanted!r}: generation fell back because the forward "
                           f"returned no last hidden state; training on them would not train the projection")
