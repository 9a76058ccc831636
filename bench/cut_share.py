#!/usr/bin/env python3
"""How often a completion is cut by the length limit at step 0: the share of sampled
completions of the untrained model that have not ended by each candidate limit, on the
training prompts of a task, sampled as the trainer samples them (temperature, no other
processor, groups of completions per prompt). Picks a `max_completion_length` that does not
bind (bench/README, "Where the length binds").

--engine vllm samples them with vLLM instead of the fork's generate (as a `--use_vllm` run samples
its rollouts: one request per completion, the same neutral settings), in the environment ./setup.sh
makes with vLLM; much faster at long limits.

    python -m bench.cut_share --prompts 8 --group 4 --max-tokens 192 --threads 1   # SmolLM2 on arith
    python -m bench.cut_share --prompts 64 --group 4 --max-tokens 384 --engine vllm --threads 1
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

from bench.engine_eval import model_folder
from bench.learning import machine

LIMITS = (64, 96, 128, 160, 192, 256, 384, 512)


def ended_length(tokens: list[int], eos_token_id: int) -> int | None:
    """A completion's length in tokens including its end token, None where it had not ended."""
    return tokens.index(eos_token_id) + 1 if eos_token_id in tokens else None


def fork_lengths(folder: str, prompts: list[str], group: int, max_tokens: int, temperature: float,
                 batch: int) -> list[int | None]:
    """Completion lengths from the fork's generate, ``batch`` prompts a call, ``group`` completions each
    (greedy at temperature 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hrpo.data import left_padded
    from hrpo.sampling import NEUTRAL_SAMPLING

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    tokenizer = left_padded(AutoTokenizer.from_pretrained(folder), eos)
    sampling = dict(do_sample=True, temperature=temperature, num_return_sequences=group)
    if temperature == 0:  # greedy: generate returns one sequence per prompt, so repeat the prompts
        sampling, prompts = dict(do_sample=False), [p for p in prompts for _ in range(group)]
    lengths = []
    for first in range(0, len(prompts), batch):
        enc = tokenizer(prompts[first:first + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, **sampling, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **NEUTRAL_SAMPLING)
        lengths += [ended_length(row, tokenizer.eos_token_id) for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    return lengths


def engine_lengths(folder: str, prompts: list[str], group: int, max_tokens: int, temperature: float,
                   seed: int) -> list[int | None]:
    """Completion lengths from a vLLM engine on the plain model, one request per completion."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    from hrpo.vllm_rollouts import kv_cache_bytes

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model_len = max(map(len, ids)) + max_tokens
    requests = [{"prompt_token_ids": row} for row in ids for _ in range(group)]
    llm = LLM(model=folder, dtype="float32", seed=seed, enforce_eager=True, enable_prefix_caching=False,
              max_model_len=model_len, max_num_seqs=len(requests),
              kv_cache_memory_bytes=kv_cache_bytes(AutoConfig.from_pretrained(folder), len(requests), model_len,
                                                   "float32"))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, top_p=1.0, top_k=0, min_p=0.0,
                            repetition_penalty=1.0)
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [ended_length(list(o.outputs[0].token_ids), tokenizer.eos_token_id) for o in outputs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--dataset_path", default="generated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (the GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=0.5, help="0: greedy")
    parser.add_argument("--engine", choices=("fork", "vllm"), default="fork", help="what samples the completions")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call (the fork)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from hrpo.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = model_folder(args.model, Path(tempfile.mkdtemp(prefix="cut-share-")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = get_task(args.task)
    rows = task.with_prompts(task.load(args.dataset_path, "train")).select(range(args.prompts))
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    start = time.time()
    if args.engine == "vllm":
        lengths = engine_lengths(folder, prompts, args.group, args.max_tokens, args.temperature, args.seed)
    else:
        lengths = fork_lengths(folder, prompts, args.group, args.max_tokens, args.temperature, args.batch)
    ended = [n for n in lengths if n is not None]
    shares = {limit: sum(n is None or n > limit for n in lengths) / len(lengths)
              for limit in (*[x for x in LIMITS if x < args.max_tokens], args.max_tokens)}
    result = {"model": args.model, "task": args.task, "dataset_path": args.dataset_path, "prompts": args.prompts,
              "group": args.group, "completions": len(lengths), "temperature": args.temperature,
              "engine": args.engine, "lengths": lengths,
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
