"""The thinking modules inside a vLLM model, and the latent and the mix they compute.

The modules are the fork's own (``transformers.hybrid_thinking.modeling``) and the mix is its
``thinking_residual``; the latents mirror, for inference only, ``embedding_method_latent``,
``projection_latent`` and ``_source_latent`` (which read the fork's model around them), so that
vLLM feeds the same inputs as the fork's ``generate``:

    r = sigmoid(gate_r(e)), i = sigmoid(gate_i(e)), a = exp(-8 softplus(-Lambda) r)
    input = a e + sqrt(1 - a^2 + 1e-8) (i h~)            (float32 gate arithmetic)

with h~ from the previous step's final hidden state h:

    embedding                  softmax(lm_head(h) / T) @ E / ||p||_2
    projection                 P(h) / (||P(h)|| + 1e-8)  (times the mean embedding norm if scale="embedding")
    embedding_plus_projection  the embedding latent + P(h)

The module names under ``HybridThinkingModules`` are the fork's, so a fork checkpoint's
``model.<name>.*`` weights load as ``hybrid.<name>.*``. Projection dropout is not applied (the
fork samples with the projection in eval mode). Top-k latents and
exploration noise use the fork's ``latent_weights`` and its counter-based draws
(``transformers.hybrid_thinking.exploration``): Gaussian noise on the latent, Gumbel noise on the
embedding-method weights, keyed by a per-call seed and each request's tokens so far. While the
engine samples (``hrpo_sample_noise``) the noise is drawn; otherwise, as in the fork's greedy
decoding, Gaussian noise is dropped and Gumbel weights are sharpened without noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The constants and the sources have their one home in the fork.
from transformers.hybrid_thinking.config import LATENT_SOURCES
from transformers.hybrid_thinking.exploration import gaussian_draws, latent_weights, perturbed_weights
from transformers.hybrid_thinking.modeling import (PROJECTION_NORM_EPS, HybridThinkingMixin, ThinkingGate,
                                                   ThinkingProjection, ThinkingResidualLambda)

# The checkpoint prefix of the fork's thinking modules (they live on the base model).
CHECKPOINT_PREFIX = "model."
MODULE_PREFIX = "hybrid."
THINKING_NAMES = ("thinking_residual_gate_r", "thinking_residual_gate_i", "thinking_residual_Lambda",
                  "thinking_projection")


def check_supported(config) -> None:
    """Refuse a config whose decoding this plugin would get wrong (a later milestone's options)."""
    source = getattr(config, "thinking_latent_source", None)
    if source not in LATENT_SOURCES:
        raise ValueError(f"the hybrid-thinking vLLM model needs config.thinking_latent_source in {LATENT_SOURCES}, "
                         f"got {source!r}: is this a hybrid-thinking checkpoint?")


class HybridThinkingModules(nn.Module):
    """The gates, Lambda and (projection sources) the projection, with the fork's names."""

    def __init__(self, config):
        super().__init__()
        check_supported(config)
        d = config.hidden_size
        self.source = config.thinking_latent_source
        self.scale = getattr(config, "thinking_latent_scale", "unit") or "unit"
        self.topk = getattr(config, "thinking_latent_topk", None)
        self.noise = getattr(config, "thinking_latent_noise", None) or "none"
        self.noise_scale = float(getattr(config, "thinking_latent_noise_scale", 0.0) or 0.0)
        # the fork's own modules (their math has one home); the checkpoint's weights replace their init
        self.thinking_residual_gate_r = ThinkingGate(d, d, bias=True)
        self.thinking_residual_gate_i = ThinkingGate(d, d, bias=True)
        self.thinking_residual_Lambda = ThinkingResidualLambda(d)
        if self.source != "embedding":
            self.thinking_projection = ThinkingProjection(
                d, layers=int(getattr(config, "thinking_projection_layers", 1) or 1),
                layernorm=bool(getattr(config, "thinking_projection_layernorm", False)))
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()  # as the fork samples: no projection dropout (none is built here either)

    def load(self, weights: dict[str, torch.Tensor]) -> set[str]:
        """Copy the fork checkpoint's ``model.thinking_*`` tensors in; returns the loaded parameter
        names as the vLLM model names them (``hybrid.*``). Any subset may be given (a trainer's weight
        sync may send a few parameters at a time); at start-up vLLM's loader checks that every parameter
        was loaded. Each goes through the parameter's ``weight_loader`` as in vLLM's own models, which
        vLLM's in-place reload (``reload_weights``, the trainer's sync) relies on."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights.items():
            local = name[len(CHECKPOINT_PREFIX):]
            if local not in params:
                raise ValueError(f"unexpected hybrid-thinking weight {name!r} for source {self.source!r}")
            param = params[local]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor.to(param.dtype))
            loaded.add(MODULE_PREFIX + local)
        return loaded

    def kept_weights(self, logits: torch.Tensor, temperature: float):
        """(weights, token_ids or None) of w = softmax(logits / T), or its top k, before any Gumbel noise
        (the fork's ``latent_weights``). ``logits`` (rows, V)."""
        scores = logits.float() if temperature == 1.0 else logits.float() / temperature
        weights, token_ids, _ = latent_weights(torch.softmax(scores, dim=-1), self.topk)
        return weights, token_ids

    def embedding_latent(self, kept, embedding: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """sum_v w_v E_v / ||w||_2 in the embedding dtype from ``kept_weights`` w, Gumbel-perturbed by ``keys``
        (sampling) or sharpened (without keys) under Gumbel noise (the fork's ``embedding_method_latent``)."""
        weights, token_ids = kept
        gumbel = self.noise_scale if self.noise == "gumbel" else None
        weights = perturbed_weights(weights, token_ids, gumbel, keys if gumbel is not None else None)
        if token_ids is None:
            latent = weights.to(embedding.dtype) @ embedding
        else:
            latent = torch.bmm(weights.to(embedding.dtype)[:, None, :], F.embedding(token_ids, embedding)).squeeze(1)
        return (latent.float() / weights.float().norm(dim=-1, keepdim=True)).to(embedding.dtype)

    def noise_std(self, embedding: torch.Tensor) -> float:
        """The fork's ``latent_noise_std``: the scale times the latent's typical norm (1 for a unit projection
        latent, else the mean token-embedding norm) over sqrt(d)."""
        unit = self.source == "projection" and self.scale == "unit"
        typical = 1.0 if unit else float(embedding.detach().float().norm(dim=-1).mean())
        return self.noise_scale * typical / embedding.shape[-1] ** 0.5

    def latent_inputs(self, hidden: torch.Tensor, logits_fn, embedding: torch.Tensor, temperature: float,
                      keys: torch.Tensor | None = None, kept=None) -> dict[str, torch.Tensor | None]:
        """What the configured source reads, as the fork's replay takes it: ``thinking_latents`` (the
        embedding-method latent, embedding sources), ``thinking_hidden`` (the previous step's final hidden
        states ``hidden`` (rows, d), projection sources) and ``thinking_noise`` (Gaussian noise drawn from
        the rows' noise ``keys``, given only while sampling); None where unused. The embedding latent reads
        ``kept`` (the rows' ``kept_weights`` of the previous step), else ``logits_fn(hidden)``, the LM head's
        logits over the vocabulary."""
        if self.source != "projection" and kept is None:
            kept = self.kept_weights(logits_fn(hidden), temperature)
        latents = None if self.source == "projection" else self.embedding_latent(kept, embedding, keys)
        noise = None
        if self.noise == "gaussian" and keys is not None:
            noise = gaussian_draws(keys, hidden.shape[-1]) * self.noise_std(embedding)
        return {"thinking_latents": latents, "thinking_hidden": None if self.source == "embedding" else hidden,
                "thinking_noise": noise}

    def latent(self, inputs: dict[str, torch.Tensor | None], embedding: torch.Tensor) -> torch.Tensor:
        """h~ of the configured source from its ``latent_inputs`` (plus the Gaussian noise among them)."""
        latents, hidden, noise = inputs["thinking_latents"], inputs["thinking_hidden"], inputs["thinking_noise"]
        if self.source == "embedding":
            latent = latents
        else:
            projected = self.thinking_projection(hidden).float()
            if self.source == "projection":
                latent = projected / (projected.norm(dim=-1, keepdim=True) + PROJECTION_NORM_EPS)
                if self.scale == "embedding":
                    latent = latent * embedding.detach().float().norm(dim=-1).mean()
            else:
                latent = latents.float() + projected
        return latent if noise is None else latent.float() + noise.float()

    def mix(self, embeds: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The gated mix of token embeddings (rows, d) and latents: the fork's ``thinking_residual``
        itself, on these modules (it reads only the gates and Lambda)."""
        mixed, _ = HybridThinkingMixin.thinking_residual(self, embeds, latent)
        return mixed
