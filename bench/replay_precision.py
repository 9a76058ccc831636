#!/usr/bin/env python3
"""How close can the replay get to sampling in half precision? The tolerance of
`thinking/replay_logprob_max_abs_diff` on a bf16 (or fp16) model.

On CUDA the model is bf16 (fp16 without bf16), the thinking modules float32, and TRL
scores the replay under `accelerator.autocast()`. This measures, on CPU with CPU autocast
standing in for CUDA's, the log-prob gap between hybrid sampling and the teacher-forced
replay for:

    fp32              float32 model, no autocast (the numerical floor)
    bf16, same        bf16 model, sampling and replay both under autocast (what HRPOTrainer does)
    bf16, mismatched  bf16 model, sampling without autocast, replay under it (before the trainer
                      sampled under autocast)

    python -m bench.replay_precision --model smollm2         # SmolLM2-135M-Instruct, 4 prompts, 48 tokens
    python -m bench.replay_precision --model tiny --new-tokens 8   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

QUESTIONS = ["Ava has 12 apples and gets 9 more. How many apples does Ava have now?",
             "Ben buys 4 bags with 6 cards in each bag. How many cards is that?",
             "Jo had 31 books and gave away 3. How many books are left?",
             "Dev has 7 shells and gets 15 more. How many shells does Dev have now?"]


def load(name: str, source: str):
    if name == "smollm2":
        from hrpo import smollm2

        return smollm2.load(thinking_latent_source=source)
    from testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_model("qwen2", tokenizer, hidden_size=64, thinking_latent_source=source), tokenizer


def half_precision(model, dtype):
    """The model in ``dtype`` with its thinking modules in float32, as training holds them."""
    model.to(dtype)
    for module in model.model.thinking_modules.values():
        module.float()
    return model


def gap(model, tokenizer, dtype, sample_autocast: bool, new_tokens: int, temperature: float = 0.5) -> dict:
    from testing.rollouts import replay_logprobs, thinking_inputs

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    autocast = lambda on: (torch.autocast("cpu", dtype=dtype) if on and dtype != torch.float32  # noqa: E731
                           else contextlib.nullcontext())
    torch.manual_seed(0)
    with torch.no_grad(), autocast(sample_autocast):
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, processing_class=tokenizer,
                             return_thinking_embeds=True)
    with torch.no_grad(), autocast(True):
        logps, mask, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking_inputs(out),
                                         tokenizer.eos_token_id, temperature)
    prompt_len = enc.input_ids.shape[1]
    diff = (logps - out.sampled_token_logprobs[:, prompt_len:]).abs()[mask.bool()]
    return {"max": diff.max().item(), "mean": diff.mean().item(), "tokens": diff.numel(),
            "thinking_positions": int(out.thinking_mask.sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--source", default="projection", choices=["embedding", "projection",
                                                                   "embedding_plus_projection"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load(args.model, args.source)
    results = {"fp32": gap(model.eval(), tokenizer, torch.float32, False, args.new_tokens)}
    model = half_precision(model, dtype)
    results[f"{args.dtype}, same autocast"] = gap(model, tokenizer, dtype, True, args.new_tokens)
    results[f"{args.dtype}, mismatched"] = gap(model, tokenizer, dtype, False, args.new_tokens)
    print(f"\n{args.model}, {args.source}, {len(QUESTIONS)} prompts x {args.new_tokens} tokens, T = 0.5")
    print(f"{'case':28s} {'max |dlogp|':>12s} {'mean':>10s}")
    for case, r in results.items():
        print(f"{case:28s} {r['max']:12.2e} {r['mean']:10.2e}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "source": args.source, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
