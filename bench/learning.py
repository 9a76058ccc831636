#!/usr/bin/env python3
"""Does training learn, and does the latent source matter? Plain GRPO vs the three HRPO
latent sources, on the calibrated offline task, several seeds each; and, as more arms, the
latents of HRPO's peers on HRPO's embedding source (top-k 5 and 30, SofT-GRPO's Gumbel noise on
the top-5 weights, Gaussian noise on the latent as in "Soft Tokens, Hard Truths").

Every run is `hrpo_gsm8k.py` in its own process with the settings of the CPU demo
(`configs/recipes/cpu_demo.yaml`), the arm's flags and the seed; it evaluates the whole
held-out split (200 problems, where the demo scores 64) greedily before the first step and
after the last. Runs that finished are kept (resumable: a comparison cut off midway continues
with the runs it lacks). A kept run made with other settings than the ones asked for now is an
error before anything trains, naming the runs and the settings; --rerun_changed replaces them.

    python -m bench.learning                                  # 4 arms x seeds 1 2, SmolLM2, CPU
    python -m bench.learning --seeds 1 2 3                    # adds seed 3 to a finished comparison
    python -m bench.learning --arms sources embedding_topk5_gumbel embedding_gaussian --seeds 1 2 3 4 5 --threads 1
                                                              # the comparison in bench/results/learning
    python -m bench.learning --model tiny --seeds 1 --arms grpo projection -- --max_steps 2   # smoke run
    python -m bench.learning --report                         # tables and plot from the kept records

Flags after "--" go to every hrpo_gsm8k.py run, after the demo's and the held-out size (the last
one wins): `-- --dataset_path generated:3` is the multi-step setting of
bench/results/learning_arith3, `-- --eval_samples 64` the demo's own scoring (bench/results/demo_seeds).

Writes OUT/learning.json (the bench.learning commands that ran the runs, the model and the
settings every run got, which --report keeps; per run: its command, reward per step, held-out
accuracy at step 0 and at the end, seconds per step; per arm: mean and spread over seeds;
"statistics": bench/stats.py's gain intervals, paired differences to plain GRPO with sign and
permutation tests, answered shares) and OUT/learning.png. Each finished run also leaves
OUT/records/<arm>-seed<seed>.json (small, kept in the repository): its summary, its command
(paths relative to the checkout, where runs start; older records name their checkout's absolute
paths, which are read as relative to it) and the text of its recipe (records made before that
was kept are compared against the recipe as it is now), the bench.learning command that ran it, per-problem
correctness and whether an answer was given, at step 0 and at the end, and the thread count and
machine it ran on (runs are bit-reproducible only for a fixed thread count). A run with a record
is done, also where its run folder is gone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.stats import format_table, read_records, summarize
from hrpo.tasks.arith import SPLIT_SIZES

REPO = Path(__file__).resolve().parent.parent
SETTINGS = REPO / "configs" / "recipes" / "cpu_demo.yaml"
HELD_OUT = ["--eval_samples", str(SPLIT_SIZES["test"])]  # the whole test split: one problem moves a gain by 0.005
ARMS = {
    "grpo": ["--hybrid_thinking", "off"],
    "embedding": ["--thinking_latent_source", "embedding"],
    "projection": ["--thinking_latent_source", "projection"],
    "embedding_plus_projection": ["--thinking_latent_source", "embedding_plus_projection"],
    "embedding_topk5": ["--thinking_latent_source", "embedding", "--thinking_latent_topk", "5"],
    "embedding_topk30": ["--thinking_latent_source", "embedding", "--thinking_latent_topk", "30"],
    "embedding_topk5_gumbel": ["--thinking_latent_source", "embedding", "--thinking_latent_topk", "5",
                               "--thinking_latent_noise", "gumbel", "--thinking_latent_noise_scale", "0.1"],
    "embedding_gaussian": ["--thinking_latent_source", "embedding", "--thinking_latent_noise", "gaussian",
                           "--thinking_latent_noise_scale", "0.33"],
}
ARM_GROUPS = {
    "sources": ["grpo", "embedding", "projection", "embedding_plus_projection"],
    "peers": ["embedding_topk5", "embedding_topk30", "embedding_topk5_gumbel", "embedding_gaussian"],
}
ARM_GROUPS["all"] = ARM_GROUPS["sources"] + ARM_GROUPS["peers"]


def expand_arms(names: list[str]) -> list[str]:
    """Arm names and group names (sources, peers, all), in order, each arm once."""
    return list(dict.fromkeys(arm for name in names for arm in ARM_GROUPS.get(name, [name])))


def demo_settings(path: Path = SETTINGS) -> list[str]:
    """The CPU demo's settings, as flags: its recipe."""
    return ["--config", str(path)]


def comparison_settings(flags: list[str]) -> list[str]:
    """Every comparison run's flags before its arm's: the demo's, the whole held-out split, then
    the flags given after "--"."""
    return demo_settings() + HELD_OUT + flags


def prepare_model(name: str, workdir: Path) -> str:
    if name == "smollm2":
        from hrpo import smollm2

        return str(smollm2.export_to_folder(REPO / ".cache" / "SmolLM2-135M-Instruct"))
    if name == "tiny":
        from testing.tiny import save_tiny_chat_model

        return str(save_tiny_chat_model(workdir / "tiny-model"))
    return name


def load_base_model(name: str, threads: int | None, prefix: str):
    """(model, tokenizer) of ``prepare_model(name)`` in float32 for batched generation, on ``threads``
    threads when given."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hrpo.data import left_padded

    if threads:
        torch.set_num_threads(threads)
    path = prepare_model(name, Path(tempfile.mkdtemp(prefix=prefix)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, left_padded(AutoTokenizer.from_pretrained(path), model.generation_config.eos_token_id)


def run_folder(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}-seed{seed}"


def record_path(out: Path, arm: str, seed: int) -> Path:
    return out / "records" / f"{arm}-seed{seed}.json"


def run_is_complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("eval_step0.json", "eval_final.json", "log_history.json",
                                                     "bench_run.json"))


def command_for(arm: str, seed: int, model: str, settings: list[str], folder: Path) -> list[str]:
    return [sys.executable, str(REPO / "hrpo_gsm8k.py"), *settings, "--model_name", model,
            "--output_dir", str(folder), "--seed", str(seed), *ARMS[arm]]


def script_index(command: list[str]) -> int:
    return next(i for i, token in enumerate(command) if token.endswith("hrpo_gsm8k.py"))


def checkout_relative(command: list[str]) -> list[str]:
    """A run's command with the paths inside the checkout it ran in (the interpreter of its venv,
    the script, the recipe, the model folder under .cache, the output folder) relative to that
    checkout, which is where runs start (cwd): what records keep, so that they name no machine's
    folders. Old records name the checkout absolutely; its root is the script's folder. A command
    already relative is returned as it is."""
    script = command[script_index(command)]
    if not os.path.isabs(script):
        return list(command)
    root = str(Path(script).parent) + os.sep
    return [token[len(root):] if token.startswith(root) else token for token in command]


def relative_to_repo(tokens: list[str]) -> list[str]:
    """Tokens naming a path inside this checkout, relative to it (others as they are)."""
    here = str(REPO) + os.sep
    return [token[len(here):] if token.startswith(here) else token for token in tokens]


def recipe_text(settings: list[str]) -> str | None:
    """The content of the recipe (--config) a run's settings name, kept with its record: a recipe
    edited later must not pass for the one the run was made with."""
    config = next((token for before, token in zip([None, *settings], settings) if before == "--config"), None)
    return None if config is None else (REPO / config).read_text()


def changed_settings(recorded: str, wanted: list[str], recorded_recipe: str | None = None) -> dict:
    """The training settings in which a finished run's recorded command differs from the one
    wanted now, as {field: (recorded, wanted)}: both parsed by the training parser, so
    the order of flags and repeated flags (the last one wins) do not matter. Where the run
    is written is not a setting, nor which checkout it ran in: both commands are compared
    relative to their checkouts (a recipe named relatively is read from this one, or, where the
    record kept it, ``recorded_recipe`` is the recorded command's recipe)."""
    import tempfile

    from hrpo.settings_parser import parse_settings

    def parsed(command: list[str], recipe: str | None = None) -> dict:
        flags = checkout_relative(command)[script_index(command) + 1:]
        flags = [(recipe or str(REPO / token)) if before == "--config" and not os.path.isabs(token) else token
                 for before, token in zip([None, *flags], flags)]
        values = parse_settings(flags).flat()
        values.pop("output_dir", None)
        return values

    with tempfile.TemporaryDirectory() as tmp:
        kept = None
        if recorded_recipe is not None:
            kept = Path(tmp) / "recorded_recipe.yaml"
            kept.write_text(recorded_recipe)
        before, now = parsed(shlex.split(recorded), str(kept) if kept else None), parsed(wanted)
    return {key: (before.get(key), now.get(key)) for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)}


def runs_with_other_settings(out: Path, plan: list[tuple[int, str]], model: str, settings: list[str]) -> dict:
    """{(arm, seed): changed settings} for the kept runs of the plan made with other settings
    than the ones asked for now. A finished run folder without a record gets its record first."""
    changed = {}
    for seed, arm in plan:
        folder, record = run_folder(out, arm, seed), record_path(out, arm, seed)
        if not record.exists() and run_is_complete(folder):  # finished before records were kept
            write_record(folder, record)
        if record.exists():
            recorded = json.loads(record.read_text())
            differences = changed_settings(recorded["command"], command_for(arm, seed, model, settings, folder),
                                           recorded.get("recipe"))
            if differences:
                changed[(arm, seed)] = differences
    return changed


def describe(changed: dict) -> str:
    return "\n".join(f"  {arm} seed {seed}: " + ", ".join(f"--{key} {old} -> {new}" for key, (old, new) in diff.items())
                     for (arm, seed), diff in changed.items())


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def run_arm(arm: str, seed: int, model: str, settings: list[str], folder: Path, threads: int | None,
            invocation: str | None = None) -> None:
    """One arm and seed in its own process; its output goes to <folder>.log, shown on failure.
    Its bench_run.json (and so its record) keeps the command relative to the checkout, and the
    bench.learning invocation that ran it."""
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = command_for(arm, seed, model, settings, folder)
    log = folder.with_name(folder.name + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.time()
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"{arm} seed {seed} failed (exit {proc.returncode}): {shlex.join(command)}\n{tail}")
    (folder / "bench_run.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "command": shlex.join(checkout_relative(command)), "invocation": invocation,
        "recipe": recipe_text(settings), "wall_seconds": round(time.time() - start, 1),
        "threads": threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(), "machine": machine()}))


def per_problem(evaluation: dict) -> dict:
    """1/0 per held-out problem, in order: correct, and answered (an answer could be read)."""
    examples = evaluation["examples"]
    return {"correct": [int(e["correct"]) for e in examples],
            "answered": [int(e["predicted"] is not None) for e in examples]}


def write_record(folder: Path, record: Path) -> dict:
    """The run's summary and per-problem results, kept where the run folder is not."""
    run = summarise_run(folder)
    run["problems_start"] = per_problem(json.loads((folder / "eval_step0.json").read_text()))
    run["problems_end"] = per_problem(json.loads((folder / "eval_final.json").read_text()))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run))
    return run


def summarise_run(folder: Path) -> dict:
    history = json.loads((folder / "log_history.json").read_text())
    steps = [row for row in history if "reward" in row and "step" in row]
    start = json.loads((folder / "eval_step0.json").read_text())["metrics"]
    end = json.loads((folder / "eval_final.json").read_text())["metrics"]
    meta = json.loads((folder / "bench_run.json").read_text())
    step_times = [row["step_time"] for row in history if "step_time" in row]
    return {**meta, "reward": [row["reward"] for row in steps], "accuracy_start": start["accuracy"],
            "accuracy_end": end["accuracy"], "eval_total": end["total"],
            "frac_reward_zero_std": [row.get("frac_reward_zero_std") for row in steps],
            "seconds_per_step": statistics.median(step_times) if step_times else None}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    arms = {}
    for arm in dict.fromkeys(run["arm"] for run in runs):
        mine = [run for run in runs if run["arm"] == arm]
        length = min(len(run["reward"]) for run in mine)
        arms[arm] = {
            "seeds": [run["seed"] for run in mine],
            "accuracy_start": spread([run["accuracy_start"] for run in mine]),
            "accuracy_end": spread([run["accuracy_end"] for run in mine]),
            "accuracy_gain": spread([run["accuracy_end"] - run["accuracy_start"] for run in mine]),
            "reward_per_step": [spread([run["reward"][i] for run in mine]) for i in range(length)],
            "seconds_per_step": spread([run["seconds_per_step"] for run in mine if run["seconds_per_step"]]
                                       or [0.0]),
            "wall_seconds": sum(run["wall_seconds"] for run in mine),
        }
    return arms


def plot(arms: dict, statistics: dict, target: Path) -> None:
    """Left: reward per step, mean over seeds with the min..max band. Right: each arm's held-out
    accuracy gain, its mean over seeds with the 95% bootstrap interval (bench/stats.py) and the
    per-seed gains as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, gains) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for arm, summary in arms.items():
        per_step = summary["reward_per_step"]
        steps = range(1, len(per_step) + 1)
        means = [s["mean"] for s in per_step]
        curve.plot(steps, means, label=f"{arm} (n={len(summary['seeds'])})", linewidth=1.3)
        curve.fill_between(steps, [s["min"] for s in per_step], [s["max"] for s in per_step], alpha=0.15)
    curve.set_xlabel("optimizer step")
    curve.set_ylabel("mean reward of the step's completions")
    curve.set_title("reward per step: mean over seeds, band = min..max", fontsize=9)
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    names = list(arms)
    for index, arm in enumerate(names):
        gain = statistics["arms"][arm]["gain"]
        low, high = gain["ci95"]
        gains.errorbar([index], [gain["mean"]], yerr=[[gain["mean"] - low], [high - gain["mean"]]], fmt="o",
                       color="black", capsize=4, zorder=3)
        gains.scatter([index + 0.15] * len(gain["per_seed"]), gain["per_seed"], s=12, alpha=0.6, zorder=2)
    gains.axhline(0.0, color="grey", linewidth=0.8)
    gains.set_xticks(range(len(names)), names, fontsize=7, rotation=35, ha="right")
    gains.set_ylabel("held-out accuracy gain (end - step 0)")
    gains.set_title("gain: mean over seeds with 95% bootstrap CI; dots = seeds", fontsize=9)
    gains.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


def print_table(arms: dict) -> None:
    print(f"\n{'arm':27s} {'seeds':>6s} {'acc step 0':>16s} {'acc end':>16s} {'gain':>16s} {'s/step':>7s}")
    for arm, s in arms.items():
        cell = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
        print(f"{arm:27s} {len(s['seeds']):6d} {cell(s['accuracy_start']):>16s} {cell(s['accuracy_end']):>16s} "
              f"{cell(s['accuracy_gain']):>16s} {s['seconds_per_step']['mean']:7.1f}")


def kept_records(out: Path) -> list[dict]:
    """Every record under OUT/records, arms in bench order (ARMS), then by seed."""
    order = {arm: index for index, arm in enumerate(ARMS)}
    grouped = read_records(out)
    return [record for arm in sorted(grouped, key=lambda a: (order.get(a, len(order)), a))
            for record in sorted(grouped[arm], key=lambda r: r["seed"])]


def invocation_of(argv: list[str]) -> str:
    """A bench.learning command line as one would type it in the checkout: paths relative to it."""
    return shlex.join(["python", "-m", "bench.learning", *relative_to_repo(argv)])


def run_settings(command: str) -> list[str]:
    """The flags a run's recorded command gave before its model (command_for's order): the
    comparison's settings, relative to the checkout."""
    tokens = checkout_relative(shlex.split(command))
    flags = tokens[script_index(tokens) + 1:]
    return flags[:flags.index("--model_name")] if "--model_name" in flags else flags


def provenance(out: Path, records: list[dict]) -> dict:
    """What learning.json says about how its runs were made, kept across rebuilds: the
    bench.learning invocations that ran them ("commands"; from the records that name theirs and
    from the learning.json there was, where an older one kept a single "command"), the model
    and the settings every run got. Where no learning.json said which settings, they are read
    from the records' commands, when all runs got the same."""
    before = json.loads((out / "learning.json").read_text()) if (out / "learning.json").exists() else {}
    commands = list(before.get("commands", []))
    if not commands and before.get("command") and "--report" not in shlex.split(before["command"]):
        old = shlex.split(before["command"])  # an older file: "learning.py ARGS", the last run's
        commands = [invocation_of(old[1:] if old and old[0].endswith("learning.py") else old)]
    commands += [record["invocation"] for record in records if record.get("invocation")]
    kept = {"commands": list(dict.fromkeys(commands))}
    if "model" in before:
        kept["model"] = before["model"]
    if "settings" in before:
        kept["settings"] = relative_to_repo(before["settings"])
    else:
        distinct = {tuple(run_settings(record["command"])) for record in records if record.get("command")}
        if len(distinct) == 1:
            kept["settings"] = list(distinct.pop())
    return kept


def write_report(out: Path, records: list[dict], extra: dict) -> None:
    """OUT/learning.json, OUT/learning.png and the printed tables, from run records; what the
    learning.json there was said about the commands and settings is kept (provenance), `extra`
    added over it."""
    runs = [{k: v for k, v in run.items() if not k.startswith("problems_")} for run in records]
    for run in runs:
        if run.get("command"):
            run["command"] = shlex.join(checkout_relative(shlex.split(run["command"])))
    arms = summarise(runs)
    comparison = summarize({arm: [r for r in records if r["arm"] == arm] for arm in arms})
    described = provenance(out, records)
    described.update(extra)
    described["commands"] = list(dict.fromkeys(described["commands"]))
    result = {**described, "arms": arms, "statistics": comparison, "runs": runs,
              "cpu_seconds_all_runs": round(sum(run["wall_seconds"] for run in runs), 1)}
    (out / "learning.json").write_text(json.dumps(result, indent=2))
    plot(arms, comparison, out / "learning.png")
    print_table(arms)
    print("\n" + format_table(comparison))
    print(f"\nwrote {out / 'learning.json'} and {out / 'learning.png'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["sources"], choices=list(ARMS) + list(ARM_GROUPS),
                        help="arms or groups: sources (plain GRPO and the 3 latent sources, the default), "
                             "peers (top-k 5 / 30, Gumbel, Gaussian on the embedding source), all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline), tiny (smoke runs) or a model folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learning")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every run (default: the environment's; runs are bit-reproducible "
                             "only for a fixed thread count)")
    parser.add_argument("training_flags", nargs="*", help="after --: more hrpo_gsm8k.py flags for every run")
    parser.add_argument("--rerun_changed", action="store_true",
                        help="run again (replacing them) the kept runs made with other settings than the ones asked "
                             "for now; without it such runs are an error")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rebuild OUT/learning.json, the table and OUT/learning.png from every "
                             "record kept in OUT/records")
    args = parser.parse_args(argv)
    args.arms = expand_arms(args.arms)
    command = invocation_of(list(argv if argv is not None else sys.argv[1:]))
    if args.report:
        records = kept_records(args.out)
        if not records:
            print(f"[learning] error: --report: no records under {args.out / 'records'}", file=sys.stderr)
            return 1
        write_report(args.out, records, {"rebuilt_by": command})
        return 0

    settings = comparison_settings(args.training_flags)
    args.out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, args.out)
    plan = [(seed, arm) for seed in args.seeds for arm in args.arms]  # seed-major: a cut-off comparison
    changed = runs_with_other_settings(args.out, plan, model, settings)  # still has every arm at the first seeds
    if changed and not args.rerun_changed:
        print(f"[learning] error: {len(changed)} kept run(s) under {args.out} were made with other settings than the "
              f"ones asked for now (recorded -> asked):\n{describe(changed)}\nAsk for the settings they were made "
              "with, choose another --out, or give --rerun_changed to replace them.", file=sys.stderr)
        return 1
    started = time.time()
    for seed, arm in plan:
        folder, record = run_folder(args.out, arm, seed), record_path(args.out, arm, seed)
        if record.exists() and (arm, seed) not in changed:
            print(f"[learning] {arm} seed {seed}: done before, kept", flush=True)
            continue
        print(f"[learning] {arm} seed {seed}: running", flush=True)
        try:
            run_arm(arm, seed, model, settings, folder, args.threads, command)
        except RuntimeError as err:
            print(f"[learning] error: {err}", file=sys.stderr)
            return 1
        run = write_record(folder, record)
        print(f"[learning] {arm} seed {seed}: accuracy {run['accuracy_start']:.3f} -> {run['accuracy_end']:.3f}, "
              f"{run['wall_seconds']:.0f} s", flush=True)
    records = [json.loads(record_path(args.out, arm, seed).read_text()) for seed, arm in plan]
    described = provenance(args.out, records)
    write_report(args.out, records, {"commands": described["commands"] + [command], "model": args.model,
                                     "settings": relative_to_repo(settings),
                                     "this_invocation_seconds": round(time.time() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
