"""Hybrid latent reasoning (HRPO) and the learnable thinking projection, model side.

During the thinking phase the input of position p is a gated mix of the token embedding
e and a latent vector h~ carried over from the step that produced token p:

    r = sigmoid(W_r e + b_r)            thinking_residual_gate_r
    i = sigmoid(W_i e + b_i)            thinking_residual_gate_i
    a = exp(-c * softplus(-Lambda) * r) thinking_residual_Lambda, c = 8
    input = a * e + sqrt(1 - a^2 + eps) * (i * h~)

Hybrid thinking is opt-in by configuration: a model is built with thinking modules only
when ``config.thinking_latent_source`` is set (not None). A config without it builds
upstream's model exactly: no thinking modules, no thinking fields written to the config,
the same state dict and outputs. Only the modules the chosen source uses are built:
``embedding`` has no ``thinking_projection``.

Where h~ comes from is ``config.thinking_latent_source``:

    "embedding"                  HRPO: sum_v p_v E_v / ||p||_2 (computed while sampling)
    "projection"                 the seed: P(h_last) / (||P(h_last)|| + 1e-8) * scale
    "embedding_plus_projection"  HRPO's latent + P(h_last), P's last layer zero at
                                 initialisation: identical to "embedding" at step 0

Options from HRPO's peers (``exploration``): the embedding-method latent from the top-k of
the sampling distribution (``thinking_latent_topk``), and exploration noise while sampling
(``thinking_latent_noise``: Gaussian on h~, in every source; Gumbel on the weights of the
embedding-method latent), recorded with the rollout so that the replay feeds the same noise.

P is ``thinking_projection``; it is applied inside the forward, so the replay pass over
prompt + completion trains it. Its input h_last (the final hidden state of the step that
produced token p) is what generation hands back for the replay.

The gate arithmetic runs in float32 whatever the model dtype: a is close to 1, and in
bfloat16 1 - a^2 would be mostly rounding error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import initialization as init
from ..modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from .config import LATENT_SOURCES, ensure_thinking_config, thinking_enabled
from .exploration import latent_weights

LAMBDA_C = 8.0
RESIDUAL_EPS = 1e-8
PROJECTION_NORM_EPS = 1e-8

GATE_MODULES = ("thinking_residual_gate_r", "thinking_residual_gate_i")
LAMBDA_MODULE = "thinking_residual_Lambda"
PROJECTION_MODULE = "thinking_projection"
# Every thinking module a source can build; thinking_module_names() says which one builds.
THINKING_MODULES = GATE_MODULES + (LAMBDA_MODULE, PROJECTION_MODULE)
# A base model's checkpoint never holds the thinking modules: they are new by design (HRPO trains
# them; an HRPO checkpoint carries them in its adapter), so the load report does not list them as
# missing weights.
NEW_BY_DESIGN = [rf"(^|\.)({'|'.join(THINKING_MODULES)})\."]
# The keyword arguments of a forward with thinking inputs (what generation hands back for the replay).
THINKING_INPUTS = ("thinking_mask", "thinking_latents", "thinking_hidden", "thinking_noise")


def thinking_module_names(config_or_source) -> tuple[str, ...]:
    """The thinking modules a config (or a latent source name) builds, in the order of
    THINKING_MODULES: the gates and Lambda for every source, the projection for the
    projection sources, none for a config without hybrid thinking."""
    source = config_or_source if isinstance(config_or_source, str) or config_or_source is None \
        else getattr(config_or_source, "thinking_latent_source", None)
    if source is None:
        return ()
    return GATE_MODULES + (LAMBDA_MODULE,) + ((PROJECTION_MODULE,) if source != "embedding" else ())


class ThinkingResidualLambda(nn.Module):
    """Holds Lambda (a d-vector); maps the gate r to a = exp(-c * softplus(-Lambda) * r)."""

    _keys_to_ignore_on_load_missing = NEW_BY_DESIGN

    def __init__(self, hidden_size: int, r_min: float = 0.99, r_max: float = 0.999, c: float = LAMBDA_C):
        super().__init__()
        self.c = c
        self.r_min, self.r_max = r_min, r_max
        self.Lambda = nn.Parameter(torch.empty(hidden_size))
        self.reset_lambda_parameters(r_min, r_max)

    def _draw_lambda(self) -> torch.Tensor:
        """u ~ U(r_min, r_max), and the Lambda for which exp(-c softplus(-Lambda)) = u."""
        u = torch.empty(self.Lambda.shape, dtype=torch.float64, device=self.Lambda.device)
        u.uniform_(self.r_min, self.r_max)
        return (-torch.log(u.pow(-1.0 / self.c) - 1.0)).to(self.Lambda.dtype)

    @torch.no_grad()
    def reset_lambda_parameters(self, r_min: float = 0.99, r_max: float = 0.999) -> None:
        """Set Lambda afresh for u ~ U(r_min, r_max), also on a Lambda loaded from a checkpoint."""
        self.r_min, self.r_max = r_min, r_max
        self.Lambda.copy_(self._draw_lambda())

    @torch.no_grad()
    def _init_thinking_weights(self) -> None:
        # The library's init (post_init, missing keys on load): init.copy_ leaves a Lambda
        # restored from a checkpoint (flagged as initialised) as it is.
        init.copy_(self.Lambda, self._draw_lambda())

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.c * F.softplus(-self.Lambda.float()) * r.float())


class ThinkingGate(nn.Linear):
    """thinking_residual_gate_r / _i: Linear d->d with bias, run in its own dtype (its
    trainable copy may be float32 in a bfloat16 model)."""

    _keys_to_ignore_on_load_missing = NEW_BY_DESIGN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class ThinkingProjection(nn.Module):
    """thinking_projection: Linear d->d without bias (the seed), or a 2-layer MLP, with
    optional LayerNorm and Dropout after it.

    The first weight is always ``weight``, so a 1-layer projection has the seed's state-dict
    key ``thinking_projection.weight``. ``zero_output`` zero-initialises the last layer.
    """

    _keys_to_ignore_on_load_missing = NEW_BY_DESIGN

    def __init__(self, hidden_size: int, layers: int = 1, layernorm: bool = False, dropout: float = 0.0,
                 init_std: float = 0.001, zero_output: bool = False):
        super().__init__()
        self.init_std = init_std
        self.zero_output = zero_output
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.output_weight = nn.Parameter(torch.empty(hidden_size, hidden_size)) if layers == 2 else None
        self.norm = nn.LayerNorm(hidden_size) if layernorm else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._init_thinking_weights()

    @torch.no_grad()
    def _init_thinking_weights(self) -> None:
        last = self.output_weight if self.output_weight is not None else self.weight
        for param in (self.weight, self.output_weight):
            if param is None:
                continue
            if param is last and self.zero_output:
                init.zeros_(param)
            else:
                init.normal_(param, mean=0.0, std=self.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = F.linear(hidden.to(self.weight.dtype), self.weight)
        if self.output_weight is not None:
            x = F.linear(F.gelu(x), self.output_weight)
        if self.norm is not None:
            x = self.norm(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


@dataclass
class HybridModelOutputWithPast(BaseModelOutputWithPast):
    """``thinking_gate_ratio``: per position, the mean over d of the gate a where the
    input was mixed, 0 elsewhere (shape batch x length); ``thinking_hidden_ratio`` the
    same for sqrt(1 - a^2). None when no thinking mask was given."""

    thinking_gate_ratio: torch.Tensor | None = None
    thinking_hidden_ratio: torch.Tensor | None = None


@dataclass
class HybridCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``last_hidden_state``: the final (post-norm) hidden state of the last position,
    shape batch x 1 x d, when the forward was asked for it (``return_last_hidden_state``)."""

    last_hidden_state: torch.Tensor | None = None
    thinking_gate_ratio: torch.Tensor | None = None
    thinking_hidden_ratio: torch.Tensor | None = None


class HybridThinkingMixin:
    """Mixed into Qwen2Model and LlamaModel: the thinking modules and the mixing.

    The modules exist only when the config asks for hybrid thinking (``thinking_latent_source``
    set); otherwise the model is upstream's and a forward given thinking inputs is an error.
    """

    def _init_thinking_modules(self, config) -> None:
        if not thinking_enabled(config):
            return  # upstream's model: no modules, nothing written to the config
        ensure_thinking_config(config)
        d = config.hidden_size
        self.thinking_residual_gate_r = ThinkingGate(d, d, bias=True)
        self.thinking_residual_gate_i = ThinkingGate(d, d, bias=True)
        self.thinking_residual_Lambda = ThinkingResidualLambda(
            d, config.thinking_residual_r_min, config.thinking_residual_r_max)
        if PROJECTION_MODULE in thinking_module_names(config):
            self.thinking_projection = ThinkingProjection(
                d,
                layers=config.thinking_projection_layers,
                layernorm=config.thinking_projection_layernorm,
                dropout=config.thinking_projection_dropout,
                init_std=config.thinking_projection_init_std,
                zero_output=config.thinking_latent_source == "embedding_plus_projection",
            )
        self._latent_scale_cache: tuple | None = None

    @property
    def has_thinking_modules(self) -> bool:
        """Whether this model was built with hybrid thinking (its config asked for it)."""
        return LAMBDA_MODULE in self._modules

    @property
    def thinking_modules(self) -> dict[str, nn.Module]:
        """The thinking modules this model has, by name (empty without hybrid thinking)."""
        return {name: self._modules[name] for name in THINKING_MODULES if name in self._modules}

    def _require_thinking_modules(self, what: str) -> None:
        if not self.has_thinking_modules:
            raise ValueError(f"{what} needs a model built with hybrid thinking, but {type(self).__name__} was built "
                             f"from a config without thinking_latent_source (upstream's model, no thinking "
                             f"modules). Set config.thinking_latent_source to one of {LATENT_SOURCES} before the "
                             f"model is built (from_pretrained(..., config=config)), or load an HRPO checkpoint")

    def _init_weights(self, module):
        # The library's weight initialisation (post_init, missing keys on load) would draw
        # the projection and Lambda like any Linear; they keep their own explicit init.
        if hasattr(module, "_init_thinking_weights"):
            module._init_thinking_weights()
            return
        super()._init_weights(module)

    @property
    def answer_marker(self) -> str:
        return self.config.answer_marker

    @answer_marker.setter
    def answer_marker(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"answer_marker must be a non-empty string, got {value!r}")
        self.config.answer_marker = value

    @property
    def thinking_latent_source(self) -> str:
        return self.config.thinking_latent_source

    def thinking_residual(self, embeds: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated mix of token embeddings and latents: returns (mixed, a), a in float32."""
        r = torch.sigmoid(self.thinking_residual_gate_r(embeds).float())
        i = torch.sigmoid(self.thinking_residual_gate_i(embeds).float())
        a = self.thinking_residual_Lambda(r)
        mixed = a * embeds.float() + torch.sqrt(1.0 - a * a + RESIDUAL_EPS) * (i * latent.float())
        return mixed.to(embeds.dtype), a

    def embedding_latent_scale(self) -> float:
        """Typical norm of an embedding-method latent: the mean norm of a token embedding.

        (p @ E) / ||p||_2 has exactly this norm for a one-hot p, and about it for spread p.
        Cached until the embedding matrix changes; a compiled forward reads the cached value
        (the sampling loop computes it before the compiled steps).
        """
        if torch.compiler.is_compiling() and getattr(self, "_latent_scale_cache", None) is not None:
            return self._latent_scale_cache[1]  # the compiled decoding step: the loop warmed it
        weight = self.get_input_embeddings().weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if getattr(self, "_latent_scale_cache", None) is None or self._latent_scale_cache[0] != key:
            with torch.no_grad():
                value = weight.detach().float().norm(dim=-1).mean().item()
            self._latent_scale_cache = (key, value)
        return self._latent_scale_cache[1]

    def embedding_method_latent(self, probs: torch.Tensor, noise_keys: torch.Tensor | None = None):
        """HRPO's latent sum_v w_v E_v / ||w||_2 in the embedding dtype, and the probability
        mass left out (float32, per row).

        w is the sampling distribution ``probs``, or its top ``thinking_latent_topk`` tokens
        (only their embedding rows are read). With Gumbel noise configured, w becomes
        softmax((log w + g) / scale) given ``noise_keys`` (sampling), and softmax(log w / scale)
        without them (greedy decoding: the noise is dropped, its temperature kept; ``exploration``)."""
        weight = self.get_input_embeddings().weight
        gumbel = self.config.thinking_latent_noise == "gumbel"
        weights, token_ids, left_out = latent_weights(
            probs, self.config.thinking_latent_topk,
            float(self.config.thinking_latent_noise_scale) if gumbel else None, noise_keys)
        if token_ids is None:
            latent = weights.to(weight.dtype) @ weight
        else:
            latent = torch.bmm(weights.to(weight.dtype)[:, None, :], F.embedding(token_ids, weight)).squeeze(1)
        return (latent.float() / weights.float().norm(dim=-1, keepdim=True)).to(weight.dtype), left_out

    def latent_noise_std(self, source: str | None = None) -> float:
        """The per-coordinate standard deviation of Gaussian latent noise: the configured scale
        times the latent's typical norm over sqrt(d). The typical norm is the mean token-embedding
        norm (a one-hot embedding latent's norm), or 1 for a unit-scale projection latent.
        ``source``: the source actually used (default: the configured one)."""
        source = source or self.config.thinking_latent_source
        unit = source == "projection" and self.config.thinking_latent_scale == "unit"
        typical = 1.0 if unit else self.embedding_latent_scale()
        return float(self.config.thinking_latent_noise_scale) * typical / self.config.hidden_size ** 0.5

    def projection_latent(self, hidden: torch.Tensor) -> torch.Tensor:
        """The seed's latent: P(h) / (||P(h)|| + 1e-8), times the configured scale (float32)."""
        projected = self.thinking_projection(hidden).float()
        latent = projected / (projected.norm(dim=-1, keepdim=True) + PROJECTION_NORM_EPS)
        if self.config.thinking_latent_scale == "embedding":
            latent = latent * self.embedding_latent_scale()
        return latent

    def thinking_latent(self, latents: torch.Tensor | None, hidden: torch.Tensor | None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """h~ for the configured source, plus the recorded Gaussian ``noise`` when given (a
        constant: no gradient). Without ``hidden`` (no hidden state was available while
        sampling) every source falls back to the embedding-method ``latents``."""
        latent = self._source_latent(latents, hidden)
        return latent if noise is None else latent.float() + noise.float()

    def _source_latent(self, latents: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        source = self.config.thinking_latent_source
        if source != "embedding" and PROJECTION_MODULE not in self._modules:
            raise ValueError(f"thinking_latent_source={source!r} needs thinking_projection, but this model was built "
                             f"for a source without it (the source is fixed when the model is built)")
        if source == "embedding" or hidden is None:
            if latents is None:
                raise ValueError(f"thinking_latent_source={source!r} needs thinking_latents"
                                 + ("" if source == "embedding" else " or thinking_hidden"))
            return latents
        if source == "projection":
            return self.projection_latent(hidden)
        if latents is None:
            raise ValueError("thinking_latent_source='embedding_plus_projection' needs both "
                             "thinking_latents and thinking_hidden")
        return latents.float() + self.thinking_projection(hidden).float()

    def mix_thinking_inputs(self, inputs_embeds, thinking_mask=None, thinking_latents=None, thinking_hidden=None,
                            thinking_noise=None):
        """Mix the flagged positions; every other position keeps its embedding bit for bit.

        thinking_mask: (batch,) for one decoding step or (batch, length) for a replay.
        thinking_latents / thinking_hidden / thinking_noise: (batch, d) or (batch, length, d),
        aligned with it (thinking_noise: the Gaussian latent noise fed while sampling, or None).
        Returns (inputs_embeds, (gate ratio, hidden ratio) per position, or None).

        The thinking modules run even when no position is flagged (on zero rows): every thinking
        parameter then takes part in every forward that got thinking inputs, with a zero
        gradient when nothing was mixed. DDP with find_unused_parameters=False needs that of
        every differentiated forward, and ZeRO-3 (whose hooks gather a module's parameters
        when it is called) needs every rank to call the same modules in every forward. The cost
        is a copy of inputs_embeds and a few empty kernels.
        """
        if thinking_mask is None:
            return inputs_embeds, None
        self._require_thinking_modules("a forward with thinking_mask")
        batch, length = inputs_embeds.shape[:2]
        mask = thinking_mask.to(device=inputs_embeds.device, dtype=torch.bool)
        if mask.dim() == 1:
            mask = mask[:, None]
        if mask.shape != (batch, length):
            raise ValueError(f"thinking_mask has shape {tuple(thinking_mask.shape)}, expected "
                             f"({batch},) or ({batch}, {length}) to match the inputs")

        def per_position(t):
            if t is None:
                return None
            t = t.to(inputs_embeds.device)
            if t.dim() == 2:
                t = t[:, None, :]
            if t.shape[:2] != (batch, length):
                raise ValueError(f"thinking latent input has shape {tuple(t.shape)}, expected "
                                 f"({batch}, {length}, d) to match thinking_mask")
            return t[mask]

        if torch.compiler.is_compiling():
            return self._mix_every_row(inputs_embeds, mask, thinking_latents, thinking_hidden, thinking_noise)
        gate_ratio = torch.zeros(batch, length, dtype=torch.float32, device=inputs_embeds.device)
        hidden_ratio = torch.zeros_like(gate_ratio)
        any_flagged = bool(mask.any())
        latents, hidden = per_position(thinking_latents), per_position(thinking_hidden)
        noise = per_position(thinking_noise)
        if not any_flagged:  # zero rows through every module the source uses
            empty = inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
            latents = empty if latents is None else latents
            hidden = empty if hidden is None else hidden
        latent = self.thinking_latent(latents, hidden, noise)
        mixed, a = self.thinking_residual(inputs_embeds[mask], latent)
        out = inputs_embeds.clone()
        out[mask] = mixed
        a = a.detach()
        gate_ratio[mask] = a.mean(dim=-1)
        hidden_ratio[mask] = torch.sqrt(1.0 - a * a + RESIDUAL_EPS).mean(dim=-1)
        return out, (gate_ratio, hidden_ratio)


    def _mix_every_row(self, inputs_embeds, mask, thinking_latents, thinking_hidden, thinking_noise):
        """mix_thinking_inputs inside a compiled forward: every position through the modules and
        the flagged ones kept (torch.where), so that no shape depends on the mask and nothing
        waits for the host: one graph serves every decoding step. A position not flagged keeps
        its embedding bit for bit; a flagged one matches the eager path to rounding (its rows go
        through the gates in a larger batch)."""
        def per_position(t):
            if t is None:
                return None
            t = t.to(inputs_embeds.device)
            return t[:, None, :] if t.dim() == 2 else t

        latent = self.thinking_latent(per_position(thinking_latents), per_position(thinking_hidden),
                                      per_position(thinking_noise))
        mixed, a = self.thinking_residual(inputs_embeds, latent)
        out = torch.where(mask[..., None], mixed, inputs_embeds)
        a = a.detach()
        gate_ratio = torch.where(mask, a.mean(dim=-1), 0.0)
        hidden_ratio = torch.where(mask, torch.sqrt(1.0 - a * a + RESIDUAL_EPS).mean(dim=-1), 0.0)
        return out, (gate_ratio, hidden_ratio)


def thinking_ratios(thinking_ratio_pair) -> dict:
    """The output fields for the (gate ratio, hidden ratio) pair of mix_thinking_inputs."""
    gate, hidden = thinking_ratio_pair if thinking_ratio_pair is not None else (None, None)
    return {"thinking_gate_ratio": gate, "thinking_hidden_ratio": hidden}


def last_position_hidden(hidden_states: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """The last position's final hidden state (batch x 1 x d), a copy so that the full
    sequence's activations are not kept alive; None unless asked for."""
    return hidden_states[:, -1:, :].clone() if wanted else None


def thinking_model_output(output_class, thinking_ratio_pair, /, **fields):
    """A base model's output: upstream's ``output_class`` when the forward got no thinking
    inputs, else with the per-position gate ratios (HybridModelOutputWithPast)."""
    if thinking_ratio_pair is None:
        return output_class(**fields)
    return HybridModelOutputWithPast(**fields, **thinking_ratios(thinking_ratio_pair))


def thinking_causal_lm_output(output_class, backbone_outputs, final_hidden, return_last_hidden_state: bool, /,
                              **fields):
    """A causal LM's output: upstream's ``output_class`` unless the backbone mixed thinking
    inputs or the last hidden state was asked for (HybridCausalLMOutputWithPast)."""
    hybrid = {
        "last_hidden_state": last_position_hidden(final_hidden, return_last_hidden_state),
        "thinking_gate_ratio": getattr(backbone_outputs, "thinking_gate_ratio", None),
        "thinking_hidden_ratio": getattr(backbone_outputs, "thinking_hidden_ratio", None),
    }
    if all(value is None for value in hybrid.values()):
        return output_class(**fields)
    return HybridCausalLMOutputWithPast(**fields, **hybrid)
