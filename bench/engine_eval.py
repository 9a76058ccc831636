#!/usr/bin/env python3
"""Held-out evaluation time with ``--use_vllm``: the run's vLLM engine against the fork's generate, in one
trainer, on the same rows, one after the other (--repeats times), and whether their completions agree.

The trainer is the demo's (``configs/recipes/cpu_demo.yaml``, the projection source) with ``--use_vllm``
and the completion length asked for; nothing trains. The engine decodes every row in one call (its
batch is the trainer's, ``per_device_train_batch_size`` requests at a time, continuously refilled); the
fork's generate decodes them as a run without vLLM does, ``per_device_train_batch_size * 4`` rows a batch,
each batch until its longest row ends.

    python -m bench.engine_eval --tokens 256 --rows 64 --repeats 2 --threads 1   # SmolLM2 (bench/README)
    python -m bench.engine_eval --model tiny --tokens 8 --rows 4 --repeats 1      # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.learning import machine, prepare_model

RECIPE = "configs/recipes/cpu_demo.yaml"


def model_folder(name: str, workdir: Path) -> str:
    if name == "tiny":  # hidden 128: head size 32, the smallest vLLM's CPU attention takes
        from testing.tiny import PLAIN_CHAT_TEMPLATE, save_tiny_chat_model

        return str(save_tiny_chat_model(workdir / "tiny-model", hidden_size=128, chat_template=PLAIN_CHAT_TEMPLATE,
                                        tie_word_embeddings=True))
    return prepare_model(name, workdir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--tokens", type=int, default=256, help="max_completion_length")
    parser.add_argument("--rows", type=int, default=64, help="held-out rows (--eval_samples)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as a run's
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from hrpo import run as hrpo_run
    from hrpo.held_out import evaluate_rows
    from hrpo.settings_parser import parse_settings

    work = Path(tempfile.mkdtemp(prefix="hrpo-engine-eval-"))
    settings = parse_settings(["--config", RECIPE, "--model_name", model_folder(args.model, work),
                               "--output_dir", str(work / "run"), "--use_vllm", "--thinking_latent_source",
                               "projection", "--max_completion_length", str(args.tokens),
                               "--eval_samples", str(args.rows),
                               *(["--max_prompt_length", "512"] if args.model == "tiny" else [])])  # characters
    trainer = hrpo_run.build_trainer(settings)
    spec, tokenizer = trainer.held_out, trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    times = {"vllm": [], "fork generate": []}
    agree = []
    try:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            trainer.evaluate(file_name=f"engine{repeat}.json")
            times["vllm"].append(time.perf_counter() - start)
            engine = json.loads((work / "run" / f"engine{repeat}.json").read_text())
            start = time.perf_counter()
            fork = evaluate_rows(model, tokenizer, spec.task, spec.rows, system_prompt=spec.system_prompt,
                                 thinking=spec.thinking, greedy=True, temperature=trainer.args.temperature,
                                 max_new_tokens=args.tokens, batch_size=trainer.args.per_device_train_batch_size * 4)
            times["fork generate"].append(time.perf_counter() - start)
            if engine["metrics"]["decoder"] != "vllm":
                raise SystemExit(f"the held-out rows were decoded by {engine['metrics']['decoder']!r}, not vLLM")
            agree.append(sum(a["completion"] == b["completion"] for a, b in zip(engine["examples"], fork["examples"])))
            print(f"repeat {repeat}: vLLM {times['vllm'][-1]:.1f} s, fork's generate {times['fork generate'][-1]:.1f} s"
                  f" ({times['fork generate'][-1] / times['vllm'][-1]:.2f}x); accuracy {engine['metrics']['accuracy']:.3f}"
                  f" and {fork['metrics']['accuracy']:.3f}; completions equal {agree[-1]}/{len(spec.rows)}", flush=True)
    finally:
        trainer.close_engine()
    result = {"model": args.model, "tokens": args.tokens, "rows": len(spec.rows), "threads": args.threads,
              "machine": machine(), "seconds": times, "completions_equal": agree}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
