#!/usr/bin/env python3
"""Rollout time of a GRPO generation batch: vLLM (with the hrpo plugin for hybrid thinking) against
plain vLLM and against the fork's hybrid generate (eager, and compiled with --compile).

A batch is --prompts prompts x --group completions, sampled at --temperature with a forced number of
new tokens (EOS ignored), as TRL's colocate mode asks vLLM for them (one request per completion).
Each vLLM mode runs in a child process of its own (an engine per process; its error is shown); the
engine starts and decodes once untimed before --repeats timed batches. The table gives medians,
tokens per second, each mode against plain vLLM and the fork's hybrid generate against vLLM hybrid
in the same source.

On a machine whose speed drifts (other work, clocks), --rounds R runs every path R times in turn, the
order reversed every other round, and also gives each path's ratio to plain vLLM within each round
(paired: both measured minutes apart) as the median and range over rounds.

A mode is "plain" or a latent variant (testing/variants.py): a source, with "+topK" for a top-k latent
and "+gaussian" / "+gumbel" for exploration noise (drawn, as when training).

    python -m bench.engine_rollouts --model smollm2 --prompts 8 32 --group 4 --new-tokens 256
    python -m bench.engine_rollouts --model smollm2 --prompts 8 --new-tokens 64 --hf --compile
    python -m bench.engine_rollouts --model smollm2 --prompts 8 --modes plain embedding+top64 --repeats 2 --rounds 3
    python -m bench.engine_rollouts --model tiny-qwen2 --prompts 2 --group 2 --new-tokens 4 --repeats 1  (smoke)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ["plain", "projection", "embedding", "embedding+top64"]
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 12 times 3?",
             "A box holds 5 pens. How many pens are in 4 boxes?", "Sara reads 9 pages a day for 6 days.",
             "What is 250 minus 75?", "A bus has 30 seats and 12 are taken. How many are free?",
             "Half of 84 is what?", "Each of 7 bags has 8 marbles. How many marbles?"]


def load(name: str, mode: str):
    """(model, tokenizer) in float32: the plain model for "plain", else with the mode's thinking fields."""
    import torch

    from testing.variants import latent_variant

    fields = {} if mode == "plain" else latent_variant(mode)
    if name.startswith("tiny-"):
        from testing.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        # hidden 128: head size 32, the smallest vLLM's CPU attention takes
        return tiny_model(name.split("-", 1)[1], tokenizer, hidden_size=128, hybrid=bool(fields), **fields), tokenizer
    if name == "smollm2":
        from hrpo import smollm2

        model, tokenizer = smollm2.load(**fields)
        if hasattr(model.config, "quantization_config"):  # loaded from the GGUF: save as a plain checkpoint
            del model.config.quantization_config
        return model, tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name)
    for key, value in fields.items():
        setattr(config, key, value)
    return (AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(name, padding_side="left"))


def prompt_ids(tokenizer, prompts: int) -> list[list[int]]:
    questions = (QUESTIONS * (prompts // len(QUESTIONS) + 1))[:prompts]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                          return_dict=False) for q in questions]


def save_folder(model, tokenizer, folder: Path) -> Path:
    """A checkpoint folder vLLM can start from (the plugin reads the thinking fields from its config)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}[type(model).__name__]
    plain = cls(model.config)  # a GGUF-loaded model refuses save_pretrained: copy into a fresh one
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vllm_child(args) -> None:
    """One vLLM mode: start the engine, decode once untimed, then --repeats timed batches; prints JSON."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from hrpo.vllm_plugin.engine_args import hybrid_llm_kwargs
    from hrpo.vllm_rollouts import kv_cache_bytes

    model, tokenizer = load(args.model, args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_folder(model, tokenizer, Path(tmp))
        config = model.config
        del model
        batch = args.prompts * args.group
        engine = dict(enforce_eager=True, max_model_len=args.max_model_len, max_num_seqs=batch, seed=0,
                      dtype="float32", enable_prefix_caching=False,
                      kv_cache_memory_bytes=kv_cache_bytes(config, batch, args.max_model_len, "float32"))
        start = time.perf_counter()
        llm = LLM(**(engine | {"model": str(folder)} if args.mode == "plain" else
                     hybrid_llm_kwargs(folder, latent_temperature=args.temperature, sample_noise=True,
                                       **engine)))
        startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(tokenizer, args.prompts) for _ in range(args.group)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.new_tokens, ignore_eos=True, logprobs=0)
    times = []
    for repeat in range(args.repeats + 1):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
        if repeat:  # the first batch warms up
            times.append(elapsed)
    print("RESULT " + json.dumps({"startup_s": startup, "times": times}))


def hf_times(args, mode: str, compiled: bool) -> list[float]:
    """The fork's hybrid generate (or upstream's for "plain") on the same batch, left-padded."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(args.model, mode)
    model.to(device)
    rows = [ids for ids in prompt_ids(tokenizer, args.prompts) for _ in range(args.group)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs = {} if mode == "plain" else {"processing_class": tokenizer}
    if compiled:
        from bench.decoding import compile_config

        kwargs.update(cache_implementation="static", compile_config=compile_config(device, args.compile_backend))
    times = []
    for repeat in range(args.repeats + 1):
        torch.manual_seed(repeat)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=attention, do_sample=True, temperature=args.temperature,
                                 top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        assert sequences.shape[1] - width == args.new_tokens
        if repeat:
            times.append(elapsed)
    return times


def run_child(module: str, what: str, argv: list[str], timeout: int) -> dict:
    """``python -m module argv`` (a bench's child), its RESULT line parsed; its stderr shown if it fails."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{what} child failed (exit {proc.returncode}); its stderr is above")
    return json.loads(result.removeprefix("RESULT "))


def run_vllm_child(args, mode: str, prompts: int) -> dict:
    return run_child("bench.engine_rollouts", f"vLLM {mode}", [
        "--child-mode", mode, "--model", args.model, "--prompts", str(prompts), "--group", str(args.group),
        "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--temperature", str(args.temperature),
        "--max-model-len", str(args.max_model_len)], args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2, tiny-llama, smollm2, or a hub name/path")
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every path this many times in turn (paired ratios)")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--hf", action="store_true", help="also the fork's hybrid generate (eager) in each mode")
    parser.add_argument("--compile", action="store_true", help="with --hf: also compiled (static cache)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per vLLM child")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mode is not None:
        args.mode, args.prompts = args.child_mode, args.prompts[0]
        return vllm_child(args)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats: expected at least 1")

    results = {"model": args.model, "group": args.group, "new_tokens": args.new_tokens, "temperature": args.temperature,
               "repeats": args.repeats, "rounds": args.rounds, "cpus": os.cpu_count(), "runs": {}}
    for prompts in args.prompts:
        run = {}
        results["runs"][str(prompts)] = run
        for round_index in range(args.rounds):
            for key, measure in paths(args, prompts, reverse=round_index % 2 == 1):
                measured = measure()
                entry = run.setdefault(key, {"times": [], "rounds": []})
                entry["times"] += measured["times"]
                entry["rounds"].append(statistics.median(measured["times"]))
                if "startup_s" in measured:
                    entry.setdefault("startup_s", []).append(measured["startup_s"])
                if args.json:  # after every path: a long run that is stopped keeps what it measured
                    args.json.write_text(json.dumps(results, indent=2))
        print_table(run, prompts, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


def paths(args, prompts: int, reverse: bool) -> list:
    """(table key, a function that measures it) for every path asked for, in order (reversed if asked)."""
    hf_args = argparse.Namespace(**{**vars(args), "prompts": prompts})
    found = []
    for mode in args.modes:
        found.append((f"vllm {mode}", lambda mode=mode: run_vllm_child(args, mode, prompts)))
        if args.hf:
            found.append((f"hf {mode}", lambda mode=mode: {"times": hf_times(hf_args, mode, compiled=False)}))
            if args.compile:
                found.append((f"hf-compiled {mode}", lambda mode=mode: {"times": hf_times(hf_args, mode, compiled=True)}))
    return found[::-1] if reverse else found


def print_table(run: dict, prompts: int, args) -> None:
    tokens = prompts * args.group * args.new_tokens
    median = {key: statistics.median(value["times"]) for key, value in run.items()}
    print(f"\n{args.model}: {prompts} prompts x {args.group}, {args.new_tokens} new tokens, temperature "
          f"{args.temperature}, median of {args.repeats * args.rounds}"
          + (f" ({args.repeats} in each of {args.rounds} rounds)" if args.rounds > 1 else ""))
    print(f"{'path and mode':32s} {'s':>8s} {'tokens/s':>9s} {'x vllm plain':>12s} {'x vllm same mode':>16s}"
          + ("  paired x vllm plain over rounds: median [min, max]" if args.rounds > 1 else ""))
    plain = median.get("vllm plain", float("nan"))
    for key, m in median.items():
        same = median.get("vllm " + key.split(" ", 1)[1], float("nan"))
        line = f"{key:32s} {m:8.2f} {tokens / m:9.1f} {m / plain:12.3f} {m / same:16.3f}"
        if args.rounds > 1 and "vllm plain" in run:
            ratios = [t / p for t, p in zip(run[key]["rounds"], run["vllm plain"]["rounds"])]
            line += f"  {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
        print(line)
    for key, value in run.items():
        if "startup_s" in value:
            starts = ", ".join(f"{s:.1f}" for s in value["startup_s"])
            print(f"  {key}: engine start {starts} s (not timed above)")


if __name__ == "__main__":
    main()
