"""The latent options the tests run through (thinking_latent_source x thinking_latent_topk x
thinking_latent_noise) and a tiny model built with one combination."""
from __future__ import annotations

import itertools

from testing.tiny import tiny_model

# the noise scale each kind gets unless a test asks for another
NOISE_SCALES = {"none": 0.0, "gaussian": 0.5, "gumbel": 0.1}


def option_combinations():
    """Every source x top-k x noise the config allows."""
    for source, topk, noise in itertools.product(["embedding", "projection", "embedding_plus_projection"],
                                                 [None, 5], list(NOISE_SCALES)):
        if source == "projection" and (topk is not None or noise == "gumbel"):
            continue
        yield source, topk, noise


def options_model(arch, tokenizer, source, topk=None, noise="none", scale=None, **kw):
    return tiny_model(arch, tokenizer, thinking_latent_source=source, thinking_latent_topk=topk,
                      thinking_latent_noise=noise,
                      thinking_latent_noise_scale=NOISE_SCALES[noise] if scale is None else scale, **kw)
