#!/usr/bin/env python3
"""Seconds per optimizer step of hrpo_gsm8k.py in 1 process and in 2 processes (accelerate,
configs/ddp_cpu.yaml: DDP over gloo) at the same per-rank batch, interleaved runs:

    python -m bench.scale_out --model tiny --reps 3 --json bench/results/scale_out_tiny.json
    python -m bench.scale_out --model smollm2 --reps 2 --steps 4 --new-tokens 32 --json bench/results/scale_out_smollm2.json

Each run is its own process tree, 1 thread per process (OMP_NUM_THREADS=1); a run's figure
is the median `step_time` of its steps after the first (TRL's per-step wall time on rank 0).
Two processes do twice the completions per step; on a 2-core machine shared with other work
expect them to contend.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def model_folder(name: str, workdir: Path) -> Path:
    if name == "tiny":
        from testing.tiny import save_tiny_chat_model

        return save_tiny_chat_model(workdir / "tiny", hidden_size=256)
    if name == "smollm2":
        from hrpo import smollm2

        return smollm2.export_to_folder(REPO / ".cache" / "SmolLM2-135M-Instruct")
    return Path(name)


def run(processes: int, model: Path, out: Path, args) -> dict:
    flags = ["--model_name", str(model), "--task", "arith", "--dataset_path", "generated", "--output_dir", str(out),
             "--max_steps", str(args.steps), "--group_size", "4", "--per_device_train_batch_size", str(args.per_device),
             "--gradient_accumulation_steps", "1", "--max_prompt_length", "1024", "--max_completion_length",
             str(args.new_tokens), "--lora_rank", "16", "--lr", "2e-4", "--warmup_ratio", "0", "--save_steps", "1000",
             "--thinking_latent_source", "projection", "--thinking_monitor_every", "0", "--backend", args.backend]
    script = [str(REPO / "hrpo_gsm8k.py"), *flags]
    if processes == 1:
        argv = [sys.executable, *script]
    else:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "ddp_cpu.yaml"), "--num_processes", str(processes), *script]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{processes} process(es) failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
    history = json.loads((out / "log_history.json").read_text())
    times = [row["step_time"] for row in history if "step_time" in row][1:]
    return {"processes": processes, "step_times": times, "median_s_per_step": statistics.median(times),
            "completions_per_step": processes * args.per_device}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--per-device", type=int, default=8, help="completions per rank per step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--backend", default="unsloth")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_folder(args.model, workdir)
        runs = []
        for rep in range(args.reps):
            for processes in (1, 2) if rep % 2 == 0 else (2, 1):
                result = run(processes, model, workdir / f"run-{rep}-{processes}", args)
                runs.append(result)
                print(f"rep {rep}: {processes} process(es): {result['median_s_per_step']:.2f} s/step "
                      f"({result['step_times']})", flush=True)
    medians = {n: statistics.median(r["median_s_per_step"] for r in runs if r["processes"] == n) for n in (1, 2)}
    report = {"model": args.model, "backend": args.backend, "per_device": args.per_device,
              "new_tokens": args.new_tokens, "steps": args.steps, "threads_per_process": 1, "runs": runs,
              "median_s_per_step": medians, "ratio_2_to_1": medians[2] / medians[1],
              "load_average_at_end": os.getloadavg()}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
