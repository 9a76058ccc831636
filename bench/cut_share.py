#!/usr/bin/env python3
"""How often a completion is cut by the length limit at step 0: the share of sampled
completions of the untrained model that have not ended by each candidate limit, on the
training prompts of a task, sampled as the trainer samples them (temperature, no other
processor, groups of completions per prompt). Picks a `max_completion_length` that does not
bind (bench/README, "Where the length binds").

    python -m bench.cut_share --prompts 8 --group 4 --max-tokens 192 --threads 1   # SmolLM2 on arith
    python -m bench.cut_share --model tiny --prompts 2 --group 2 --max-tokens 8     # smoke run

Prints the share cut at each limit up to --max-tokens and writes --json if given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.learning import load_base_model, machine

LIMITS = (64, 96, 128, 160, 192, 256, 384, 512)


def completion_lengths(model, tokenizer, prompts: list[str], group: int, max_tokens: int, temperature: float,
                       batch: int) -> list[int | None]:
    """Each completion's length in tokens including its end token, None where it had not ended."""
    import torch

    from hrpo.sampling import NEUTRAL_SAMPLING

    lengths = []
    for first in range(0, len(prompts), batch):
        enc = tokenizer(prompts[first:first + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=max_tokens,
                                 num_return_sequences=group, pad_token_id=tokenizer.pad_token_id,
                                 **NEUTRAL_SAMPLING)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token == tokenizer.eos_token_id]
            lengths.append(ends[0] + 1 if ends else None)
    return lengths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--dataset_path", default="generated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (the GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from hrpo.tasks import get_task

    torch.manual_seed(args.seed)
    model, tokenizer = load_base_model(args.model, args.threads, "cut-share-")
    task = get_task(args.task)
    rows = task.with_prompts(task.load(args.dataset_path, "train")).select(range(args.prompts))
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    start = time.time()
    lengths = completion_lengths(model, tokenizer, prompts, args.group, args.max_tokens, args.temperature, args.batch)
    ended = [n for n in lengths if n is not None]
    shares = {limit: sum(n is None or n > limit for n in lengths) / len(lengths)
              for limit in (*[x for x in LIMITS if x < args.max_tokens], args.max_tokens)}
    result = {"model": args.model, "task": args.task, "dataset_path": args.dataset_path, "prompts": args.prompts,
              "group": args.group, "completions": len(lengths), "temperature": args.temperature,
              "max_tokens": args.max_tokens, "seed": args.seed, "cut_share": shares,
              "ended_length_median": statistics.median(ended) if ended else None,
              "seconds": round(time.time() - start, 1), "threads": args.threads, "machine": machine()}
    print(f"{len(lengths)} completions ({args.prompts} prompts x {args.group}), T = {args.temperature}:")
    for limit, share in shares.items():
        print(f"  cut at {limit:4d} tokens: {share:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
