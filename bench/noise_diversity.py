#!/usr/bin/env python3
"""What sharing exploration noise within a GRPO group costs in rollout diversity.

Our exploration noise (exploration.py in the transformers fork) is drawn from keys that fold
a per-generate()-call seed with each row's tokens so far. The rollouts of one GRPO group
(the same prompt, repeated in one generate() call) therefore share their noise draws for as
long as their tokens agree; only the token sampler (torch.multinomial) separates them. The
peers (SofT-GRPO, "Soft Tokens, Hard Truths") draw the noise independently per rollout. We
key by tokens so that the replay can find a rollout's inputs by its tokens.

This bench samples GRPO groups on the demo's task and settings (`arith`, HRPO's system
prompt, group 4, T = 0.5, top_k 0, 64 completion tokens, the trainer's stop ids; each prompt
repeated group-size times in a row, as TRL's sampler lays a batch out) with hybrid sampling,
for each noise variant in two conditions:

    ours         the keys as implemented (shared within a group while the tokens agree)
    independent  each row's initial key also folds its row index, so no two rows of a call
                 share a draw (a bench-only stand-in for per-rollout noise; see
                 independent_row_noise)

plus a noise-free reference (--references, default the plain `embedding` latent). Every
condition gets the same prompts and the same torch seed per batch, so "ours" and
"independent" also get the same draws for the token sampler: they differ only in the noise.

Per condition: distinct completions per group (token-exact, up to the stop token), the share
of groups whose completions are all identical, the first position at which two rollouts of a
group differ (mean over the pairs that differ) and the share of identical pairs, the mean
reward and the share of groups whose rewards are all equal (no GRPO advantage).

    python -m bench.noise_diversity --model smollm2                       # 64 prompts x group 4
    python -m bench.noise_diversity --model tiny-qwen2 --prompts 2 --new-tokens 4 --json r.json   (smoke run)

The JSON is written after every condition; a run cut off midway continues from it (the
conditions it holds are kept when their settings match the ones asked for now).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.decoding import load
from testing.variants import latent_variant

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "noise_diversity.json"
# The learning comparison's noise arms (bench/learning.py): Gaussian 0.33 on the embedding
# latent ("Soft Tokens, Hard Truths"), top-5 + Gumbel temperature 0.1 (SofT-GRPO).
VARIANTS = ["embedding+gaussian", "embedding+top5+gumbel"]


# The settings a kept condition must share with the run asked for.
SETTINGS = ("model", "prompts", "group_size", "batch_prompts", "max_new_tokens", "temperature", "seed")


@contextlib.contextmanager
def independent_row_noise():
    """Bench-only stand-in for per-rollout noise (SofT-GRPO, "Soft Tokens, Hard Truths"):
    generation's ``initial_keys`` is wrapped so that each row's prompt key also folds the
    row's index in the batch. Rows then never share a key (advance_keys is a bijection of the
    key for a given token), so every rollout draws its own noise at every position, whatever
    its tokens. Not for training: the replay could no longer find a rollout's inputs by its
    tokens alone."""
    from transformers.hybrid_thinking import generation
    from transformers.hybrid_thinking.exploration import advance_keys

    original = generation.initial_keys

    def keyed_by_row(seed, input_ids, attention_mask):
        keys = original(seed, input_ids, attention_mask)
        rows = torch.arange(keys.shape[0], device=keys.device)
        return advance_keys(keys, rows)

    generation.initial_keys = keyed_by_row
    try:
        yield
    finally:
        generation.initial_keys = original


def truncate(ids: list[int], stop_ids: set[int]) -> tuple[int, ...]:
    """A completion's tokens up to and including its first stop token (the rest is padding)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return tuple(ids[:position + 1])
    return tuple(ids)


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """The first completion position where two rollouts differ; None when identical."""
    if a == b:
        return None
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return min(len(a), len(b))  # one is a prefix of the other


def group_metrics(completions: list[tuple[int, ...]], rewards: list[float]) -> dict:
    pairs = [first_difference(a, b) for a, b in itertools.combinations(completions, 2)]
    return {"distinct": len(set(completions)), "rewards": rewards,
            "pair_divergence": pairs}


def summarize(groups: list[dict], group_size: int) -> dict:
    pairs = [p for g in groups for p in g["pair_divergence"]]
    differing = [p for p in pairs if p is not None]
    distinct = [g["distinct"] for g in groups]
    rewards = [r for g in groups for r in g["rewards"]]
    return {
        "groups": len(groups),
        "rollouts": len(rewards),
        "distinct_per_group_mean": statistics.fmean(distinct),
        "distinct_per_group_hist": {str(k): distinct.count(k) for k in range(1, group_size + 1)},
        "all_identical_share": sum(d == 1 for d in distinct) / len(groups),
        "identical_pair_share": (len(pairs) - len(differing)) / len(pairs) if pairs else None,
        "divergence_position_mean": statistics.fmean(differing) if differing else None,
        "divergence_position_median": statistics.median(differing) if differing else None,
        "reward_mean": statistics.fmean(rewards),
        "equal_reward_group_share": sum(len(set(g["rewards"])) == 1 for g in groups) / len(groups),
        "per_group_distinct": distinct,
    }


def paired_difference(a: list[int], b: list[int]) -> dict:
    """Per group (same prompt and seed), b - a: mean and its standard error."""
    diffs = [y - x for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean": statistics.fmean(diffs), "standard_error": se,
            "groups_more_distinct": sum(d > 0 for d in diffs), "groups_fewer_distinct": sum(d < 0 for d in diffs)}


def sample_groups(model, tokenizer, task, rows, args, config, stop_ids) -> list[dict]:
    """All groups of one condition: batches of --batch-prompts prompts, each repeated group-size times."""
    groups = []
    for batch_index, first in enumerate(range(0, len(rows), args.batch_prompts)):
        batch = rows[first:first + args.batch_prompts]
        texts = [tokenizer.apply_chat_template(task.to_prompt(row["question"], "hrpo"), tokenize=False,
                                               add_generation_prompt=True)
                 for row in batch for _ in range(args.group_size)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(args.seed + batch_index)  # the same per batch in every condition
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config, processing_class=tokenizer,
                                 answer_marker=task.answer_marker)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        completions = [truncate(ids, stop_ids) for ids in sequences[:, enc.input_ids.shape[1]:].tolist()]
        texts = tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)
        for g, row in enumerate(batch):
            span = slice(g * args.group_size, (g + 1) * args.group_size)
            rewards = [float(task.grade(text, row)["correct"]) for text in texts[span]]
            groups.append(group_metrics(completions[span], rewards))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2", help="tiny-qwen2, tiny-llama, smollm2, or a hub name/path")
    parser.add_argument("--variants", nargs="+", default=VARIANTS,
                        help="noisy latent variants (testing/variants.py), e.g. embedding+top5+gumbel")
    parser.add_argument("--references", nargs="*", default=["embedding"],
                        help="noise-free latent variants sampled as references (e.g. embedding embedding+top5)")
    parser.add_argument("--prompts", type=int, default=64, help="groups: the first N problems of arith's train split")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch-prompts", type=int, default=8, help="prompts (groups) per generate() call")
    parser.add_argument("--new-tokens", type=int, default=64, help="max completion length")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the first batch (then +1 per batch)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the results (default for smollm2: {DEFAULT_JSON.relative_to(REPO)})")
    args = parser.parse_args()
    for variant in args.variants:
        if latent_variant(variant)["thinking_latent_noise"] == "none":
            parser.error(f"--variants {variant}: no noise (+gaussian or +gumbel) to compare")
    for reference in args.references:
        if latent_variant(reference)["thinking_latent_noise"] != "none":
            parser.error(f"--references {reference}: a reference has no noise")
    json_path = args.json or (DEFAULT_JSON if args.model == "smollm2" else None)

    from hrpo.held_out import decoding_config, trainer_stop_ids
    from hrpo.tasks import get_task

    conditions = []  # (name, variant, independent)
    for variant in args.variants:
        conditions += [(f"{variant} ours", variant, False), (f"{variant} independent", variant, True)]
    conditions += [(f"{reference} (no noise)", reference, False) for reference in args.references]

    command = ("python -m bench.noise_diversity " + shlex.join(sys.argv[1:])).strip()
    result = {"command": command, "model": args.model, "threads": torch.get_num_threads(),
              "task": "arith (generated train split, first N problems)", "system_prompt": "hrpo",
              "prompts": args.prompts, "group_size": args.group_size, "batch_prompts": args.batch_prompts,
              "max_new_tokens": args.new_tokens, "temperature": args.temperature, "top_k": 0, "seed": args.seed,
              "torch_seeds": [args.seed + b for b in range(-(-args.prompts // args.batch_prompts))],
              "conditions": {}}
    if json_path and json_path.exists():  # resume: keep the conditions of a run with the same settings
        previous = json.loads(json_path.read_text())
        if all(previous.get(key) == result[key] for key in SETTINGS):
            names = [name for name, _, _ in conditions]
            result["conditions"] = {name: previous["conditions"][name] for name in names
                                    if name in previous.get("conditions", {})}
            result["commands"] = previous.get("commands", [previous["command"]])
    result.setdefault("commands", [])
    result["commands"].append(command)

    task = get_task("arith")
    rows = task.load("generated", "train").select(range(args.prompts)).to_list()
    model, tokenizer = load(args.model, "cpu")
    config = decoding_config(model, tokenizer, temperature=args.temperature, greedy=False,
                             max_new_tokens=args.new_tokens)
    stop_ids = set(trainer_stop_ids(model, tokenizer))
    print(f"{args.model}: {args.prompts} prompts x group {args.group_size}, {args.new_tokens} tokens, "
          f"T = {args.temperature}, {result['threads']} threads, torch seeds from {args.seed}")
    for name, variant, independent in conditions:
        if name in result["conditions"]:
            print(f"  {name}: kept from {json_path}", flush=True)
            continue
        for key, value in latent_variant(variant).items():
            setattr(model.config, key, value)
        start = time.perf_counter()
        with independent_row_noise() if independent else contextlib.nullcontext():
            groups = sample_groups(model, tokenizer, task, rows, args, config, stop_ids)
        summary = summarize(groups, args.group_size)
        summary.update(variant=variant, keys="independent per row" if independent else "ours (token-keyed)",
                       seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())
        result["conditions"][name] = summary
        print(f"  {name}: {summary['seconds']} s", flush=True)
        if json_path:
            json_path.write_text(json.dumps(result, indent=2) + "\n")
    result["seconds_total"] = round(sum(s["seconds"] for s in result["conditions"].values()), 1)
    result["independent_minus_ours_distinct"] = {
        variant: paired_difference(result["conditions"][f"{variant} ours"]["per_group_distinct"],
                                   result["conditions"][f"{variant} independent"]["per_group_distinct"])
        for variant in args.variants}

    print(f"\n{'condition':40s} {'groups':>6s} {'distinct/group':>14s} {'all same':>9s} {'same pairs':>10s} "
          f"{'1st diff':>8s} {'reward':>7s} {'equal-reward groups':>19s}")
    for name, s in result["conditions"].items():
        divergence = "-" if s["divergence_position_mean"] is None else f"{s['divergence_position_mean']:.1f}"
        print(f"{name:40s} {s['groups']:6d} {s['distinct_per_group_mean']:14.2f} {s['all_identical_share']:9.3f} "
              f"{s['identical_pair_share']:10.3f} {divergence:>8s} {s['reward_mean']:7.3f} "
              f"{s['equal_reward_group_share']:19.3f}")
    for variant, d in result["independent_minus_ours_distinct"].items():
        print(f"{variant}: independent - ours, distinct per group {d['mean']:+.3f} ± {d['standard_error']:.3f} "
              f"(paired by prompt and seed; more in {d['groups_more_distinct']} groups, "
              f"fewer in {d['groups_fewer_distinct']})")
    print(f"sampling time {result['seconds_total']} s over {len(result['conditions'])} conditions")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
