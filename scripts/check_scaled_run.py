#!/usr/bin/env python3
"""Check a run made by `accelerate launch ... -m testing.run_training --record REC -- ... --output_dir OUT`
(any config: DDP, ZeRO-2/3, FSDP; gpu_checks.sh runs it after the sharded runs):

    python -m scripts.check_scaled_run OUT REC [--json result.json]

- the last checkpoint is complete and holds the adapter whole: LoRA and the four thinking
  modules, each with its full shape, the thinking modules in float32; every thinking module
  moved between the first and the last recorded step;
- every rank recorded the same trainable parameters (gathered whole) after each step, and
  each rank's replay reproduced its sampling (on-policy);
- the checkpoint, loaded in this one process, reproduces the trained model's logits on
  inputs with thinking positions (rank 0's probe, taken at the end of training).
Prints PASS or FAIL lines and exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def main(argv=None) -> int:
    import torch
    from safetensors.torch import load_file
    from transformers.hybrid_thinking.modeling import (GATE_MODULES, LAMBDA_MODULE, PROJECTION_MODULE, THINKING_MODULES,
                                                       thinking_module_names)

    from hrpo.checkpoint import incomplete_reason, latest_complete_checkpoint, load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("record", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replay-bound", type=float, default=1e-4,
                        help="on-policy bound (fp32: 1e-4; in bf16 the replay is bounded by bf16 rounding, "
                             "about 0.5 on SmolLM2 on CPU, bench/README.md)")
    parser.add_argument("--logits-bound", type=float, default=1e-4)
    parser.add_argument("--expect", default=None, help="the distributed type the run must have used (FSDP, DEEPSPEED, "
                        "MULTI_GPU, MULTI_CPU): accelerate falls back to DDP silently, on CPU for instance")
    parser.add_argument("--compare-to", type=Path, default=None,
                        help="the records of another run of the same seed and data (DDP, say): the same prompts "
                             "per rank and step, gradients and updated parameters within --compare-bound")
    parser.add_argument("--compare-bound", type=float, default=1e-5,
                        help="largest relative gradient difference and parameter difference / learning rate")
    parser.add_argument("--bf16", action="store_true",
                        help="load the base model in bf16 and score under bf16 autocast, as a CUDA run trained")
    args = parser.parse_args(argv)
    checks: dict[str, bool | str] = {}

    checkpoint = latest_complete_checkpoint(args.out)[0]
    checks["complete checkpoint"] = checkpoint is not None and incomplete_reason(checkpoint) is None
    if not checks["complete checkpoint"]:
        return report(checks, args.json)
    config = json.loads((checkpoint / "config.json").read_text())
    d = config["hidden_size"]
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    shapes = {m: {k.split(m + ".", 1)[-1]: (tuple(v.shape), str(v.dtype)) for k, v in adapter.items() if m in k}
              for m in THINKING_MODULES}
    gate = {"weight": ((d, d), "torch.float32"), "bias": ((d,), "torch.float32")}
    want = {**{name: gate for name in GATE_MODULES}, LAMBDA_MODULE: {"Lambda": ((d,), "torch.float32")}}
    for module, fields in want.items():
        checks[f"{module} saved whole in float32"] = shapes[module] == fields or str(shapes[module])
    built = thinking_module_names(config.get("thinking_latent_source"))  # the source's modules only
    if PROJECTION_MODULE in built:
        projection = shapes[PROJECTION_MODULE]
        checks[f"{PROJECTION_MODULE} saved whole in float32"] = bool(projection) and all(
            shape[-1] == d and 0 not in shape and dtype == "torch.float32" for shape, dtype in projection.values()) \
            or str(projection)
    else:
        checks[f"no {PROJECTION_MODULE} (the source has none)"] = not shapes[PROJECTION_MODULE] or str(shapes)
    checks["LoRA saved whole"] = any("lora_A" in k for k in adapter) and all(
        v.numel() > 0 for k, v in adapter.items() if "lora_" in k)

    records = sorted(args.record.glob("rank*-step*.pt"))
    by_step: dict[int, list] = {}
    for path in records:
        rank, step = (int(x) for x in path.stem.replace("rank", "").split("-step"))
        by_step.setdefault(step, []).append(torch.load(path, weights_only=False))
    checks["records"] = bool(by_step) or f"none in {args.record}"
    if by_step:
        r = by_step[min(by_step)][0]
        print(f"ran as {r.get('distributed_type')}, {r.get('world_size')} processes, model wrapped in "
              f"{r.get('wrapper')}, trainable parameters are {r.get('param_types')}")
        if args.expect:
            checks[f"ran as {args.expect}"] = r.get("distributed_type") == f"DistributedType.{args.expect}" \
                or f"ran as {r.get('distributed_type')}"
    for step, recs in sorted(by_step.items()):
        first = recs[0]["params"]
        checks[f"step {step}: {len(recs)} ranks hold identical parameters"] = all(
            r["params"].keys() == first.keys() and all(torch.equal(r["params"][n], first[n]) for n in first)
            for r in recs)
        diffs = [d for r in recs for d in r["replay_logprob_diffs"]]
        worst = max(diffs, default=float("nan"))
        checks[f"step {step}: on-policy replay on every rank (max {worst:.1e})"] = \
            bool(diffs) and worst <= args.replay_bound

    steps = sorted(by_step)
    if len(steps) > 1:
        first, last = by_step[steps[0]][0]["params"], by_step[steps[-1]][0]["params"]
        moved = {m for m in built for n in first if m in n and not torch.equal(first[n], last[n])}
        checks[f"every thinking module moved between step {steps[0]} and {steps[-1]}"] = \
            moved == set(built) or f"moved: {sorted(moved)}"
    if args.compare_to is not None:
        compare_runs(checks, by_step, args.compare_to, args.compare_bound, json.loads(
            (checkpoint.parent / "hrpo_run.json").read_text())["settings"]["learning_rate"])
    probe = torch.load(args.record / "rank0-logits.pt", weights_only=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(checkpoint, dtype=torch.bfloat16 if args.bf16 else None, device=device)
    inputs = {k: v.to(device) for k, v in probe["inputs"].items()}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
        logits = model(**inputs).logits.float().cpu()
    diff = (logits - probe["logits"].float().cpu()).abs().max().item()
    checks[f"checkpoint reproduces the trained logits in one process (max abs diff {diff:.1e})"] = diff <= args.logits_bound
    return report(checks, args.json)


def compare_runs(checks: dict, by_step: dict, other: Path, bound: float, learning_rate: float) -> None:
    """Each step of this run against the same step of another run (rank 0 of each)."""
    import torch

    for step, recs in sorted(by_step.items()):
        theirs = torch.load(other / f"rank0-step{step}.pt", weights_only=False)
        mine = recs[0]
        checks[f"step {step}: the same prompts as {other.name}"] = mine["prompts"] == theirs["prompts"]
        if mine.get("grads") and theirs.get("grads"):  # ZeRO and FSDP keep gradients partitioned: not recorded
            worst_grad = max(((mine["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                             for n, g in theirs["grads"].items())
            checks[f"step {step}: gradients as {other.name} (max rel. diff {worst_grad:.1e})"] = worst_grad <= bound
        worst_param = max((mine["params"][n] - p).abs().max().item() for n, p in theirs["params"].items())
        checks[f"step {step}: parameters as {other.name} (max diff {worst_param / learning_rate:.1e} x lr)"] = \
            worst_param / learning_rate <= bound * 100


def report(checks: dict, json_path: Path | None) -> int:
    ok = all(value is True for value in checks.values())
    for name, value in checks.items():
        print(f"{'PASS' if value is True else 'FAIL'}  {name}" + ("" if value in (True, False) else f": {value}"))
    print("ALL PASS" if ok else "FAILED")
    if json_path:
        json_path.write_text(json.dumps({k: v for k, v in checks.items()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
