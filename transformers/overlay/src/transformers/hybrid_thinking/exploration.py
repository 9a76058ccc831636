"""Top-k latents and exploration noise for hybrid sampling (the peers of HRPO, on its latent).

Top-k (``config.thinking_latent_topk``): the embedding-method latent from the k most
probable tokens of the sampling distribution, normalised as HRPO normalises the full one:

    w = p restricted to the top k,  latent = sum_v w_v E_v / ||w||_2

Only the k kept rows of the embedding matrix are read. The probability mass left out,
1 - sum(w), is handed back per step (a metric of what the cut loses).

Noise (``config.thinking_latent_noise`` with ``thinking_latent_noise_scale``), drawn only
while sampling (``do_sample``), never in greedy decoding:

    gaussian  h~ + sigma * N(0, I), sigma = scale * (the latent's typical norm) / sqrt(d), on
              the source's latent after its normalisation, in every source. The typical
              norm is the mean token-embedding norm (the norm of a one-hot embedding
              latent), or 1 for a projection latent of unit scale.
    gumbel    on the logits that form the embedding-method weights:
              w = softmax((log p + g) / scale), g ~ Gumbel(0, 1) per kept token, then
              normalised as above (scale is the Gumbel-softmax temperature). Only for the
              sources that use the embedding-method latent. Greedy decoding keeps the
              temperature and drops the noise, w = softmax(log p / scale): the argmax analogue
              of the sampler, so that evaluation feeds what training fed minus the noise (at a
              temperature of 0.1 the training weights are nearly one-hot, p itself is not).

The noise a rollout was fed is part of its replay data (Gaussian: ``thinking_noise``;
Gumbel: the latent it formed, in ``thinking_latents``), so the replay applies the current
gates and projection to the same noisy inputs. No gradient reaches the noise.

The draws are a counter-based function of (a seed drawn once per generate() call from
torch's RNG, the row's tokens so far, the coordinate or token id). Two rows that have
sampled the same tokens so far get the same noise at the next position, so two rollouts
with the same tokens were fed the same inputs: what lets a replay find a rollout's inputs by
its tokens. Each rollout's own noise is still an independent draw at every position (rows
with different prefixes draw independently); rows sharing a prefix share its draws. The
integer hashing is the same on every device; the float64 transforms may differ in the last
bit between devices (the replay uses the recorded values, so it is unaffected).
"""
from __future__ import annotations

import math

import torch

NOISE_KINDS = ("none", "gaussian", "gumbel")
# Noise kinds that perturb the embedding-method weights, which the projection source does not form.
WEIGHT_NOISE_KINDS = ("gumbel",)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
# Separate streams for the two kinds of draws from the same key.
_GAUSSIAN_STREAM = 0x1B873593
_GUMBEL_STREAM = 0xCC9E2D51


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    x = x ^ _shift_right(x, 30)
    x = x * _signed(_MIX_1)
    x = x ^ _shift_right(x, 27)
    x = x * _signed(_MIX_2)
    return x ^ _shift_right(x, 31)


def initial_keys(seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per row, the key of its prompt: the seed folded with each attended prompt token in
    order (padding left out, so the key does not depend on the batch's padding)."""
    device = input_ids.device
    input_ids = input_ids.cpu()  # a short loop of small integer ops: cheaper on the CPU than as device kernels
    keys = torch.full((input_ids.shape[0],), _signed(seed), dtype=torch.int64)
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    for position in range(input_ids.shape[1]):
        keys = torch.where(attended[:, position], advance_keys(keys, input_ids[:, position]), keys)
    return keys.to(device)


def advance_keys(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The keys after each row's next token."""
    return mix64(keys + (tokens.to(torch.int64) + 1) * _signed(_GOLDEN))


def _uniform(keys: torch.Tensor, counters: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform draws in (0, 1), float64, one per (row key, counter): keys (b, 1), counters (b, n) or (1, n).
    52 bits, so that (x + 0.5) / 2^52 is exact: from 2^-53 to 1 - 2^-53, never 0 or 1."""
    bits = mix64(mix64(keys ^ _signed(stream)) + (counters.to(torch.int64) + 1) * _signed(_GOLDEN))
    return uniform_from_bits(bits)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 hash values -> float64 in (0, 1), from their top 52 bits."""
    return (_shift_right(bits, 12).double() + 0.5) * 2.0 ** -52


def gaussian_draws(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Standard normal draws, (b, size) float32, by Box-Muller from the row keys."""
    half = (size + 1) // 2
    counters = torch.arange(2 * half, device=keys.device)[None, :]
    u = _uniform(keys[:, None], counters, _GAUSSIAN_STREAM)
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = 2.0 * math.pi * u[:, half:]
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return normal[:, :size].float()


def gumbel_draws(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) draws, float32, one per (row, token id): token_ids (b, k) or (1, V)."""
    u = _uniform(keys[:, None], token_ids, _GUMBEL_STREAM)
    return (-torch.log(-torch.log(u))).float()


def latent_weights(probs: torch.Tensor, topk: int | None, gumbel_temperature: float | None = None,
                   keys: torch.Tensor | None = None):
    """The weights of the embedding-method latent from the sampling distribution ``probs`` (b, V).

    Returns (weights, token_ids or None, left_out_mass): with top-k, weights and token_ids
    are (b, k) and the latent reads only those rows of the embedding matrix; without, weights
    are (b, V) over the whole vocabulary. left_out_mass (b,) float32 is the probability mass
    the kept tokens do not cover (0 for the whole vocabulary). With a Gumbel temperature the
    kept probabilities are perturbed: softmax((log p + g) / temperature), g drawn from ``keys``;
    without keys (greedy decoding) they are sharpened without noise: softmax(log p / temperature).
    """
    if topk is not None and topk < probs.shape[-1]:
        weights, token_ids = torch.topk(probs, topk, dim=-1)
        left_out = (1.0 - weights.float().sum(dim=-1)).clamp(min=0.0)
    else:
        weights, token_ids = probs, None
        left_out = torch.zeros(probs.shape[0], dtype=torch.float32, device=probs.device)
    return perturbed_weights(weights, token_ids, gumbel_temperature, keys), token_ids, left_out


def perturbed_weights(weights: torch.Tensor, token_ids: torch.Tensor | None, gumbel_temperature: float | None,
                      keys: torch.Tensor | None = None) -> torch.Tensor:
    """The kept probabilities ``weights`` (b, k) of ``token_ids`` (None: the whole vocabulary, k = V)
    under Gumbel noise (``latent_weights``): unchanged without a Gumbel temperature. Apart from the
    top-k choice, so that an engine that kept a step's top-k can perturb it at the next step."""
    if gumbel_temperature is None:
        return weights
    logits = torch.log(weights.float())
    if keys is not None:
        ids = token_ids if token_ids is not None else torch.arange(weights.shape[-1], device=weights.device)[None, :]
        logits = logits + gumbel_draws(keys, ids)
    return torch.softmax(logits / gumbel_temperature, dim=-1).to(weights.dtype)
