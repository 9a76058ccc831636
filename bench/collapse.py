#!/usr/bin/env python3
"""The collapse, explained: per-step traces of demo runs that stop answering and of one that does not.

Each run is the demo's (`configs/recipes/cpu_demo.yaml`: SmolLM2-135M-Instruct, `arith`, 30 steps
of 8 completions, 64 tokens, LoRA r16 at 5e-4, no KL term) with an arm of bench/learning.py
(`projection` is `./demo.sh SEED`, `grpo` plain GRPO, ...), trained in its own process with
`hrpo.collapse_trace` attached: per step the trainer's metrics, every completion (text, reward,
cut at the limit, answer marker), the hybrid mixing (gate a, Lambda, the latent's norm against
the token embedding's, how far the mixed input moved) and the optimizer (per parameter group:
the gradient AdamW stepped on, its moments, the update applied, split into the moment step and
the weight decay, the distance from the start). A traced run trains exactly as the untraced one.

    python -m bench.collapse --runs projection:11 projection:12 grpo:12 projection:1 --threads 1
    python -m bench.collapse --report            # collapse.json, collapse.png and the tables from the traces
    python -m bench.collapse --model tiny --runs projection:1 --out /tmp/c -- --max_steps 2   # smoke run

Flags after "--" go to every training run, after the demo's (the last one wins). Runs with a
trace are done (resumable). Writes OUT/traces/<arm>-seed<seed>.json (small, kept in the
repository) and, from all traces, OUT/collapse.json and OUT/collapse.png; the run folders and
their logs go to OUT/runs/ (not kept).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.learning import ARMS, demo_settings, machine, prepare_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "collapse"


def parse_run(text: str) -> tuple[str, int]:
    arm, _, seed = text.partition(":")
    if arm not in ARMS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARM:SEED with ARM one of {', '.join(ARMS)}")
    return arm, int(seed)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def trace_path(out: Path, arm: str, seed: int) -> Path:
    return out / "traces" / f"{run_name(arm, seed)}.json"


def training_argv(arm: str, seed: int, model: str, folder: Path, flags: list[str]) -> list[str]:
    """The run's hrpo_gsm8k.py flags: the demo's recipe, the flags after "--", the model, the seed, the arm."""
    return [*demo_settings(), *flags, "--model_name", model, "--output_dir", str(folder), "--seed", str(seed),
            *ARMS[arm]]


# ---------------------------------------------------------------- one traced run (the child process)

def evaluation_summary(path: Path) -> dict:
    result = json.loads(path.read_text())
    examples = result["examples"]
    return {"accuracy": result["metrics"]["accuracy"], "total": result["metrics"]["total"],
            "answered": sum(e["predicted"] is not None for e in examples)}


def code_state() -> dict:
    """The commit the run's code came from, and the files of the library and the forks that differed from it."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    changed = git("status", "--short", "--", "hrpo", "transformers/overlay", "transformers/patches", "unsloth",
                  "configs/recipes/cpu_demo.yaml")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed.splitlines()}


def traced_run(arm: str, seed: int, model: str, out: Path, flags: list[str]) -> Path:
    """hrpo_gsm8k.py's run (hrpo.run.train) with the trace attached; writes the trace file."""
    import torch

    from hrpo.backend import import_unsloth
    from hrpo.command_line import requested_backend

    argv = training_argv(arm, seed, model, out / "runs" / run_name(arm, seed), flags)
    if requested_backend(argv) != "transformers":
        import_unsloth(torch.cuda.is_available())  # first, as hrpo.train does
    from hrpo.collapse_trace import attach
    from hrpo.run import build_trainer, prepare
    from hrpo.settings_parser import settings_parser

    start, code = time.time(), code_state()
    settings = prepare(argv, settings_parser(task="gsm8k"))  # hrpo_gsm8k.py's parser
    folder = Path(settings.training.output_dir)
    trainer = build_trainer(settings)
    trace = attach(trainer)
    trainer.train()
    (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.evaluate(file_name="eval_final.json")
    record = {
        "arm": arm, "seed": seed, "command": shlex.join(["hrpo_gsm8k.py", *argv]),
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(), "machine": machine(),
        "wall_seconds": round(time.time() - start, 1), "code": code,
        "max_completion_length": settings.training.max_completion_length,
        "eval_start": evaluation_summary(folder / "eval_step0.json") if (folder / "eval_step0.json").exists() else None,
        "eval_end": evaluation_summary(folder / "eval_final.json") if (folder / "eval_final.json").exists() else None,
        "steps": trace.to_json(),
    }
    target = trace_path(out, arm, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(compact(record), separators=(",", ":")))
    return target


def compact(value, digits: int = 5):
    """A trace as kept: floats to ``digits`` significant digits, each group's question written once
    (on its first completion; the rows after it that lack one have the same)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [compact(item, digits) for item in value]
    if isinstance(value, dict):
        result = {key: compact(item, digits) for key, item in value.items()}
        if isinstance(result.get("completions"), list):
            previous = None
            for row in result["completions"]:
                if row.get("question") is not None and row["question"] == previous:
                    del row["question"]
                else:
                    previous = row.get("question", previous)
        return result
    return value


def run_child(arm: str, seed: int, model: str, out: Path, flags: list[str], threads: int | None) -> None:
    """One traced run in its own process; its output goes to OUT/runs/<run>.log, shown on failure."""
    log = out / "runs" / f"{run_name(arm, seed)}.log"
    folder = out / "runs" / run_name(arm, seed)
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.collapse", "--one", f"{arm}:{seed}", "--model", model, "--out", str(out),
               "--", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"{run_name(arm, seed)} failed (exit {proc.returncode}): {shlex.join(command)}\n{tail}")


# ---------------------------------------------------------------- reading the traces

def share(rows: list[dict], key: str) -> float | None:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def per_step(trace: dict) -> list[dict]:
    """One flat row per step: the figures the report and the plot use."""
    rows = []
    for step in trace["steps"]:
        logs, completions = step.get("logs", {}), step.get("completions", [])
        thinking, optimizer = step.get("thinking", {}), step.get("optimizer", {})
        row = {"step": step["step"], "reward": logs.get("reward"),
               "no_signal": logs.get("frac_reward_zero_std") is not None and logs["frac_reward_zero_std"] >= 1.0,
               "cut": logs.get("completions/clipped_ratio"), "cut_traced": share(completions, "cut"),
               "marker": share(completions, "marker"), "answered": share(completions, "answered"),
               "length": logs.get("completions/mean_length"), "entropy": logs.get("entropy"),
               "clip_ratio": logs.get("clip_ratio/region_mean"), "grad_norm_logged": logs.get("grad_norm"),
               "distinct_4gram": mean(c["distinct_4gram"] for c in completions),
               "gate_a": thinking.get("gate_a_mean"), "gate_a_at_r1": thinking.get("gate_a_at_r1"),
               "lambda_mean": thinking.get("lambda_mean"), "positions_frac": thinking.get("positions_frac"),
               "latent_norm": thinking.get("latent_norm"), "embedding_norm": thinking.get("embedding_norm"),
               "latent_over_embedding": thinking.get("latent_over_embedding"),
               "input_change": thinking.get("input_change"),
               "projection_drift": logs.get("thinking_projection/drift")}
        for group in ("main_decay", "projection", "gate", "lambda"):
            if group in optimizer:
                g = optimizer[group]
                for key in ("grad_norm", "update_norm", "adam_step_norm", "weight_decay_step_norm", "exp_avg_norm",
                            "exp_avg_sq_sqrt_norm", "drift_from_start", "param_norm", "lr"):
                    row[f"{group}/{key}"] = g.get(key)
        rows.append(row)
    return rows


def last_true(rows: list[dict], test) -> int | None:
    steps = [r["step"] for r in rows if test(r)]
    return steps[-1] if steps else None


def summarize_trace(trace: dict) -> dict:
    """The run's story in numbers: when the signal and the marker were last seen, and how far
    LoRA and the projection moved after the last step with a gradient."""
    rows = per_step(trace)
    last_step = rows[-1]["step"]
    last_signal = last_true(rows, lambda r: not r["no_signal"])
    last_marker = last_true(rows, lambda r: (r["marker"] or 0) > 0)
    summary = {
        "arm": trace["arm"], "seed": trace["seed"], "steps": last_step, "wall_seconds": trace["wall_seconds"],
        "threads": trace["threads"], "machine": trace["machine"],
        "accuracy_start": (trace.get("eval_start") or {}).get("accuracy"),
        "accuracy_end": (trace.get("eval_end") or {}).get("accuracy"),
        "answered_start": (trace.get("eval_start") or {}).get("answered"),
        "answered_end": (trace.get("eval_end") or {}).get("answered"),
        "eval_total": (trace.get("eval_end") or {}).get("total"),
        "reward": [r["reward"] for r in rows],
        "steps_without_signal": sum(r["no_signal"] for r in rows),
        "last_step_with_signal": last_signal,
        "last_step_with_marker": last_marker,
        "marker_gone_from_step": None if last_marker == last_step else (last_marker or 0) + 1,
        "cut_share_last_10": mean(r["cut"] for r in rows[-10:]),
        "marker_share_first_5": mean(r["marker"] for r in rows[:5]),
        "marker_share_last_10": mean(r["marker"] for r in rows[-10:]),
    }
    summary["collapsed"] = summary["marker_gone_from_step"] is not None and \
        last_step - summary["marker_gone_from_step"] + 1 >= 5
    for group in ("main_decay", "projection"):
        key = f"{group}/update_norm"
        if key not in rows[0]:
            continue
        total = sum(r[key] or 0.0 for r in rows)
        after = sum(r[key] or 0.0 for r in rows if last_signal is not None and r["step"] > last_signal)
        zero_grad = [r for r in rows if (r[f"{group}/grad_norm"] or 0.0) == 0.0]
        summary[group] = {
            "path_length": total, "path_after_last_signal": after,
            "share_of_path_after_last_signal": after / total if total else None,
            "steps_with_zero_gradient": len(zero_grad),
            "moved_with_zero_gradient": sum(r[key] or 0.0 for r in zero_grad),
            "drift_from_start_at_last_signal": next((r[f"{group}/drift_from_start"] for r in rows
                                                     if r["step"] == last_signal), None),
            "drift_from_start_at_end": rows[-1][f"{group}/drift_from_start"],
            "weight_decay_share_of_zero_gradient_moves": (
                sum(r[f"{group}/weight_decay_step_norm"] or 0.0 for r in zero_grad)
                / max(sum(r[key] or 0.0 for r in zero_grad), 1e-30)) if zero_grad else None,
        }
    return summary


def read_traces(out: Path) -> list[dict]:
    order = {arm: index for index, arm in enumerate(ARMS)}
    traces = [json.loads(path.read_text()) for path in sorted((out / "traces").glob("*.json"))]
    return sorted(traces, key=lambda t: (order.get(t["arm"], len(order)), t["seed"]))


# ---------------------------------------------------------------- the report

def print_report(summaries: list[dict]) -> None:
    print(f"\n{'run':32s} {'acc start->end':>15s} {'answered':>10s} {'no-signal':>9s} {'last signal':>11s} "
          f"{'marker gone':>11s} {'cut last10':>10s} {'LoRA moved after':>16s} {'proj moved after':>16s}")
    for s in summaries:
        acc = f"{s['accuracy_start']:.3f}->{s['accuracy_end']:.3f}" if s["accuracy_end"] is not None else "-"
        answered = f"{s['answered_start']}->{s['answered_end']}" if s["answered_end"] is not None else "-"
        lora, proj = s.get("main_decay", {}), s.get("projection", {})

        def moved(group):
            value = group.get("share_of_path_after_last_signal")
            return f"{value:.0%}" if value is not None else "-"

        print(f"{run_name(s['arm'], s['seed']):32s} {acc:>15s} {answered:>10s} {s['steps_without_signal']:9d} "
              f"{str(s['last_step_with_signal']):>11s} {str(s['marker_gone_from_step']):>11s} "
              f"{s['cut_share_last_10'] or 0:10.2f} {moved(lora):>16s} {moved(proj):>16s}")


def plot(traces: list[dict], target: Path) -> None:
    """One column per run; rows: what the completions do, what the optimizer does, the mixing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(traces)
    fig, axes = plt.subplots(4, columns, figsize=(4.2 * columns, 12.5), sharex=True, squeeze=False)
    for column, trace in enumerate(traces):
        rows, summary = per_step(trace), summarize_trace(trace)
        steps = [r["step"] for r in rows]
        title = (f"{trace['arm']} seed {trace['seed']}\nheld-out {summary['accuracy_start']:.3f} -> "
                 f"{summary['accuracy_end']:.3f}" if summary["accuracy_end"] is not None
                 else f"{trace['arm']} seed {trace['seed']}")
        top = axes[0][column]
        top.set_title(title, fontsize=9)
        top.plot(steps, [r["reward"] for r in rows], "o-", ms=3, label="reward", color="tab:green")
        top.plot(steps, [r["marker"] for r in rows], "s-", ms=3, label="share with ####", color="tab:blue")
        top.plot(steps, [r["cut"] for r in rows], "^-", ms=3, label="share cut at 64 tokens", color="tab:red")
        top.set_ylim(-0.05, 1.05)
        lengths = axes[1][column]
        lengths.plot(steps, [r["length"] for r in rows], "o-", ms=3, color="tab:purple", label="mean length (tokens)")
        lengths.set_ylim(0, (trace.get("max_completion_length") or 64) * 1.1)
        share_axis = lengths.twinx()
        share_axis.plot(steps, [r["distinct_4gram"] for r in rows], "-", color="tab:orange",
                        label="distinct 4-gram share (right)")
        share_axis.plot(steps, [r["entropy"] for r in rows], "--", color="tab:gray", label="entropy, nats (right)")
        share_axis.set_ylim(0, 1.6)
        optimizer = axes[2][column]
        for group, color in (("main_decay", "tab:blue"), ("projection", "tab:red")):
            if f"{group}/update_norm" not in rows[0]:
                continue
            name = "LoRA" if group == "main_decay" else "projection"
            grad = [r[f"{group}/grad_norm"] for r in rows]
            optimizer.plot(steps, [r[f"{group}/update_norm"] for r in rows], "-", color=color,
                           label=f"{name}: update applied")
            optimizer.plot(steps, [g if g else float("nan") for g in grad], ":", color=color,
                           label=f"{name}: gradient (clipped)")
            optimizer.scatter([s for s, g in zip(steps, grad) if not g], [r[f"{group}/update_norm"] for r, g
                                                                         in zip(rows, grad) if not g],
                              marker="x", color=color, s=22, zorder=3)
        optimizer.set_yscale("log")
        drift = axes[3][column]
        for group, color in (("main_decay", "tab:blue"), ("projection", "tab:red")):
            key = f"{group}/drift_from_start"
            if key in rows[0]:
                first = max(r[key] for r in rows) or 1.0
                drift.plot(steps, [r[key] / first for r in rows], "-", color=color,
                           label=f"{'LoRA' if group == 'main_decay' else 'projection'}: distance from start / max")
        if rows[0]["input_change"] is not None or any(r["input_change"] for r in rows):
            drift.plot(steps, [r["input_change"] for r in rows], "--", color="tab:brown",
                       label="|mixed input - e| / |e|")
        drift.set_ylim(-0.02, 1.05)
        for axis in (top, lengths, optimizer, drift):
            axis.grid(alpha=0.3)
            last_signal = summary["last_step_with_signal"]
            if last_signal is not None and last_signal < steps[-1]:
                axis.axvspan(last_signal + 0.5, steps[-1] + 0.5, color="grey", alpha=0.12)
        drift.set_xlabel("optimizer step (shaded: after the last step with any reward signal)")
        if column == 0:
            top.legend(fontsize=7, loc="upper right")
            lengths.legend(fontsize=7, loc="lower left")
            share_axis.legend(fontsize=7, loc="lower right")
            optimizer.legend(fontsize=7, loc="lower left")
            drift.legend(fontsize=7, loc="lower right")
            optimizer.set_ylabel("norm per step (x: zero gradient)")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def write_report(out: Path, command: str) -> int:
    traces = read_traces(out)
    if not traces:
        print(f"[collapse] error: no traces under {out / 'traces'}", file=sys.stderr)
        return 1
    summaries = [summarize_trace(t) for t in traces]
    (out / "collapse.json").write_text(json.dumps({"command": command, "runs": summaries}, indent=2))
    plot(traces, out / "collapse.png")
    print_report(summaries)
    print(f"\nwrote {out / 'collapse.json'} and {out / 'collapse.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[],
                        help="ARM:SEED, ARM as in bench/learning.py (projection is the demo, grpo plain GRPO)")
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline), tiny (smoke runs) or a model folder")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--report", action="store_true", help="run nothing: the report from the kept traces")
    parser.add_argument("--one", type=parse_run, help=argparse.SUPPRESS)  # the child: one traced run, in-process
    parser.add_argument("training_flags", nargs="*", help="after --: more hrpo_gsm8k.py flags for every run")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.one:
        traced_run(*args.one, args.model, args.out, args.training_flags)
        return 0
    if args.report:
        return write_report(args.out, command)
    if not args.runs:
        parser.error("give --runs ARM:SEED ... or --report")
    args.out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, args.out)
    for arm, seed in args.runs:
        if trace_path(args.out, arm, seed).exists():
            print(f"[collapse] {run_name(arm, seed)}: traced before, kept", flush=True)
            continue
        print(f"[collapse] {run_name(arm, seed)}: running", flush=True)
        started = time.time()
        try:
            run_child(arm, seed, model, args.out, args.training_flags, args.threads)
        except RuntimeError as err:
            print(f"[collapse] error: {err}", file=sys.stderr)
            return 1
        print(f"[collapse] {run_name(arm, seed)}: done in {time.time() - started:.0f} s", flush=True)
    return write_report(args.out, command)


if __name__ == "__main__":
    sys.exit(main())
