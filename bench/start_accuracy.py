#!/usr/bin/env python3
"""Where an untrained model starts on a task: greedy held-out accuracy and the share of problems
it answers at all (writes the answer marker), for each data source and system prompt. GRPO
learns only from groups whose rewards differ, so a recipe wants a start between about 0.1 and
0.4; this picks the data (a reasoning-gym generator and its configuration) before any training.

Rows are the held-out split as evaluation draws it (for reasoning-gym, with problems that are
also training problems dropped), decoded as hrpo-eval decodes a base model: plain tokens,
greedy, the task's prompt with the given system prompt.

    python -m bench.start_accuracy --sources "products:1000,min_digits=1,max_digits=2" gsm_symbolic \\
        --system_prompts hrpo tutor --samples 64 --threads 1          # SmolLM2
    python -m bench.start_accuracy --model tiny --sources "chain_sum,max_digits=1" --samples 2 --max_new_tokens 4

Prints a table and writes --json if given.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.learning import load_base_model, machine


def start_accuracy(model, tokenizer, task, source: str, system_prompt: str, samples: int, max_new_tokens: int) -> dict:
    from hrpo.held_out import evaluate_rows

    held_out = task.load(source, "test")
    rows = held_out.select(range(min(samples, len(held_out)))).to_list()
    result = evaluate_rows(model, tokenizer, task, rows, system_prompt=system_prompt, thinking=False, greedy=True,
                           temperature=1.0, max_new_tokens=max_new_tokens)
    answered = sum(example["predicted"] is not None for example in result["examples"])
    return {"source": source, "system_prompt": system_prompt, "held_out_rows": len(held_out), "evaluated": len(rows),
            "accuracy": result["metrics"]["accuracy"], "answered": answered / max(len(rows), 1),
            "seconds": result["metrics"]["seconds"],
            "first_completion": result["examples"][0]["completion"] if rows else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--task", default="reasoning_gym")
    parser.add_argument("--sources", nargs="+", required=True, help="data sources of the task (--dataset_name values)")
    parser.add_argument("--system_prompts", nargs="+", default=["hrpo"])
    parser.add_argument("--samples", type=int, default=64, help="held-out problems per source")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from hrpo.tasks import get_task

    task = get_task(args.task)
    for source in args.sources:  # bad sources fail here, before the model loads
        task.load(source, "test")
    model, tokenizer = load_base_model(args.model, args.threads, "start-accuracy-")
    start, results = time.time(), []
    print(f"{'source':58s} {'prompt':7s} {'rows':>5s} {'accuracy':>8s} {'answered':>8s}")
    for source in args.sources:
        for prompt in args.system_prompts:
            row = start_accuracy(model, tokenizer, task, source, prompt, args.samples, args.max_new_tokens)
            results.append(row)
            print(f"{source:58s} {prompt:7s} {row['evaluated']:5d} {row['accuracy']:8.3f} {row['answered']:8.3f}",
                  flush=True)
            if args.json:
                args.json.write_text(json.dumps(
                    {"model": args.model, "task": args.task, "samples": args.samples,
                     "max_new_tokens": args.max_new_tokens, "results": results, "threads": args.threads,
                     "seconds": round(time.time() - start, 1), "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
