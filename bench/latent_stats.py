#!/usr/bin/env python3
"""Latent statistics at initialisation, on the same rollouts:

- mean L2 norm of HRPO's embedding-method latent, of the seed's unit projection latent
  and of the scaled one (thinking_latent_scale="embedding");
- cosine similarity between embedding-method and projection-method latents at the same
  steps (the seed's monitoring suggestion).

    python -m bench.latent_stats --model smollm2
    python -m bench.latent_stats --model tiny-qwen2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.decoding import QUESTIONS, load

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer = load(args.model, args.device)
    base = model.model
    model.config.thinking_latent_source = "embedding_plus_projection"  # both sources recorded
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker="@none@",
                             do_sample=True, temperature=0.5, top_k=0, max_new_tokens=args.new_tokens)
        mask = out.thinking_mask
        embedding = out.thinking_latents[mask].float()
        hidden = out.thinking_hidden[mask]
        model.config.thinking_latent_scale = "unit"
        unit = base.projection_latent(hidden)
        model.config.thinking_latent_scale = "embedding"
        scaled = base.projection_latent(hidden)
    cosine = torch.nn.functional.cosine_similarity(embedding, unit, dim=-1)
    stats = {
        "model": args.model, "positions": int(mask.sum()),
        "embedding_latent_norm_mean": embedding.norm(dim=-1).mean().item(),
        "embedding_latent_norm_std": embedding.norm(dim=-1).std().item(),
        "unit_projection_latent_norm_mean": unit.norm(dim=-1).mean().item(),
        "scaled_projection_latent_norm_mean": scaled.norm(dim=-1).mean().item(),
        "token_embedding_norm_mean": base.embedding_latent_scale(),
        "cosine_embedding_vs_projection_mean": cosine.mean().item(),
        "cosine_embedding_vs_projection_abs_mean": cosine.abs().mean().item(),
    }
    for key, value in stats.items():
        print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        args.json.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
