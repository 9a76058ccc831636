#!/usr/bin/env python3
"""The statistics of the learning comparison (bench/learning.py): per arm, the held-out accuracy
gain with a bootstrap 95% interval; per arm against a baseline arm (plain GRPO), the paired
difference of gains with a bootstrap 95% interval, an exact sign test and a paired permutation
test over seeds; per arm, how often an answer was given and how accurate the given answers were,
at step 0 and at the end.

    python -m bench.stats bench/results/learning                    # reads OUT/records/*.json
    python -m bench.stats OUT --json OUT/statistics.json --baseline grpo
    python -m bench.stats bench/results/demo_seeds_lr2e-4 --against bench/results/demo_seeds --baseline projection
                                          # the same arm under two recipes, paired on the seeds both ran

Every record is one run (one arm, one seed) with, at step 0 ("problems_start") and at the end
("problems_end"), 1/0 per held-out problem: "correct" and "answered". A problem's gain is its
correctness at the end minus at step 0 (-1, 0 or 1); a run's gain is the mean over its problems
(its accuracy at the end minus at step 0); an arm's gain is the mean of its runs' gains.

Every seed is scored on the same held-out problems: the gains form a crossed seeds x problems
table, in which a problem that is hard is hard for every seed. The intervals come from a
bootstrap that resamples both at once (Owen's "pigeonhole" bootstrap): each replicate draws seeds
with replacement and one set of problems with replacement, the same set for every drawn seed.
Resampling problems independently within each seed, as this module did before, lets the
problems' share of the variance average out over seeds as if each seed had its own problems.
With 5 seeds a percentile interval is also too narrow on its own (a bootstrap keeps (n - 1) / n
of the variance, and a mean of few seeds has t tails), so the interval is widened for the
number of seeds (crossed_interval). tests/test_stats.py measures the coverage of both methods
on simulated crossed data.
All resampling uses a fixed random seed: the same records give the same numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np

RESAMPLES = 10000
PERMUTATIONS = 10000
RANDOM_SEED = 0
CONFIDENCE = 0.95
EXACT_SEEDS = 16  # seed_permutation_test enumerates every sign pattern up to this many seeds
DEFINITIONS = {
    "gain": "per problem: correct at the end minus correct at step 0; per run: mean over problems; "
            "per arm: mean over seeds",
    "gain_ci95": "crossed bootstrap of the seeds x problems table of gains: each replicate draws seeds with "
                 "replacement and one set of problems with replacement, shared by every drawn seed; the "
                 "percentile interval widened for few seeds (expanded percentile: the percentiles at "
                 "+-t_df(0.975)/sqrt(shrink) normal deviations, df by Welch-Satterthwaite from the seeds' and "
                 "the problems' parts of the variance, shrink = the share of it a bootstrap keeps)",
    "difference": "arm's gain minus the baseline's gain, paired by seed and problem",
    "difference_ci95": "the same interval from the table of per-(seed, problem) differences: one draw of seeds "
                       "and problems serves both arms",
    "sign_test_p": "two-sided exact binomial test (p=1/2) on the signs of the per-seed differences; ties dropped",
    "seed_permutation_p": "two-sided paired permutation test over seeds: sign flips of the per-seed "
                          "differences, p = share of sign patterns with |mean| >= observed (exact: all 2^n "
                          f"patterns up to {EXACT_SEEDS} seeds; else random ones, (1 + count) / (1 + permutations)); the "
                          "problems held fixed, as in the sign test",
    "answered_share": "completions that gave an answer / all completions, pooled over seeds and problems",
    "accuracy_answered": "correct / answered, pooled over seeds and problems (null when none answered)",
}


def problem_gains(record: dict) -> np.ndarray:
    """Per held-out problem of one run: correct at the end minus correct at step 0 (-1, 0 or 1)."""
    start = np.asarray(record["problems_start"]["correct"], dtype=float)
    end = np.asarray(record["problems_end"]["correct"], dtype=float)
    if start.shape != end.shape:
        raise ValueError(f"{record.get('arm')} seed {record.get('seed')}: {len(start)} problems at step 0, "
                         f"{len(end)} at the end")
    return end - start


def mean_of_seed_means(rows: list[np.ndarray]) -> float:
    """The mean over seeds of the mean over each seed's problems."""
    return float(np.mean([row.mean() for row in rows]))


def crossed_table(rows: list[np.ndarray]) -> np.ndarray:
    """The per-seed rows as one seeds x problems table; every seed must have been scored on the
    same number of problems (the same held-out problems, in the same order)."""
    lengths = sorted({len(row) for row in rows})
    if len(lengths) != 1:
        raise ValueError(f"seeds scored on different numbers of problems ({lengths}): not a crossed design")
    return np.vstack(rows).astype(float)


def draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how often each of n items is drawn in each of `resamples` draws of n with
    replacement."""
    drawn = rng.integers(n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n)


def crossed_bootstrap(rows: list[np.ndarray], resamples: int = RESAMPLES, seed: int = RANDOM_SEED) -> np.ndarray:
    """Bootstrap replicates of the mean of a crossed seeds x problems table: each replicate draws
    as many seeds as there are and as many problems as there are, both with replacement, and
    takes the mean of the table's cells at (drawn seed, drawn problem), every drawn seed on the
    same drawn problems. With the draw counts w (seeds) and v (problems) that mean is
    w @ table @ v / (seeds * problems)."""
    table = crossed_table(rows)
    rng = np.random.default_rng(seed)
    seeds, problems = table.shape
    seed_counts = draw_counts(rng, seeds, resamples)
    problem_counts = draw_counts(rng, problems, resamples)
    return ((seed_counts @ table) * problem_counts).sum(axis=1) / (seeds * problems)


def student_t_quantile(q: float, df: float) -> float:
    """The q-quantile (1/2 < q < 1) of Student's t distribution with df > 0 degrees of freedom
    (not necessarily whole): Newton's method on the CDF, 1/2 + the density integrated from 0 by
    Simpson's rule. It starts at the normal quantile, left of the root, where the CDF is concave,
    so it converges monotonically."""
    if not 0.5 < q < 1:
        raise ValueError(f"q = {q}: only upper quantiles (1/2 < q < 1)")
    if df > 1e7:
        return NormalDist().inv_cdf(q)
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(x):
        return scale * (1 + np.square(x) / df) ** (-(df + 1) / 2)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 2001)
        weights = np.ones(len(grid))
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + float((density(grid) * weights).sum()) * x / (len(grid) - 1) / 3

    x = NormalDist().inv_cdf(q)
    for _ in range(200):
        step = (q - cdf(x)) / float(density(x))
        x += step
        if abs(step) < 1e-12 * max(1.0, x):
            break
    return x


def crossed_interval(rows: list[np.ndarray], replicates: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The percentile interval of crossed-bootstrap replicates, widened for few seeds
    (Hesterberg's "expanded percentile" interval, here with two resampled dimensions).

    A percentile interval from 5 seeds is too narrow twice over: a bootstrap keeps (n - 1) / n of
    the plug-in variance in each resampled dimension, and a mean over few seeds has t tails, not
    normal ones. So the percentiles taken are those at -z and +z standard normal deviations, with
    z = t_df((1 + confidence) / 2) / sqrt(shrink): the mean's variance is estimated as
    var(seed means) / seeds + var(problem means) / problems (each var with n - 1), df is the
    Welch-Satterthwaite degrees of freedom of that sum, and shrink is the share of it a bootstrap
    keeps ((seeds - 1) / seeds of the first part, (problems - 1) / problems of the second). With
    many seeds z -> 1.96: the plain percentile interval. With one seed only the problems vary
    (the seeds' spread is unknown)."""
    table = crossed_table(rows)
    seeds, problems = table.shape
    seed_part = float(table.mean(axis=1).var(ddof=1)) / seeds if seeds > 1 else 0.0
    problem_part = float(table.mean(axis=0).var(ddof=1)) / problems if problems > 1 else 0.0
    variance = seed_part + problem_part
    if variance <= 0.0:
        return percentile_interval(replicates, confidence)
    df = variance ** 2 / sum(part ** 2 / (n - 1) for part, n in ((seed_part, seeds), (problem_part, problems))
                             if n > 1)
    shrink = (seed_part * (seeds - 1) / seeds + problem_part * (problems - 1) / problems) / variance
    z = student_t_quantile((1 + confidence) / 2, df) / math.sqrt(shrink)
    tail = NormalDist().cdf(-z) * 100
    return [float(np.percentile(replicates, tail)), float(np.percentile(replicates, 100 - tail))]


def estimate(rows: list[np.ndarray], resamples: int = RESAMPLES, seed: int = RANDOM_SEED) -> dict:
    """The mean over seeds of the per-seed means of `rows` (one array per seed, one value per
    problem), the per-seed means, and the 95% crossed-bootstrap interval (crossed_interval)."""
    return {"mean": mean_of_seed_means(rows), "per_seed": [float(row.mean()) for row in rows],
            "ci95": crossed_interval(rows, crossed_bootstrap(rows, resamples, seed))}


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The central `confidence` interval of the replicates: [lower, upper] percentiles."""
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(replicates, tail)), float(np.percentile(replicates, 100 - tail))]


def sign_test(differences) -> dict:
    """Two-sided exact sign test: under no effect each nonzero difference is positive with
    probability 1/2; p = P(a count at least as far from n/2 as the observed one), where n is
    the number of nonzero differences (ties are dropped); p = 1 when all are ties."""
    values = np.asarray(differences, dtype=float)
    positive, negative = int((values > 0).sum()), int((values < 0).sum())
    n = positive + negative
    fewer = min(positive, negative)
    one_tail = sum(math.comb(n, k) for k in range(fewer + 1)) / 2 ** n
    return {"positive": positive, "negative": negative, "ties": len(values) - n, "p": min(1.0, 2 * one_tail)}


def seed_permutation_test(differences, permutations: int = PERMUTATIONS, seed: int = RANDOM_SEED) -> float:
    """Two-sided paired permutation test over seeds: under no effect each seed's difference is
    equally likely to have either sign (the two arms' labels swapped for that training seed);
    p = the share of sign patterns whose |mean| is at least the observed |mean|. Exact (all 2^n
    patterns, so never below 2 / 2^n) up to EXACT_SEEDS seeds; above, `permutations` random
    patterns, p = (1 + #(at least as far)) / (1 + permutations). A seed's difference is its mean
    over the problems: the problems are held fixed, as in the sign test, whose signs this weighs
    by size."""
    values = np.asarray(differences, dtype=float)
    observed = abs(values.mean()) - 1e-12
    if len(values) <= EXACT_SEEDS:
        patterns = np.arange(2 ** len(values))[:, None] >> np.arange(len(values)) & 1
        means = np.abs(((1 - 2 * patterns) * values).mean(axis=1))
        return float((means >= observed).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, len(values)))
    at_least_as_far = int((np.abs((signs * values).mean(axis=1)) >= observed).sum())
    return (1 + at_least_as_far) / (1 + permutations)


def by_seed(records: list[dict]) -> dict[int, dict]:
    """One arm's records keyed by seed, in seed order; a seed twice is an error."""
    keyed = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        if record["seed"] in keyed:
            raise ValueError(f"{record.get('arm')}: seed {record['seed']} recorded twice")
        keyed[record["seed"]] = record
    return keyed


def arm_gain(records: list[dict], resamples: int = RESAMPLES, seed: int = RANDOM_SEED) -> dict:
    """One arm's held-out accuracy gain: the mean over seeds of (accuracy at the end - at step 0),
    the per-seed gains, and a 95% interval from the crossed bootstrap (seeds and problems jointly)."""
    runs = by_seed(records)
    rows = [problem_gains(record) for record in runs.values()]
    return {"seeds": list(runs), **estimate(rows, resamples, seed)}


def paired_difference(records_a: list[dict], records_b: list[dict], resamples: int = RESAMPLES,
                      permutations: int = PERMUTATIONS, seed: int = RANDOM_SEED) -> dict:
    """Arm A's gain minus arm B's on the seeds both ran, paired by seed and by problem (the
    same held-out problems): the mean difference, a 95% crossed-bootstrap interval (one draw of
    seeds and problems for both arms), the exact sign test over the per-seed differences and the
    paired permutation test over them."""
    runs_a, runs_b = by_seed(records_a), by_seed(records_b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise ValueError("no seed that both arms ran")
    rows = []
    for s in seeds:
        gains_a, gains_b = problem_gains(runs_a[s]), problem_gains(runs_b[s])
        if gains_a.shape != gains_b.shape:
            raise ValueError(f"seed {s}: {len(gains_a)} problems against {len(gains_b)}: not paired")
        rows.append(gains_a - gains_b)
    difference = estimate(rows, resamples, seed)
    return {"seeds": seeds, **difference, "sign_test": sign_test(difference["per_seed"]),
            "seed_permutation_p": seed_permutation_test(difference["per_seed"], permutations, seed)}


def answered_at(records: list[dict], when: str) -> dict:
    """Pooled over one arm's runs at `when` (problems_start or problems_end): the share of
    completions that answered and the accuracy among those that did."""
    correct = np.concatenate([np.asarray(r[when]["correct"], dtype=float) for r in records])
    answered = np.concatenate([np.asarray(r[when]["answered"], dtype=float) for r in records])
    given = float(answered.sum())
    return {"completions": int(len(answered)), "answered": int(given),
            "answered_share": given / len(answered) if len(answered) else None,
            "accuracy_answered": float((correct * answered).sum()) / given if given else None}


def answered_stats(records: list[dict]) -> dict:
    """One arm's answered share and accuracy among the answered, at step 0 and at the end."""
    return {"start": answered_at(records, "problems_start"), "end": answered_at(records, "problems_end")}


def summarize(records_by_arm: dict[str, list[dict]], baseline: str = "grpo", resamples: int = RESAMPLES,
              permutations: int = PERMUTATIONS, seed: int = RANDOM_SEED) -> dict:
    """All of the statistics, JSON-able: per arm its gain and answered stats; per arm other than
    `baseline`, its paired difference to the baseline (none when the baseline did not run)."""
    arms = {arm: {"gain": arm_gain(records, resamples, seed), "answered": answered_stats(records)}
            for arm, records in records_by_arm.items()}
    versus = {}
    if baseline in records_by_arm:
        versus = {arm: paired_difference(records, records_by_arm[baseline], resamples, permutations, seed)
                  for arm, records in records_by_arm.items() if arm != baseline}
    return {"baseline": baseline if baseline in records_by_arm else None, "arms": arms, "versus_baseline": versus,
            "settings": {"bootstrap_resamples": resamples, "permutations": permutations, "random_seed": seed,
                         "confidence": CONFIDENCE},
            "definitions": DEFINITIONS}


def _share(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _estimate(entry: dict) -> str:
    """Mean [interval]; from one seed the interval speaks for the problems only, and says so."""
    low, high = entry["ci95"]
    problems_only = " (1 seed: problems only)" if len(entry["per_seed"]) == 1 else ""
    return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}]{problems_only}"


def format_table(summary: dict) -> str:
    """The summary as markdown: one table of arms, one of arms against the baseline."""
    lines = ["| arm | seeds | gain [95% CI] | answered step 0 | answered end | acc. of answered step 0 "
             "| acc. of answered end |", "|---|---|---|---|---|---|---|"]
    for arm, stats in summary["arms"].items():
        start, end = stats["answered"]["start"], stats["answered"]["end"]
        lines.append(f"| {arm} | {len(stats['gain']['seeds'])} | {_estimate(stats['gain'])} "
                     f"| {_share(start['answered_share'])} | {_share(end['answered_share'])} "
                     f"| {_share(start['accuracy_answered'])} | {_share(end['accuracy_answered'])} |")
    if summary["versus_baseline"]:
        lines += ["", f"| arm − {summary['baseline']} | seeds | gain difference [95% CI] | seeds + / − / = "
                      "| sign test p | permutation p (seeds) |", "|---|---|---|---|---|---|"]
        for arm, diff in summary["versus_baseline"].items():
            signs = diff["sign_test"]
            lines.append(f"| {arm} | {len(diff['seeds'])} | {_estimate(diff)} "
                         f"| {signs['positive']} / {signs['negative']} / {signs['ties']} "
                         f"| {signs['p']:.4f} | {diff['seed_permutation_p']:.4f} |")
    return "\n".join(lines)


def read_records(out: Path) -> dict[str, list[dict]]:
    """OUT/records/*.json grouped by arm, arms in the order first seen (files sorted by name)."""
    records_by_arm: dict[str, list[dict]] = {}
    for path in sorted((out / "records").glob("*.json")):
        record = json.loads(path.read_text())
        records_by_arm.setdefault(record["arm"], []).append(record)
    return records_by_arm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a bench.learning output folder (with records/)")
    parser.add_argument("--baseline", default="grpo", help="the arm the others are compared with")
    parser.add_argument("--against", type=Path, default=None,
                        help="another bench.learning folder: its arms join as ARM@FOLDER, and the baseline is "
                             "--baseline's arm there (one arm under two settings, paired by seed and problem)")
    parser.add_argument("--json", type=Path, help="also write the statistics here")
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--permutations", type=int, default=PERMUTATIONS,
                        help=f"random sign patterns of the permutation test above {EXACT_SEEDS} seeds (exact below)")
    parser.add_argument("--random-seed", type=int, default=RANDOM_SEED)
    args = parser.parse_args(argv)
    records_by_arm = read_records(args.out)
    if not records_by_arm:
        print(f"no records under {args.out / 'records'}", file=sys.stderr)
        return 1
    baseline = args.baseline
    if args.against is not None:
        other = read_records(args.against)
        if args.baseline not in other:
            print(f"no {args.baseline!r} records under {args.against / 'records'}", file=sys.stderr)
            return 1
        records_by_arm.update({f"{arm}@{args.against.name}": records for arm, records in other.items()})
        baseline = f"{args.baseline}@{args.against.name}"
    summary = summarize(records_by_arm, baseline, args.resamples, args.permutations, args.random_seed)
    print(format_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
