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

    python -m bench.collapse --runs projection:1 projection:11 grpo:11 projection:12 grpo:12 \
        embedding_plus_projection:1 projection:12:hold projection:11:hold --threads 1    # bench/results/collapse
    python -m bench.collapse --report            # collapse.json, the plots and the table from the kept traces
    python -m bench.collapse --model tiny --runs projection:1 --out /tmp/c -- --max_steps 2   # smoke run

The runs coast as the demo did when its runs collapsed (`--skip_steps_without_signal false`, at
its learning rate of then, 5e-4; flags after "--" can change that). ARM:SEED:hold is the
counterfactual that made the case for that option: after every step whose gradient is exactly
zero (no group's rewards differed), the weights and AdamW's state are put back as they were
(HoldWithoutSignal), so the policy does not move on AdamW's moments alone;
`--skip_steps_without_signal` gives the same weights (tests/test_skip_steps.py).

Flags after "--" go to every training run, after the demo's (the last one wins). Runs with a
trace are done (resumable). Writes OUT/traces/<run>.json.gz (gzipped JSON, 10-25 kB, kept in the
repository; `zcat` reads it) and, from all traces, OUT/collapse.json, OUT/collapse.png (the runs)
and OUT/collapse_hold.png (each counterfactual beside its run); the run folders and their logs
go to OUT/runs/ (not kept). The reading: bench/README.md, "The collapse, explained".
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


VARIANTS = ("", "hold")  # hold: the counterfactual of HoldWithoutSignal


def parse_run(text: str) -> tuple[str, int, str]:
    arm, _, rest = text.partition(":")
    seed, _, variant = rest.partition(":")
    if arm not in ARMS or not seed.isdigit() or variant not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARM:SEED or ARM:SEED:hold with ARM one of "
                                         f"{', '.join(ARMS)}")
    return arm, int(seed), variant


def run_name(arm: str, seed: int, variant: str = "") -> str:
    return f"{arm}-seed{seed}" + (f"-{variant}" if variant else "")


def trace_path(out: Path, arm: str, seed: int, variant: str = "") -> Path:
    return out / "traces" / f"{run_name(arm, seed, variant)}.json.gz"


def write_trace(path: Path, record: dict) -> None:
    """Compact JSON, gzipped (a run's completions are most of it: 90-170 kB as text, 10-25 kB gzipped);
    the same bytes for the same record (no time stamp in the gzip header). `zcat` reads it."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(json.dumps(compact(record), separators=(",", ":")).encode())


def read_trace(path: Path) -> dict:
    import gzip

    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


# The traced recipe is the demo's as it was when its runs collapsed: AdamW stepping on batches
# without signal, at the learning rate of then. "-- --skip_steps_without_signal true --learning_rate 2e-4"
# traces the demo's recipe as it is now.
COASTING = ["--skip_steps_without_signal", "false", "--learning_rate", "5e-4"]


def training_argv(arm: str, seed: int, model: str, folder: Path, flags: list[str]) -> list[str]:
    """The run's hrpo_gsm8k.py flags: the demo's recipe (coasting), the flags after "--", the model, the seed,
    the arm."""
    return [*demo_settings(), *COASTING, *flags, "--model_name", model, "--output_dir", str(folder), "--seed", str(seed),
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


class HoldWithoutSignal:
    """A counterfactual for this report, not a training option: on a step whose gradient is exactly
    zero in every parameter (no group's rewards differed, and the demo has no KL term), AdamW's
    step is undone (weights, moments and step count restored), so the policy stays where the last
    step with a signal left it instead of moving on its moments. Add it before the trace, so that
    the trace records the step as it was kept."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.trainer, self.saved, self.held = trainer, None, []
        hold = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                hold.before_step()

            def on_optimizer_step(self, args, state, control, **kwargs):
                hold.after_step()

        self.callback = Callback()

    def _params(self):
        return [p for group in self.trainer.optimizer.param_groups for p in group["params"]]

    def _inner(self):
        optimizer = self.trainer.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def before_step(self) -> None:
        params = self._params()
        if any(p.grad is not None and bool(p.grad.any()) for p in params):
            self.saved = None
            return
        state = self._inner().state
        self.saved = ([p.detach().clone() for p in params],
                      [{k: v.clone() if hasattr(v, "clone") else v for k, v in state[p].items()} if p in state else None
                       for p in params])

    def after_step(self) -> None:
        if self.saved is None:
            return
        import torch

        weights, states = self.saved
        inner = self._inner()
        with torch.no_grad():
            for p, weight, saved in zip(self._params(), weights, states):
                p.copy_(weight)
                if saved is None:
                    inner.state.pop(p, None)
                    continue
                for key, value in saved.items():
                    if hasattr(inner.state[p][key], "copy_"):
                        inner.state[p][key].copy_(value)
                    else:
                        inner.state[p][key] = value
        self.held.append(self.trainer.state.global_step + 1)
        self.saved = None


def traced_run(arm: str, seed: int, model: str, out: Path, flags: list[str], variant: str = "") -> Path:
    """hrpo_gsm8k.py's run (hrpo.run.train) with the trace attached; writes the trace file."""
    import torch

    from hrpo.backend import import_unsloth
    from hrpo.command_line import requested_backend

    argv = training_argv(arm, seed, model, out / "runs" / run_name(arm, seed, variant), flags)
    if requested_backend(argv) != "transformers":
        import_unsloth(torch.cuda.is_available())  # first, as hrpo.train does
    from hrpo.collapse_trace import attach
    from hrpo.run import build_trainer, prepare
    from hrpo.settings_parser import settings_parser

    start, code = time.time(), code_state()
    settings = prepare(argv, settings_parser(task="gsm8k"))  # hrpo_gsm8k.py's parser
    folder = Path(settings.training.output_dir)
    trainer = build_trainer(settings)
    hold = HoldWithoutSignal(trainer) if variant == "hold" else None
    if hold is not None:
        trainer.add_callback(hold.callback)  # before the trace's callback: it records the step as kept
    trace = attach(trainer)
    trainer.train()
    (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.evaluate(file_name="eval_final.json")
    record = {
        "arm": arm, "seed": seed, "variant": variant, "command": shlex.join(["hrpo_gsm8k.py", *argv]),
        "held_steps": hold.held if hold is not None else None,
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(), "machine": machine(),
        "wall_seconds": round(time.time() - start, 1), "code": code,
        "max_completion_length": settings.training.max_completion_length,
        "num_generations": settings.training.num_generations,
        "eval_start": evaluation_summary(folder / "eval_step0.json") if (folder / "eval_step0.json").exists() else None,
        "eval_end": evaluation_summary(folder / "eval_final.json") if (folder / "eval_final.json").exists() else None,
        "steps": trace.to_json(),
    }
    target = trace_path(out, arm, seed, variant)
    write_trace(target, record)
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


def run_child(arm: str, seed: int, variant: str, model: str, out: Path, flags: list[str], threads: int | None) -> None:
    """One traced run in its own process; its output goes to OUT/runs/<run>.log, shown on failure."""
    name = run_name(arm, seed, variant)
    log = out / "runs" / f"{name}.log"
    folder = out / "runs" / name
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{arm}:{seed}" + (f":{variant}" if variant else "")
    command = [sys.executable, "-m", "bench.collapse", "--one", spec, "--model", model, "--out", str(out), "--", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {shlex.join(command)}\n{tail}")


# ---------------------------------------------------------------- reading the traces

def share(rows: list[dict], key: str) -> float | None:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


MARKER = "####"


def markers(row: dict) -> int:
    return row.get("text", "").count(MARKER) if "text" in row else int(bool(row["marker"]))


def one_clean_answer(row: dict) -> bool:
    """The format a correct completion has: the marker once, an answer after it, ended before the limit."""
    return markers(row) == 1 and row["answered"] and not row["cut"]


def groups(trace: dict, completions: list[dict]) -> list[list[dict]]:
    size = trace.get("num_generations") or 4  # the demo's group size (traces before it was recorded are demo runs)
    return [completions[i:i + size] for i in range(0, len(completions), size)]


def varies(group: list[dict], test) -> bool:
    return len({bool(test(row)) for row in group}) > 1


def per_step(trace: dict) -> list[dict]:
    """One flat row per step: the figures the report and the plot use."""
    rows = []
    for step in trace["steps"]:
        logs, completions = step.get("logs", {}), step.get("completions", [])
        thinking, optimizer = step.get("thinking", {}), step.get("optimizer", {})
        flat = [{"repeats": markers(c) >= 2, "clean": one_clean_answer(c)} for c in completions]
        parts = groups(trace, completions)
        row = {"step": step["step"], "reward": logs.get("reward"),
               "no_signal": logs.get("frac_reward_zero_std") is not None and logs["frac_reward_zero_std"] >= 1.0,
               "cut": logs.get("completions/clipped_ratio"), "cut_traced": share(completions, "cut"),
               "marker": share(completions, "marker"), "answered": share(completions, "answered"),
               "marker_repeated": share(flat, "repeats"), "one_clean_answer": share(flat, "clean"),
               "groups": len(parts),
               "groups_cut_varies": sum(varies(g, lambda r: r["cut"]) for g in parts),
               "groups_clean_varies": sum(varies(g, one_clean_answer) for g in parts),
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
        "arm": trace["arm"], "seed": trace["seed"], "variant": trace.get("variant", ""),
        "held_steps": trace.get("held_steps"), "steps": last_step, "wall_seconds": trace["wall_seconds"],
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
        # from this step on, at most one completion in eight (or none) writes the marker, on every step
        "marker_rare_from_step": next((r["step"] for i, r in enumerate(rows)
                                       if all((later["marker"] or 0) <= 0.125 for later in rows[i:])), None),
        "cut_share_last_10": mean(r["cut"] for r in rows[-10:]),
        "marker_share_first_5": mean(r["marker"] for r in rows[:5]),
        "marker_share_last_10": mean(r["marker"] for r in rows[-10:]),
        "marker_repeated_share_first_5": mean(r["marker_repeated"] for r in rows[:5]),
        "marker_repeated_share_last_10": mean(r["marker_repeated"] for r in rows[-10:]),
        "one_clean_answer_share_first_5": mean(r["one_clean_answer"] for r in rows[:5]),
        "one_clean_answer_share_last_10": mean(r["one_clean_answer"] for r in rows[-10:]),
        "first_step_marker_repeated_in_most": next((r["step"] for r in rows if (r["marker_repeated"] or 0) > 0.5),
                                                   None),
        "length_first_5": mean(r["length"] for r in rows[:5]), "length_last_10": mean(r["length"] for r in rows[-10:]),
        "distinct_4gram_first_5": mean(r["distinct_4gram"] for r in rows[:5]),
        "distinct_4gram_last_10": mean(r["distinct_4gram"] for r in rows[-10:]),
        # the groups whose correctness rewards were all equal (no signal), and among them those in which a
        # reward that also scored the format (one answer, ended) or the length (cut or not) would have differed
        "groups_without_signal": sum(r["groups"] for r in rows if r["no_signal"]),
        "of_which_one_clean_answer_varies": sum(r["groups_clean_varies"] for r in rows if r["no_signal"]),
        "of_which_cut_varies": sum(r["groups_cut_varies"] for r in rows if r["no_signal"]),
    }
    # how often the reward paid for a repeated marker (identical repeated answers count once), before
    # repetition took over and over the whole run: [rewarded completions that repeat it, rewarded completions]
    took_over = summary["first_step_marker_repeated_in_most"] or last_step + 1
    rewarded = [(step["step"], c) for step in trace["steps"] for c in step.get("completions", [])
                if (c.get("reward") or 0) > 0]
    summary["rewarded_repeating_marker_before_it_took_over"] = [
        sum(markers(c) >= 2 for n, c in rewarded if n < took_over), sum(n < took_over for n, _ in rewarded)]
    summary["rewarded_repeating_marker"] = [sum(markers(c) >= 2 for _, c in rewarded), len(rewarded)]
    tail = [r["reward"] for r in rows[-20:]]
    summary["zero_reward_share_last_20"] = sum(r == 0 for r in tail) / len(tail)
    summary["collapsed"] = summary["zero_reward_share_last_20"] >= 0.9  # stopped earning: reward 0 on 18 of the last 20
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
            # None where nothing moved on those steps (the counterfactual undid them)
            "weight_decay_share_of_zero_gradient_moves": (
                sum(r[f"{group}/weight_decay_step_norm"] or 0.0 for r in zero_grad)
                / sum(r[key] or 0.0 for r in zero_grad)) if sum(r[key] or 0.0 for r in zero_grad) > 0 else None,
        }
    return summary


def read_traces(out: Path) -> list[dict]:
    order = {arm: index for index, arm in enumerate(ARMS)}
    traces = [read_trace(path) for path in sorted((out / "traces").glob("*.json*"))]
    return sorted(traces, key=lambda t: (order.get(t["arm"], len(order)), t["seed"], t.get("variant", "")))


# ---------------------------------------------------------------- the report

def print_report(summaries: list[dict]) -> None:
    print(f"\n{'run':32s} {'acc start->end':>15s} {'answered':>10s} {'no-signal':>9s} {'last signal':>11s} "
          f"{'marker gone':>11s} {'cut last10':>10s} {'LoRA path, 0 grad':>17s} {'proj path, 0 grad':>17s}")
    for s in summaries:
        acc = f"{s['accuracy_start']:.3f}->{s['accuracy_end']:.3f}" if s["accuracy_end"] is not None else "-"
        answered = f"{s['answered_start']}->{s['answered_end']}" if s["answered_end"] is not None else "-"
        lora, proj = s.get("main_decay", {}), s.get("projection", {})

        def moved(group):  # the share of the group's path (sum of update norms) taken on zero-gradient steps
            if not group.get("path_length"):
                return "-"
            return f"{group['moved_with_zero_gradient'] / group['path_length']:.0%}"

        name = run_name(s["arm"], s["seed"], s["variant"])
        print(f"{name:32s} {acc:>15s} {answered:>10s} {s['steps_without_signal']:9d} "
              f"{str(s['last_step_with_signal']):>11s} {str(s['marker_gone_from_step']):>11s} "
              f"{s['cut_share_last_10'] or 0:10.2f} {moved(lora):>17s} {moved(proj):>17s}")


def plot(traces: list[dict], target: Path) -> None:
    """One column per run. Rows: what the completions do (reward, the answer marker once and
    repeated, one clean answer, cut at the limit); their length and repetition; the optimizer
    (the update applied per step against the gradient it stepped on); where the weights went
    (distance from the start, and how much of the way was covered on steps without a gradient).
    Steps without reward signal are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(traces)
    fig, axes = plt.subplots(4, columns, figsize=(3.9 * columns, 12.5), sharex=True, squeeze=False)
    for column, trace in enumerate(traces):
        rows, summary = per_step(trace), summarize_trace(trace)
        steps = [r["step"] for r in rows]
        title = f"{trace['arm']} seed {trace['seed']}" + (
            ", steps without gradient undone" if trace.get("variant") == "hold" else "")
        if summary["accuracy_end"] is not None:
            title += (f"\nheld-out {summary['accuracy_start']:.3f} -> {summary['accuracy_end']:.3f}, "
                      f"answered {summary['answered_start']} -> {summary['answered_end']} of {summary['eval_total']}")
        top, lengths, optimizer, distance = (axes[i][column] for i in range(4))
        top.set_title(title, fontsize=9)
        top.plot(steps, [r["reward"] for r in rows], "o-", ms=3, color="tab:green", label="reward")
        top.plot(steps, [r["marker"] for r in rows], "-", lw=0.8, color="tab:cyan", label="#### at least once")
        top.plot(steps, [r["marker_repeated"] for r in rows], "s-", ms=3, color="tab:purple",
                 label="#### twice or more")
        top.plot(steps, [r["one_clean_answer"] for r in rows], "d-", ms=3, color="tab:blue",
                 label="#### once, answer, ended")
        top.plot(steps, [r["cut"] for r in rows], "^-", ms=3, color="tab:red", label="cut at the length limit")
        top.set_ylim(-0.05, 1.05)
        top.set_ylabel("share of the step's completions" if column == 0 else "")
        lengths.plot(steps, [r["length"] for r in rows], "o-", ms=3, color="tab:brown", label="mean length, tokens")
        lengths.set_ylim(0, (trace.get("max_completion_length") or 64) * 1.1)
        right = lengths.twinx()
        right.plot(steps, [r["distinct_4gram"] for r in rows], "-", color="tab:orange",
                   label="distinct 4-gram share (right)")
        right.plot(steps, [r["entropy"] for r in rows], "--", color="tab:gray", label="entropy, nats (right)")
        right.set_ylim(0, 1.1)
        for group, name, color in (("main_decay", "LoRA", "tab:blue"), ("projection", "projection", "tab:red")):
            if f"{group}/update_norm" not in rows[0]:
                continue
            grad = [r[f"{group}/grad_norm"] for r in rows]
            update = [r[f"{group}/update_norm"] or float("nan") for r in rows]  # an undone step (hold) is a gap
            optimizer.plot(steps, update, ".-", ms=4, color=color, label=f"{name}: update applied")
            optimizer.plot(steps, [g if g else float("nan") for g in grad], "o:", ms=2.5, color=color,
                           label=f"{name}: gradient (clipped)")
            optimizer.scatter([s for s, g in zip(steps, grad) if not g], [u for u, g in zip(update, grad) if not g],
                              marker="x", color=color, s=22, zorder=3)
        optimizer.set_yscale("log")
        optimizer.set_ylabel("norm per step (x: zero gradient)" if column == 0 else "")
        lora = [r["main_decay/drift_from_start"] for r in rows]
        coasted, total = [], 0.0
        for r in rows:
            total += r["main_decay/update_norm"] if not r["main_decay/grad_norm"] else 0.0
            coasted.append(total)
        distance.plot(steps, lora, "-", color="tab:blue", label="LoRA: distance from start")
        distance.plot(steps, coasted, "--", color="tab:blue", label="LoRA: sum of updates with zero gradient")
        distance.set_ylabel("LoRA weights (L2)" if column == 0 else "")
        if rows[0].get("projection_drift") is not None:
            drift = distance.twinx()
            drift.plot(steps, [r["projection_drift"] for r in rows], "-", color="tab:red",
                       label="projection: drift / initial norm (right)")
            drift.set_ylim(0, 0.6)
            if column == 0:
                drift.legend(fontsize=7, loc="center right")
        gates = [r["gate_a"] for r in rows if r["gate_a"] is not None]
        if gates:
            change = [r["input_change"] for r in rows if r["input_change"] is not None]
            distance.text(0.03, 0.97, f"gate a {min(gates):.4f}-{max(gates):.4f}\n|mixed input - e| / |e| "
                          f"{min(change):.3f}-{max(change):.3f}", transform=distance.transAxes, fontsize=7, va="top")
        else:
            distance.text(0.03, 0.97, "no hybrid mixing (plain GRPO)", transform=distance.transAxes, fontsize=7,
                          va="top")
        for axis in (top, lengths, optimizer, distance):
            axis.grid(alpha=0.3)
            for r in rows:
                if r["no_signal"]:
                    axis.axvspan(r["step"] - 0.5, r["step"] + 0.5, color="grey", alpha=0.13, lw=0)
        distance.set_xlabel("optimizer step (shaded: no reward signal)")
        if column == 0:
            top.legend(fontsize=7, loc="center right")
            lengths.legend(fontsize=7, loc="lower left")
            right.legend(fontsize=7, loc="lower right")
            optimizer.legend(fontsize=7, loc="lower left")
            distance.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_small_png(fig, target)
    plt.close(fig)


def save_small_png(fig, target: Path, dpi: int = 90, colors: int = 64) -> None:
    """The figure as a PNG of a few hundred kB: rendered, then reduced to a palette of ``colors``
    (line plots need few) with PIL, which matplotlib depends on."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
        target, optimize=True)


def write_report(out: Path, command: str) -> int:
    traces = read_traces(out)
    if not traces:
        print(f"[collapse] error: no traces under {out / 'traces'}", file=sys.stderr)
        return 1
    summaries = [summarize_trace(t) for t in traces]
    (out / "collapse.json").write_text(json.dumps({"command": command, "runs": summaries}, indent=2))
    # the runs that kept learning first, then the collapsed ones, by seed
    plain = sorted((t for t in traces if not t.get("variant")),
                   key=lambda t: (summarize_trace(t)["collapsed"], t["seed"], list(ARMS).index(t["arm"])))
    written = [out / "collapse.json"]
    if plain:
        plot(plain, out / "collapse.png")
        written.append(out / "collapse.png")
    held = [t for t in traces if t.get("variant") == "hold"]
    if held:  # each counterfactual beside the run it changes
        pairs = []
        for trace in held:
            pairs += [t for t in plain if (t["arm"], t["seed"]) == (trace["arm"], trace["seed"])] + [trace]
        plot(pairs, out / "collapse_hold.png")
        written.append(out / "collapse_hold.png")
    print_report(summaries)
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[],
                        help="ARM:SEED, ARM as in bench/learning.py (projection is the demo, grpo plain GRPO); "
                             "ARM:SEED:hold the counterfactual run in which steps without a gradient are undone")
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline), tiny (smoke runs) or a model folder")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--report", action="store_true", help="run nothing: the report from the kept traces")
    parser.add_argument("--one", type=parse_run, help=argparse.SUPPRESS)  # the child: one traced run, in-process
    parser.add_argument("training_flags", nargs="*", help="after --: more hrpo_gsm8k.py flags for every run")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.one:
        arm, seed, variant = args.one
        traced_run(arm, seed, args.model, args.out, args.training_flags, variant)
        return 0
    if args.report:
        return write_report(args.out, command)
    if not args.runs:
        parser.error("give --runs ARM:SEED ... or --report")
    args.out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, args.out)
    for arm, seed, variant in args.runs:
        name = run_name(arm, seed, variant)
        if trace_path(args.out, arm, seed, variant).exists():
            print(f"[collapse] {name}: traced before, kept", flush=True)
            continue
        print(f"[collapse] {name}: running", flush=True)
        started = time.time()
        try:
            run_child(arm, seed, variant, model, args.out, args.training_flags, args.threads)
        except RuntimeError as err:
            print(f"[collapse] error: {err}", file=sys.stderr)
            return 1
        print(f"[collapse] {name}: done in {time.time() - started:.0f} s", flush=True)
    return write_report(args.out, command)


if __name__ == "__main__":
    sys.exit(main())
