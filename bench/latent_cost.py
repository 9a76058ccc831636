#!/usr/bin/env python3
"""What the embedding-method latent costs per decoding step, and what the cheaper ways give up.

On the final hidden states of real rollouts (batch rows x decoding steps of hybrid sampling
at T = 0.5), per step:

- lm_head alone (the logits every sampler computes);
- + HRPO's full-vocabulary latent, p @ E / ||p|| (a second pass over the V x d matrix);
- + the top-k latent (k rows of E), with the probability mass it leaves out and its
  relative distance to the full latent;
- a fused single pass (tied embeddings, temperature only): the logits and the latent's
  numerator, normaliser and ||p|| accumulated chunk by chunk over E with an online softmax,
  so E is read once. Exact up to rounding; its distance to the two-pass latent is reported.

    python -m bench.latent_cost --model smollm2 --batch 8
    python -m bench.latent_cost --model tiny-qwen2 --steps 4            (smoke run)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.decoding import QUESTIONS, load

TEMPERATURE = 0.5


def full_latent(probs, weight):
    return (probs @ weight) / probs.norm(dim=-1, keepdim=True)


def topk_latent(probs, weight, k):
    kept, ids = torch.topk(probs, k, dim=-1)
    latent = torch.bmm(kept[:, None, :], torch.nn.functional.embedding(ids, weight)).squeeze(1)
    return latent / kept.norm(dim=-1, keepdim=True), 1.0 - kept.sum(dim=-1)


def fused_logits_and_latent(hidden, weight, temperature, chunk):
    """One pass over E: logits = h E^T, and sum_v p_v E_v / ||p|| by an online softmax."""
    batch = hidden.shape[0]
    running_max = torch.full((batch, 1), -float("inf"))
    total = torch.zeros(batch, 1)
    squares = torch.zeros(batch, 1)
    numerator = torch.zeros(batch, weight.shape[1])
    logits = torch.empty(batch, weight.shape[0])
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk]
        block = hidden @ rows.T
        logits[:, start:start + chunk] = block
        scaled = block / temperature
        new_max = torch.maximum(running_max, scaled.max(dim=-1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        e = torch.exp(scaled - new_max)
        total = total * rescale + e.sum(dim=-1, keepdim=True)
        squares = squares * rescale ** 2 + (e * e).sum(dim=-1, keepdim=True)
        numerator = numerator * rescale + e @ rows
        running_max = new_max
    # p = e / total, so sum p E / ||p|| = (numerator / total) / (sqrt(squares) / total)
    return logits, numerator / squares.sqrt()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2, tiny-llama, smollm2, or a hub name/path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32, help="decoding steps sampled to get real hidden states")
    parser.add_argument("--topk", type=int, nargs="+", default=[5, 30, 64, 256])
    parser.add_argument("--chunk", type=int, default=4096, help="vocabulary rows per chunk of the fused pass")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer = load(args.model, "cpu")
    model.config.thinking_latent_source = "projection"  # records the final hidden state of every step
    questions = (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker="@none@",
                             do_sample=True, temperature=TEMPERATURE, top_k=0, max_new_tokens=args.steps,
                             min_new_tokens=args.steps)
    prompt_len = enc.input_ids.shape[1]
    hidden = out.thinking_hidden[:, prompt_len:-1].reshape(-1, model.config.hidden_size).float()
    head = model.get_output_embeddings().weight.detach().float()
    embedding = model.get_input_embeddings().weight.detach().float()
    tied = head.data_ptr() == embedding.data_ptr() or torch.equal(head, embedding)
    steps = hidden.split(args.batch)
    ks = [k for k in args.topk if k < embedding.shape[0]]  # a k of the whole vocabulary is the full latent
    result = {"model": args.model, "batch": args.batch, "vocab": embedding.shape[0], "d": embedding.shape[1],
              "threads": torch.get_num_threads(), "tied_embeddings": bool(tied), "rows": hidden.shape[0]}

    with torch.no_grad():
        probs_all = torch.softmax(hidden @ head.T / TEMPERATURE, dim=-1)
        full_all = full_latent(probs_all, embedding)
        quality = {}
        for k in ks:
            latent, left_out = topk_latent(probs_all, embedding, k)
            distance = (latent - full_all).norm(dim=-1) / full_all.norm(dim=-1)
            quality[k] = {"left_out_mass_median": left_out.median().item(), "left_out_mass_max": left_out.max().item(),
                          "relative_distance_median": distance.median().item(),
                          "relative_distance_max": distance.max().item()}
        result["topk"] = quality

        h = steps[0]
        probs = torch.softmax(h @ head.T / TEMPERATURE, dim=-1)
        ms = {"lm_head": 1000 * timed(lambda: h @ head.T, args.repeats),
              "full_latent": 1000 * timed(lambda: full_latent(probs, embedding), args.repeats)}
        for k in ks:
            ms[f"top{k}_latent"] = 1000 * timed(lambda k=k: topk_latent(probs, embedding, k), args.repeats)
        if tied:
            ms["fused_lm_head_and_latent"] = 1000 * timed(
                lambda: fused_logits_and_latent(h, embedding, TEMPERATURE, args.chunk), args.repeats)
            _, fused = fused_logits_and_latent(h, embedding, TEMPERATURE, args.chunk)
            reference = full_latent(probs, embedding)
            result["fused_relative_distance_max"] = ((fused - reference).norm(dim=-1)
                                                     / reference.norm(dim=-1)).max().item()
        result["ms_per_step"] = ms

    print(f"{args.model}: V={result['vocab']}, d={result['d']}, batch {args.batch}, {result['threads']} threads, "
          f"{result['rows']} rollout positions, tied embeddings: {tied}")
    print(f"\n{'per step':28s} {'ms':>8s}")
    for name, value in ms.items():
        print(f"{name:28s} {value:8.2f}")
    if "fused_relative_distance_max" in result:
        print(f"fused vs two-pass latent: relative distance max {result['fused_relative_distance_max']:.1e}")
    print(f"\n{'top-k':>6s} {'left-out mass median':>21s} {'max':>9s} {'rel. distance median':>21s} {'max':>9s}")
    for k, q in quality.items():
        print(f"{k:6d} {q['left_out_mass_median']:21.2e} {q['left_out_mass_max']:9.2e} "
              f"{q['relative_distance_median']:21.2e} {q['relative_distance_max']:9.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
