"""Latent variants by name, for the benches and checks: a latent source with options of
HRPO's peers, "source[+topK][+gaussian|+gumbel]" (e.g. "embedding+top5+gumbel")."""
from __future__ import annotations

SOURCES = ("embedding", "projection", "embedding_plus_projection")
# the noise scales the variants use: Gaussian relative to the latent norm, the Gumbel temperature of SofT-GRPO
NOISE_SCALES = {"gaussian": 0.33, "gumbel": 0.1}


def latent_variant(name: str) -> dict:
    """The thinking config fields of a variant name; ValueError naming what is wrong."""
    source, *options = name.split("+")
    if source not in SOURCES:
        raise ValueError(f"variant {name!r}: expected one of {SOURCES}, then +topK, +gaussian or +gumbel")
    fields = {"thinking_latent_source": source, "thinking_latent_topk": None, "thinking_latent_noise": "none",
              "thinking_latent_noise_scale": 0.0}
    for option in options:
        if option.startswith("top") and option[3:].isdigit():
            fields["thinking_latent_topk"] = int(option[3:])
        elif option in NOISE_SCALES:
            fields["thinking_latent_noise"], fields["thinking_latent_noise_scale"] = option, NOISE_SCALES[option]
        else:
            raise ValueError(f"variant {name!r}: unknown option {option!r} (topK, gaussian, gumbel)")
    return fields


def variant_grid(topk: int = 64) -> list[str]:
    """Every source x (whole vocabulary, top-k) x noise the config accepts: top-k and Gumbel noise
    only where the embedding-method latent is used."""
    grid = []
    for source in SOURCES:
        embedding = source != "projection"
        for top in ([None, topk] if embedding else [None]):
            for noise in ["none", "gaussian", *(["gumbel"] if embedding else [])]:
                grid.append("+".join([source, *([f"top{top}"] if top else []), *([noise] if noise != "none" else [])]))
    return grid
