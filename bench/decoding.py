#!/usr/bin/env python3
"""Decoding time: plain upstream sampling vs hybrid sampling in each latent mode, with the
full-vocabulary latent and with top-k, with and without exploration noise.

Same model, batch, prompts and a forced number of new tokens (EOS disabled); each
variant runs --repeats times interleaved, the table shows medians and ratios to plain
sampling (and to the full-vocabulary embedding mode). Writes JSON with every timing.

A mode is "plain" or a latent variant (testing/variants.py): a source with "+topK" (top-k
latent), "+gaussian" / "+gumbel" (noise at scale 0.33 / temperature 0.1), e.g. "embedding+top5+gumbel".

    python -m bench.decoding --model tiny-qwen2 --new-tokens 128 512
    python -m bench.decoding --model smollm2 --batch 8 --new-tokens 256
    python -m bench.decoding --model smollm2 --modes plain embedding embedding+top64 embedding+top64+gumbel
    python -m bench.decoding --model Qwen/Qwen2.5-1.5B-Instruct --device cuda   (any HF model)

--compile: each mode also through transformers' compiled decoding step (a static cache,
torch.compile with upstream's CompileConfig; CUDA graphs on a GPU, on the CPU compiled because
asked for), after a warm-up that compiles it; the table adds compiled/eager per mode, the ratio
to plain compiled, and the host syncs per new token of each path (testing/host_syncs.py:
tensor-to-host calls over a whole generate() call, so prefill and output assembly are spread
over the tokens).

    python -m bench.decoding --model smollm2 --batch 8 --new-tokens 256 --compile
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from testing.host_syncs import counted_host_syncs
from testing.variants import latent_variant

REPO = Path(__file__).resolve().parent.parent

COMPILE_MODES = ["plain", "embedding", "embedding+top64", "projection"]
MODES = ["plain", "embedding", "embedding+top64", "embedding+top5", "embedding+top64+gumbel", "embedding+gaussian",
         "projection", "projection+gaussian", "embedding_plus_projection", "embedding_plus_projection+top64"]


def mode_name(mode: str) -> str:
    if mode != "plain":
        try:
            latent_variant(mode)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return mode
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 12 times 3?",
             "A box holds 5 pens. How many pens are in 4 boxes?", "Sara reads 9 pages a day for 6 days.",
             "What is 250 minus 75?", "A bus has 30 seats and 12 are taken. How many are free?",
             "Half of 84 is what?", "Each of 7 bags has 8 marbles. How many marbles?"]


def load(name: str, device: str):
    """The model built with hybrid thinking in the projection source, so that it has every
    thinking module; the runs switch config.thinking_latent_source between the sources."""
    if name.startswith("tiny-"):
        from testing.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_model(name.split("-", 1)[1], tokenizer, hidden_size=256,
                          thinking_latent_source="projection"), tokenizer
    if name == "smollm2":
        from hrpo import smollm2

        return smollm2.load(thinking_latent_source="projection")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(name)
    config.thinking_latent_source = "projection"
    return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype).to(device).eval(), tokenizer


def compile_config(device: str, backend: str):
    from transformers import CompileConfig

    # upstream's defaults: inductor, reduce-overhead (CUDA graphs on a GPU)
    config = CompileConfig() if backend == "inductor" else CompileConfig(backend=backend, mode=None)
    config._compile_all_devices = device != "cuda"  # upstream compiles on accelerators only
    return config


def run_once(model, tokenizer, enc, mode: str, new_tokens: int, compiled=None) -> float:
    kwargs = {}
    if mode != "plain":
        for key, value in latent_variant(mode).items():
            setattr(model.config, key, value)
        kwargs = {"processing_class": tokenizer, "return_thinking_embeds": True}
    if compiled is not None:
        kwargs.update(cache_implementation="static", compile_config=compiled)
    torch.manual_seed(0)
    if enc.input_ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=0.5, top_k=0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, **kwargs)
    if enc.input_ids.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert sequences.shape[1] - enc.input_ids.shape[1] == new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2, tiny-llama, smollm2, or a hub name/path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=None, type=mode_name,
                        help="plain, or a latent source with options: +topK, +gaussian, +gumbel (default: "
                             f"{' '.join(MODES)}; with --compile {' '.join(COMPILE_MODES)})")
    parser.add_argument("--compile", action="store_true", help="each mode eager and compiled (static cache)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of --compile (eager: dynamo's tracing only, for a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    args.modes = args.modes or (COMPILE_MODES if args.compile else MODES)
    if args.compile:
        from torch import _dynamo

        # one graph per mode (the config's latent fields are guarded on) and cache length
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 8 * len(args.modes))

    model, tokenizer = load(args.model, args.device)
    model.to(args.device)
    questions = (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    results = {"model": args.model, "batch": args.batch, "device": args.device,
               "threads": torch.get_num_threads(), "runs": {}}
    paths = {"eager": None, "compiled": compile_config(args.device, args.compile_backend)} if args.compile else {"eager": None}
    for new_tokens in args.new_tokens:
        run_once(model, tokenizer, enc, args.modes[0], min(new_tokens, 16))  # warm-up
        if args.compile:  # compile every mode at this cache length before anything is timed
            for mode in args.modes:
                run_once(model, tokenizer, enc, mode, new_tokens, paths["compiled"])
        times = {(mode, path): [] for mode in args.modes for path in paths}
        for _ in range(args.repeats):
            for mode in args.modes:  # interleaved, so that drift hits every mode alike
                for path, compiled in paths.items():
                    times[(mode, path)].append(run_once(model, tokenizer, enc, mode, new_tokens, compiled))
        med = {key: statistics.median(ts) for key, ts in times.items()}
        run = {"times": {mode: times[(mode, "eager")] for mode in args.modes},
               "median": {mode: med[(mode, "eager")] for mode in args.modes}}
        print(f"\n{args.model}, batch {args.batch}, {new_tokens} new tokens, {args.device}, "
              f"{torch.get_num_threads()} threads, median of {args.repeats}")
        if args.compile:
            syncs = {}
            for mode in args.modes:
                for path, compiled in paths.items():
                    with counted_host_syncs() as counts:
                        run_once(model, tokenizer, enc, mode, new_tokens, compiled)
                    syncs[(mode, path)] = sum(counts.values()) / new_tokens
            run["compiled"] = {"times": {mode: times[(mode, "compiled")] for mode in args.modes},
                               "median": {mode: med[(mode, "compiled")] for mode in args.modes}}
            run["host_syncs_per_token"] = {path: {mode: syncs[(mode, path)] for mode in args.modes} for path in paths}
            print(f"{'mode':28s} {'eager s':>8s} {'compiled s':>10s} {'comp/eager':>10s} {'x plain':>8s} "
                  f"{'x plain comp':>12s} {'syncs/token eager':>17s} {'compiled':>8s}")
            for mode in args.modes:
                eager, comp = med[(mode, "eager")], med[(mode, "compiled")]
                plain, plain_comp = med.get(("plain", "eager"), float("nan")), med.get(("plain", "compiled"), float("nan"))
                print(f"{mode:28s} {eager:8.2f} {comp:10.2f} {comp / eager:10.3f} {eager / plain:8.3f} "
                      f"{comp / plain_comp:12.3f} {syncs[(mode, 'eager')]:17.2f} {syncs[(mode, 'compiled')]:8.2f}")
        else:
            print(f"{'mode':28s} {'s':>8s} {'ms/token':>9s} {'x plain':>8s} {'x embedding':>12s}")
            for mode in args.modes:
                m = med[(mode, "eager")]
                vs_plain = m / med[("plain", "eager")] if "plain" in args.modes else float("nan")
                vs_emb = m / med[("embedding", "eager")] if "embedding" in args.modes else float("nan")
                print(f"{mode:28s} {m:8.2f} {1000 * m / new_tokens:9.1f} {vs_plain:8.3f} {vs_emb:12.3f}")
        results["runs"][str(new_tokens)] = run
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
