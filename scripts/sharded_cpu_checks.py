#!/usr/bin/env python3
"""Sharded training on two CPU processes, run rather than configured.

- DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch --config_file configs/zero{2,3}.yaml`,
  as users launch them (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu, over gloo), tiny Qwen2,
  2 optimizer steps, in every latent source; each run checked by scripts.check_scaled_run
  (ranks identical, on-policy replay, the thinking modules saved whole in float32, the
  checkpoint's logits in one process). ZeRO-2 in the projection source also against a DDP run
  (configs/ddp_cpu.yaml) of the same seed and data: the same prompts and updates.
- ZeRO-3 with every parameter partitioned and released after use (no persistence, no live
  budget) and `--thinking_latent_scale embedding`, which reads the embedding matrix outside
  its module; ZeRO-3 in bf16; ZeRO-3 resumed for a third step.
- FSDP2 at the model level (testing/fsdp2_step.py), in every source.
- Precision under bf16 (docs/scaling.md, "Mixed precision"): FSDP2 through accelerate's
  fsdp2_prepare_model with configs/fsdp.yaml (testing/fsdp2_precision.py): the thinking modules'
  forward reads float32; DeepSpeed ZeRO-2 and ZeRO-3 in bf16 (testing/deepspeed_precision.py):
  the forward reads Lambda as DeepSpeed's fp32 master rounded to bf16, the master keeps every
  AdamW step (the documented behaviour: DeepSpeed casts every parameter in this mode).

    pip install deepspeed                 # not among the project's requirements
    python -m scripts.sharded_cpu_checks [--only ddp zero2 zero3 zero3_strict zero3_bf16 zero3_resume fsdp2
                                           fsdp2_bf16 ds_bf16]

Prints each run's PASS/FAIL lines and a summary line per run; exits 1 on any failure. About
15 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("projection", "embedding", "embedding_plus_projection")
RUNS = ("ddp", "zero2", "zero3", "zero3_strict", "zero3_bf16", "zero3_resume", "fsdp2", "fsdp2_bf16", "ds_bf16")
WITHOUT_DEEPSPEED = ("fsdp2", "fsdp2_bf16")
# ZeRO-3 with every parameter partitioned and gathered only while its module runs
STRICT_ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                      "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                                      "stage3_prefetch_bucket_size": 0,
                                      "stage3_gather_16bit_weights_on_model_save": True},
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_flags(work: Path, out: Path, source: str, steps: int = 2) -> list[str]:
    flags = ["--model_name", str(work / "model"), "--dataset_path", str(work / "train.jsonl"),
             "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "2", "--group_size", "4", "--max_completion_length", "10",
             "--max_prompt_length", "512", "--lora_rank", "4", "--lr", "1e-2", "--lr_residual_gate", "1e-2",
             "--lr_residual_Lambda", "1e-2", "--warmup_ratio", "0", "--save_steps", "1", "--backend",
             "transformers", "--thinking_latent_source", source]
    return flags + (["--lr_thinking_projection", "1e-2"] if source != "embedding" else [])


def launch(config: Path, work: Path, name: str, source: str, *extra: str, mixed_precision: str = "no",
           steps: int = 2, out: Path | None = None) -> tuple[Path, Path]:
    from testing.processes import run_child

    out = out or work / name
    record = work / f"record-{name}"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            "2", "--mixed_precision", mixed_precision, "--main_process_port", str(free_port()), "-m",
            "testing.run_training", "--record", str(record), "--", *training_flags(work, out, source, steps), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run_child(argv, timeout=1200, what=f"accelerate launch of {name}", cwd=REPO, env=env)
    return out, record


def check(name: str, out: Path, record: Path, *flags: str) -> bool:
    from testing.processes import run_child

    proc = run_child([sys.executable, "-m", "scripts.check_scaled_run", str(out), str(record), *flags], timeout=600,
                     what=f"check_scaled_run of {name}", check=False, cwd=REPO)
    print(f"--- {name}\n" + "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))))
    print(f"{name}: {'PASS' if proc.returncode == 0 else 'FAIL'}", flush=True)
    return proc.returncode == 0


def fsdp2(work: Path, source: str, scale: str) -> bool:
    from testing.processes import run_child

    out = work / f"fsdp2-{source}-{scale}"
    out.mkdir(parents=True, exist_ok=True)
    run_child([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "testing.fsdp2_step", str(out), source, scale], timeout=600,
              what=f"torchrun of FSDP2 {source}", cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    ok = all(r["tokens_equal_unsharded"] and r["replay_gap"] <= 1e-4 and r["grad_max_rel_diff"] <= 1e-5
             and r["param_max_abs_diff"] <= 1e-6 for r in ranks) and ranks[0]["saved_whole"] \
        and ranks[0]["saved_equals_trained"]
    worst = {k: max(r[k] for r in ranks) for k in ("replay_gap", "grad_max_rel_diff", "param_max_abs_diff")}
    print(f"fsdp2 {source} (scale {scale}): {'PASS' if ok else 'FAIL'}  tokens as unsharded, replay gap "
          f"{worst['replay_gap']:.1e}, gradients vs one process {worst['grad_max_rel_diff']:.1e} (rel.), parameters "
          f"{worst['param_max_abs_diff']:.1e}, thinking modules saved whole: {ranks[0]['saved_whole']}", flush=True)
    return ok


def fsdp2_bf16(work: Path, source: str, scale: str) -> bool:
    """The thinking modules' forward under FSDP2 bf16 (tests/test_sharded_precision.py runs
    embedding_plus_projection)."""
    from testing.processes import run_child

    out = work / f"fsdp2-bf16-{source}-{scale}"
    out.mkdir(parents=True, exist_ok=True)
    run_child([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "testing.fsdp2_precision", str(work), str(out), source, scale], timeout=600,
              what=f"torchrun of FSDP2 bf16 {source}", cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    ok = True
    for r in ranks:
        for when in ("before", "after"):
            seen, master = r[when]["seen"], r[when]["master"]
            ok &= all(got["dtype"] == "float32" and got["first"] == master[m][name]["first"]
                      for m in r["modules"] for name, got in seen[m].items())
    lam = ranks[0]["lambda_module"]
    print(f"fsdp2 bf16 {source} (scale {scale}): {'PASS' if ok else 'FAIL'}  decoder layers in {ranks[0]['layer_dtype']}; Lambda[:2] read by the "
          f"forward: {ranks[0]['before']['seen'][lam]['Lambda']['dtype']} {ranks[0]['before']['seen'][lam]['Lambda']['first'][:2]}"
          f" -> {ranks[0]['after']['seen'][lam]['Lambda']['first'][:2]} after an AdamW step (master "
          f"{ranks[0]['after']['master'][lam]['Lambda']['first'][:2]})", flush=True)
    return ok


def deepspeed_bf16(work: Path, stage: int, steps: int = 40) -> bool:
    """DeepSpeed in bf16: what Lambda's forward reads, against DeepSpeed's fp32 master, step by step."""
    import torch

    from testing.deepspeed_precision import LAMBDA_START, LR
    from testing.processes import run_child

    out = work / f"ds-bf16-zero{stage}"
    out.mkdir(parents=True, exist_ok=True)
    run_child([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "testing.deepspeed_precision", str(work), str(out), str(stage), str(steps)],
              timeout=1200, what=f"torchrun of DeepSpeed ZeRO-{stage} bf16", cwd=REPO,
              env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    def bf16(values):
        return [float(x) for x in torch.tensor(values).to(torch.bfloat16).float()]

    ok = True
    for r in ranks:
        records = r["steps"]
        ok &= all(x["seen_dtype"] == "bfloat16" for x in records)
        # the forward of step k reads the master after step k-1, rounded to bf16; step 1 the start, rounded
        previous = [bf16(LAMBDA_START)] + [x["master"] for x in records[:-1]]
        ok &= all(x["seen"] == bf16(m) for x, m in zip(records, previous))
        # the master keeps each AdamW step, from the start rounded to bf16: about lr, lowering Lambda (Adam's
        # m / sqrt(v) is 1 for a steady gradient, a few percent off after the forward's value jumped)
        ok &= all(-1.05 * LR <= b - a <= -0.95 * LR for x, m in zip(records, previous) for a, b in zip(m, x["master"]))
    records = ranks[0]["steps"]
    changes = [x["step"] for x, y in zip(records[1:], records) if x["seen"] != y["seen"]]
    print(f"deepspeed {ranks[0]['deepspeed']} zero{stage} bf16: {'PASS' if ok else 'FAIL: not as documented'}  Lambda[:2] "
          f"set to {list(LAMBDA_START)} in float32, read by the forward at step 1 as {records[0]['seen_dtype']} "
          f"{records[0]['seen']}, at step {steps} as {records[-1]['seen']}; DeepSpeed's fp32 master after {steps} "
          f"AdamW steps of {LR:g}: {[round(v, 5) for v in records[-1]['master']]}; the forward's value changed at "
          f"steps {changes}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from testing.training import save_training_workspace

    if any(run not in WITHOUT_DEEPSPEED for run in args.only) and importlib.util.find_spec("deepspeed") is None:
        print("sharded_cpu_checks: error: the DeepSpeed runs need deepspeed (pip install deepspeed); "
              "--only fsdp2 fsdp2_bf16 runs without it", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="sharded-"))
    save_training_workspace(work, problems=32)
    configs = REPO / "configs"
    results = {}
    if "ddp" in args.only or "zero2" in args.only:
        results["ddp projection"] = check("ddp projection", *launch(configs / "ddp_cpu.yaml", work, "ddp",
                                                                     "projection"), "--expect", "MULTI_CPU")
    for stage in ("zero2", "zero3"):
        if stage not in args.only:
            continue
        for source in args.sources:
            name = f"{stage} {source}"
            out, record = launch(configs / f"{stage}.yaml", work, f"{stage}-{source}", source)
            compare = ["--compare-to", str(work / "record-ddp")] if stage == "zero2" and source == "projection" else []
            results[name] = check(name, out, record, "--expect", "DEEPSPEED", *compare)
    if "zero3_strict" in args.only:
        strict = work / "zero3_strict.json"
        strict.write_text(json.dumps(STRICT_ZERO3))
        config = work / "zero3_strict.yaml"
        config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                          f"  deepspeed_config_file: {strict}\n  zero3_init_flag: false\nnum_machines: 1\n"
                          f"num_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\n")
        results["zero3 strict, latent scale embedding"] = check(
            "zero3 strict, latent scale embedding",
            *launch(config, work, "zero3-strict", "projection", "--thinking_latent_scale", "embedding"),
            "--expect", "DEEPSPEED")
    if "zero3_bf16" in args.only:
        results["zero3 bf16"] = check("zero3 bf16", *launch(configs / "zero3.yaml", work, "zero3-bf16", "projection",
                                                            "--bf16", "true", mixed_precision="bf16"),
                                      "--expect", "DEEPSPEED", "--bf16", "--replay-bound", "1.0", "--logits-bound", "0.05")
    if "zero3_resume" in args.only:
        first, _ = launch(configs / "zero3.yaml", work, "zero3-resume", "projection")
        out, record = launch(configs / "zero3.yaml", work, "zero3-resumed", "projection", "--resume", "--extend_lr_schedule", steps=3,
                             out=first)
        resumed = sorted(int(p.stem.split("-step")[1]) for p in record.glob("rank0-step*.pt")) == [3]
        print(f"zero3 resume: steps recorded after --resume: "
              f"{sorted(p.stem for p in record.glob('rank0-step*.pt'))}", flush=True)
        results["zero3 resumed to step 3"] = resumed and check("zero3 resumed to step 3", out, record,
                                                                "--expect", "DEEPSPEED")
    if "fsdp2" in args.only:
        for source in args.sources:
            results[f"fsdp2 {source}"] = fsdp2(work, source, "embedding" if source == "projection" else "unit")
    if "fsdp2_bf16" in args.only:
        for source in args.sources:
            scale = "embedding" if source == "projection" else "unit"
            results[f"fsdp2 bf16 {source}: thinking modules read float32"] = fsdp2_bf16(work, source, scale)
    if "ds_bf16" in args.only:
        for stage in (2, 3):
            results[f"zero{stage} bf16: thinking modules read bf16, as documented"] = deepspeed_bf16(work, stage)
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results.items()))
    print(f"{sum(results.values())} passed, {len(results) - sum(results.values())} failed")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
