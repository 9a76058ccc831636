#!/usr/bin/env python3
"""How closely the trainer's replay reproduces vLLM's sampling log-probs, per latent variant, against
plain GRPO's own vLLM-to-trainer gap on the same model.

For each mode ("plain" or a latent variant: testing/variants.py) a child process starts vLLM (with the
hrpo plugin for hybrid thinking, recording each rollout's replay inputs, noise drawn as when training),
samples --prompts x --group completions at --temperature, and replays every completion with the fork's
model (the same weights): the teacher-forced forward with the recorded thinking inputs, exactly what
the trainer's replay feeds (``hrpo.vllm_rollouts.replay_entries``, ``hrpo.replay.ReplayIndex``). The
gap is |replay - vLLM| over the completion tokens; the table gives its max and mean per mode and the
max against plain's.

    python -m bench.engine_replay --model smollm2 --prompts 8 --group 4 --new-tokens 64
    python -m bench.engine_replay --model tiny-qwen2 --prompts 2 --group 2 --new-tokens 8 --modes plain projection  (smoke)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.engine_rollouts import QUESTIONS, load, prompt_ids, run_child, save_folder
from testing.variants import variant_grid

MODES = ["plain", *variant_grid(64)]  # every source x top-k x noise


def child(args) -> None:
    """One mode: sample with vLLM, replay with the fork's model; prints RESULT {max, mean, tokens, thinking}."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams

    from hrpo.replay import ReplayIndex
    from hrpo.vllm_plugin.engine_args import hybrid_llm_kwargs
    from hrpo.vllm_rollouts import kv_cache_bytes, replay_entries

    torch.manual_seed(0)
    model, tokenizer = load(args.model, args.mode)
    hybrid = args.mode != "plain"
    if hybrid and model.config.thinking_latent_source == "embedding_plus_projection":
        with torch.no_grad():  # its projection starts at zero (the embedding source): drawn so that it counts
            weight = model.model.thinking_projection.weight
            weight.copy_(torch.randn_like(weight) * 0.05)
    batch = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        save_folder(model, tokenizer, Path(tmp))
        engine = dict(enforce_eager=True, max_model_len=args.max_model_len, max_num_seqs=batch, seed=0,
                      dtype="float32", enable_prefix_caching=False, logprobs_mode="processed_logprobs",
                      kv_cache_memory_bytes=kv_cache_bytes(model.config, batch, args.max_model_len, "float32"))
        llm = LLM(**(hybrid_llm_kwargs(tmp, latent_temperature=args.temperature, sample_noise=True, **engine)
                     if hybrid else engine | {"model": tmp}))
    prompts = [ids for ids in prompt_ids(tokenizer, args.prompts) for _ in range(args.group)]
    if hybrid:
        llm.apply_model(_start)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=args.temperature, max_tokens=args.new_tokens, logprobs=0),
                           use_tqdm=False)
    recorded = llm.apply_model(_take)[0] if hybrid else []
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[[lp[token].logprob] for lp, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs]
    eos = model.generation_config.eos_token_id
    index = ReplayIndex(tokenizer.pad_token_id, eos)
    if hybrid:
        entries = replay_entries(prompts, completions, logprobs, recorded, index.eos_token_ids)
    else:
        entries = plain_entries(prompts, completions, logprobs, index.eos_token_ids)
    gaps, thinking = [], 0
    for tokens, mask, sampled, latents, prompt_len in entries:
        inputs = {}
        if hybrid:  # per position, as the trainer's lookup lays them out
            index.add_rollout(tokens, mask, sampled, latents)
            inputs = index.lookup(tokens[None])
            inputs.pop("sampled_token_logprobs")
        with torch.no_grad():
            logits = model(input_ids=tokens[None], **inputs).logits[0, prompt_len - 1:-1].float() / args.temperature
        replay = torch.log_softmax(logits, dim=-1).gather(-1, tokens[prompt_len:, None]).squeeze(-1)
        gaps.append((replay - sampled[prompt_len:]).abs())
        thinking += int(mask.sum())
    gap = torch.cat(gaps)
    print("RESULT " + json.dumps({"max": float(gap.max()), "mean": float(gap.mean()), "tokens": gap.numel(),
                                  "thinking_positions": thinking}))


def plain_entries(prompts, completions, logprobs, eos_token_ids):
    """replay_entries' layout for plain rollouts (nothing mixed)."""
    import torch

    from hrpo.replay import completion_mask

    for prompt, completion, lps in zip(prompts, completions, logprobs):
        kept = int(completion_mask(torch.tensor([completion]), eos_token_ids).sum())
        tokens = torch.tensor(prompt + completion[:kept])
        sampled = torch.zeros(len(tokens))
        sampled[len(prompt):] = torch.tensor([lp[0] for lp in lps[:kept]])
        yield tokens, torch.zeros(len(tokens), dtype=torch.bool), sampled, {}, len(prompt)


def _start(model) -> None:
    model.set_noise_seed(1234)
    model.start_recording()


def _take(model):
    return model.take_recording()


def run_mode(args, mode: str) -> dict:
    return run_child("bench.engine_replay", mode, [
        "--child-mode", mode, "--model", args.model, "--prompts", str(args.prompts), "--group", str(args.group),
        "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature),
        "--max-model-len", str(args.max_model_len)], args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2, tiny-llama, smollm2, or a hub name/path")
    parser.add_argument("--prompts", type=int, default=8, help=f"at most {len(QUESTIONS)} distinct questions, repeated")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mode is not None:
        args.mode = args.child_mode
        return child(args)
    results = {"model": args.model, "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
               "temperature": args.temperature, "modes": {}}
    for mode in args.modes:
        results["modes"][mode] = run_mode(args, mode)
        if args.json:  # after every mode: a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    plain = results["modes"].get("plain", {}).get("max", float("nan"))
    print(f"\n{args.model}: {args.prompts} prompts x {args.group}, up to {args.new_tokens} tokens, temperature "
          f"{args.temperature}, float32; |replay - vLLM| log-prob over the completion tokens")
    print(f"{'mode':42s} {'max':>9s} {'mean':>9s} {'max / plain max':>15s} {'tokens':>7s} {'thinking':>8s}")
    for mode, r in results["modes"].items():
        print(f"{mode:42s} {r['max']:9.2e} {r['mean']:9.2e} {r['max'] / plain:15.2f} {r['tokens']:7d} "
              f"{r['thinking_positions']:8d}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
