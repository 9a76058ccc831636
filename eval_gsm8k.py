#!/usr/bin/env python3
"""Evaluate a trained HRPO checkpoint on GSM8K-format problems.

    python eval_gsm8k.py --checkpoint_path experiments/run --greedy
    python eval_gsm8k.py --checkpoint_path runs/demo --dataset_path data/sample/test.jsonl --thinking off

Writes eval_results.json (metrics and every example) into the checkpoint folder.
Accuracy counts a completion correct when it has exactly one answer marker and the
number after it equals the reference (the training reward).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help="an HRPO output folder or a checkpoint-N folder in it")
    p.add_argument("--dataset_path", default="openai/gsm8k", help="hub dataset name or local GSM8K-format file")
    p.add_argument("--split", default="test")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (HRPO's is_inference mode)")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature when not --greedy")
    p.add_argument("--num_samples", type=int, default=None, help="evaluate the first N problems (default: all)")
    p.add_argument("--thinking", choices=["on", "off"], default="on",
                   help="on: hybrid latent reasoning as trained; off: plain token decoding")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    return p


def evaluate(args) -> dict:
    import torch
    from tqdm import tqdm

    from hrpo.checkpoint import load_checkpoint
    from hrpo.data import load_gsm8k, to_prompt
    from hrpo.rewards import correctness_reward, extract_answer, reference_answer

    dataset = load_gsm8k(args.dataset_path, args.split)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_checkpoint(args.checkpoint_path, dtype=dtype, device=device)
    torch.manual_seed(args.seed)

    examples, correct = [], 0
    progress = tqdm(range(0, len(dataset), args.batch_size), desc="eval", unit="batch")
    for start in progress:
        rows = dataset[start:start + args.batch_size]
        texts = [tokenizer.apply_chat_template(to_prompt(q), tokenize=False, add_generation_prompt=True)
                 for q in rows["question"]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        hybrid = {"processing_class": tokenizer, "is_inference": args.greedy} if args.thinking == "on" else {}
        sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": args.temperature,
                                                             "top_k": 0, "top_p": 1.0}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, **sampling, **hybrid)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        completions = tokenizer.batch_decode(sequences[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for question, answer, completion in zip(rows["question"], rows["answer"], completions):
            reward = correctness_reward(completion, answer)
            correct += int(reward == 1.0)
            predicted, expected = extract_answer(completion), reference_answer(answer)
            examples.append({"question": question, "reference": str(expected), "completion": completion,
                             "predicted": None if predicted is None else str(predicted), "correct": reward == 1.0})
        progress.set_postfix(accuracy=f"{correct / len(examples):.3f}")

    metrics = {"accuracy": correct / len(examples), "correct": correct, "total": len(examples),
               "thinking": args.thinking, "greedy": args.greedy, "dataset_path": args.dataset_path,
               "split": args.split, "max_new_tokens": args.max_new_tokens,
               "latent_source": model.get_base_model().config.thinking_latent_source}
    result = {"metrics": metrics, "examples": examples}
    target = Path(args.checkpoint_path) / "eval_results.json"
    target.write_text(json.dumps(result, indent=2))
    print(f"accuracy {metrics['accuracy']:.4f} ({correct}/{len(examples)}); wrote {target}")
    return result


def main(argv=None) -> int:
    from hrpo.checkpoint import CheckpointError
    from hrpo.data import DataError

    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (CheckpointError, DataError) as err:
        print(f"eval_gsm8k.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
