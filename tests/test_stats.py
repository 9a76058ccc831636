"""bench/stats.py on known cases: the sign test by hand, bootstrap intervals on constructed
records, the crossed bootstrap's variance by hand and its interval's coverage on simulated
crossed data (against the per-seed bootstrap it replaced), answered shares on a hand-built
record, and the command line on two fake records."""
import json
import math

import numpy as np
import pytest

from bench import stats


def record(arm: str, seed: int, correct_start, correct_end, answered_start=None, answered_end=None) -> dict:
    """A bench.learning record with only what the statistics read (answered: wherever correct, by default)."""
    return {"arm": arm, "seed": seed,
            "problems_start": {"correct": list(correct_start), "answered": list(answered_start or correct_start)},
            "problems_end": {"correct": list(correct_end), "answered": list(answered_end or correct_end)}}


@pytest.mark.parametrize("differences, expected_p", [
    ([1, 1, 1, 1, 1], 2 / 32),            # 5 of 5 positive: 2 * (1/2)^5
    ([-1, -2, -3, -4, -5], 2 / 32),       # the same, the other way
    ([1, 1, 1, -1, 0], 2 * 5 / 16),       # a tie is dropped: 3 of 4, 2 * (1 + 4) / 2^4
    ([1] * 9 + [-1], 2 * 11 / 1024),      # 9 of 10: 2 * (1 + 10) / 2^10
    ([1, -1], 1.0),                       # as balanced as can be
    ([0, 0, 0], 1.0),                     # all ties: no evidence
])
def test_sign_test_matches_the_binomial_by_hand(differences, expected_p):
    assert stats.sign_test(differences)["p"] == pytest.approx(expected_p, abs=1e-12)


def test_sign_test_counts_signs():
    assert stats.sign_test([0.5, -0.25, 0.0, 0.125]) == {"positive": 2, "negative": 1, "ties": 1,
                                                         "p": pytest.approx(1.0)}


def test_seed_permutation_test_is_exact_by_hand():
    # seeds +0.1, +0.2, +0.3: of the 8 sign patterns only all + and all - reach |mean| 0.2
    assert stats.seed_permutation_test([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)
    # +0.3, -0.1, +0.1: |mean| 0.1, reached by |0.3 + 0.1a + 0.1b| >= 0.3 unless both a and b
    # oppose the 0.3: 6 of 8 patterns
    assert stats.seed_permutation_test([0.3, -0.1, 0.1]) == pytest.approx(6 / 8)
    assert stats.seed_permutation_test([0.0, 0.0]) == pytest.approx(1.0)


def test_seed_permutation_test_above_the_exact_size_samples_patterns():
    # 20 seeds, all +0.1: the exact p is 2 / 2^20, the sampled one its floor 1 / (1 + permutations)
    assert stats.seed_permutation_test([0.1] * 20, permutations=999) == pytest.approx(1 / 1000)
    # half +, half -: |mean| 0 is reached by every pattern
    assert stats.seed_permutation_test([0.1, -0.1] * 10, permutations=999) == pytest.approx(1.0)


def test_the_permutation_test_does_not_count_problems_as_samples():
    # 5 seeds that all gained a little on 200 problems: the seeds x problems sign flips (the test
    # this module had) gave p < 0.001; 5 seeds cannot give less than 2 / 32
    arm_a, arm_b = constructed_arms(np.random.default_rng(7), problems=200)
    diff = stats.paired_difference(arm_a, arm_b)
    assert diff["sign_test"]["positive"] == 5
    assert diff["seed_permutation_p"] == pytest.approx(2 / 32)


def test_arm_gain_without_spread_has_a_point_interval():
    # every problem goes 0 -> 1, in every seed: gain 1 whatever is resampled
    records = [record("grpo", seed, [0, 0, 0, 0], [1, 1, 1, 1]) for seed in (3, 1, 2)]
    gain = stats.arm_gain(records)
    assert gain["seeds"] == [1, 2, 3] and gain["per_seed"] == pytest.approx([1.0, 1.0, 1.0])
    assert gain["mean"] == pytest.approx(1.0)
    assert gain["ci95"] == pytest.approx([1.0, 1.0])


def test_arm_gain_is_the_accuracy_change_and_its_interval_is_reproducible():
    records = [record("embedding", 1, [1, 0, 0, 0], [1, 1, 1, 0]), record("embedding", 2, [0, 1, 0, 0], [0, 0, 0, 0])]
    gain = stats.arm_gain(records)
    assert gain["per_seed"] == pytest.approx([0.5, -0.25]) and gain["mean"] == pytest.approx(0.125)
    low, high = gain["ci95"]
    assert low < gain["mean"] < high
    assert stats.arm_gain(records) == gain  # the fixed random seed


def constructed_arms(rng, seeds=5, problems=64, start=0.2, end_a=0.7, end_b=0.4) -> tuple[list, list]:
    """Two arms on the same seeds and problems: the same step-0 results, then correct at the end
    with probability end_a (arm A) and end_b (arm B), shifted per seed (a seed effect shared by
    both arms). The true difference of gains is end_a - end_b."""
    arm_a, arm_b = [], []
    for seed in range(1, seeds + 1):
        shift = rng.uniform(-0.1, 0.1)
        correct_start = (rng.random(problems) < start).astype(int)
        arm_a.append(record("a", seed, correct_start, (rng.random(problems) < end_a + shift).astype(int)))
        arm_b.append(record("b", seed, correct_start, (rng.random(problems) < end_b + shift).astype(int)))
    return arm_a, arm_b


def test_a_large_paired_difference_is_covered_and_excludes_zero():
    arm_a, arm_b = constructed_arms(np.random.default_rng(7))
    diff = stats.paired_difference(arm_a, arm_b)
    low, high = diff["ci95"]
    assert low < 0.3 < high  # the true difference
    assert low > 0.0
    assert diff["mean"] == pytest.approx(stats.arm_gain(arm_a)["mean"] - stats.arm_gain(arm_b)["mean"])
    assert diff["sign_test"]["positive"] == 5 and diff["sign_test"]["p"] == pytest.approx(0.0625)


def test_paired_difference_with_exact_per_seed_differences():
    # arm A is right where B is not on 2, 3 and 4 of 8 problems in seeds 1, 2, 3: difference 3/8 on average
    base = [record("grpo", seed, [0] * 8, [1, 0, 0, 0, 0, 0, 0, 0]) for seed in (1, 2, 3)]
    better = [record("projection", seed, [0] * 8, [1] + [1] * extra + [0] * (7 - extra))
              for seed, extra in ((1, 2), (2, 3), (3, 4))]
    diff = stats.paired_difference(better, base)
    assert diff["per_seed"] == pytest.approx([2 / 8, 3 / 8, 4 / 8]) and diff["mean"] == pytest.approx(3 / 8)
    assert diff["ci95"][0] < 3 / 8 < diff["ci95"][1]
    assert diff["sign_test"]["p"] == pytest.approx(2 / 8)  # 3 of 3 positive


def test_no_difference_gives_an_interval_around_zero_and_p_one():
    arm_a, _ = constructed_arms(np.random.default_rng(3))
    same = [{**r, "arm": "copy"} for r in arm_a]
    diff = stats.paired_difference(arm_a, same)
    assert diff["mean"] == pytest.approx(0.0)
    assert diff["ci95"][0] <= 0.0 <= diff["ci95"][1]
    assert diff["sign_test"]["ties"] == 5 and diff["sign_test"]["p"] == pytest.approx(1.0)
    assert diff["seed_permutation_p"] == pytest.approx(1.0)


def test_paired_difference_uses_the_seeds_both_arms_ran():
    arm_a = [record("a", seed, [0, 0], [1, 1]) for seed in (1, 2, 3)]
    arm_b = [record("b", seed, [0, 0], [0, 0]) for seed in (2, 3, 4)]
    assert stats.paired_difference(arm_a, arm_b)["seeds"] == [2, 3]
    with pytest.raises(ValueError, match="not paired"):
        stats.paired_difference([record("a", 1, [0, 0], [1, 1])], [record("b", 1, [0], [0])])


def test_answered_shares_on_a_hand_built_record():
    one = record("grpo", 1, correct_start=[1, 0, 0, 0], answered_start=[1, 1, 0, 0],
                 correct_end=[1, 1, 1, 0], answered_end=[1, 1, 1, 1])
    answered = stats.answered_stats([one])
    assert answered["start"] == {"completions": 4, "answered": 2, "answered_share": pytest.approx(0.5),
                                 "accuracy_answered": pytest.approx(0.5)}
    assert answered["end"]["answered_share"] == pytest.approx(1.0)
    assert answered["end"]["accuracy_answered"] == pytest.approx(0.75)
    silent = record("grpo", 2, correct_start=[0, 0], answered_start=[0, 0], correct_end=[0, 1],
                    answered_end=[0, 1])
    pooled = stats.answered_stats([one, silent])  # pooled over seeds: 2 of 6, then 5 of 6 answered
    assert pooled["start"]["answered_share"] == pytest.approx(2 / 6)
    assert pooled["start"]["accuracy_answered"] == pytest.approx(1 / 2)
    assert pooled["end"]["answered_share"] == pytest.approx(5 / 6)
    assert pooled["end"]["accuracy_answered"] == pytest.approx(4 / 5)
    assert stats.answered_stats([silent])["start"]["accuracy_answered"] is None


def test_summary_is_json_and_compares_with_the_baseline():
    arm_a, arm_b = constructed_arms(np.random.default_rng(7), seeds=2, problems=8)
    summary = stats.summarize({"grpo": arm_b, "embedding": arm_a}, resamples=200, permutations=200)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["baseline"] == "grpo" and list(summary["versus_baseline"]) == ["embedding"]
    table = stats.format_table(summary)
    assert "| grpo | 2 |" in table and "| embedding | 2 |" in table and "arm − grpo" in table
    assert "problems only" not in table
    one_seed = stats.format_table(stats.summarize({"grpo": arm_b[:1], "embedding": arm_a[:1]}, resamples=200))
    assert one_seed.count("(1 seed: problems only)") == 3  # both arms' gains and their difference
    without = stats.summarize({"embedding": arm_a}, resamples=200, permutations=200)
    assert without["baseline"] is None and without["versus_baseline"] == {}
    assert "arm −" not in stats.format_table(without)


def write_fake_records(out) -> None:
    (out / "records").mkdir(parents=True)
    for arm, end in (("grpo", [1, 0, 0, 1]), ("embedding", [1, 1, 1, 1])):
        run = {**record(arm, 1, [1, 0, 0, 0], end), "accuracy_start": 0.25, "accuracy_end": sum(end) / 4}
        (out / "records" / f"{arm}-seed1.json").write_text(json.dumps(run))


def test_command_line_on_two_fake_records(tmp_path, capsys):
    write_fake_records(tmp_path)
    assert stats.main([str(tmp_path), "--json", str(tmp_path / "statistics.json")]) == 0
    table = capsys.readouterr().out
    assert "| grpo | 1 | +0.250" in table and "| embedding | 1 | +0.750" in table
    written = json.loads((tmp_path / "statistics.json").read_text())
    assert written["versus_baseline"]["embedding"]["mean"] == pytest.approx(0.5)
    assert written["versus_baseline"]["embedding"]["sign_test"]["p"] == pytest.approx(1.0)  # 1 seed: 2 * 1/2


def test_command_line_against_another_folder_pairs_the_same_arm(tmp_path, capsys):
    """--against: one arm under two settings (two bench.learning folders), paired by seed and problem."""
    for folder, ends in (("new", {1: [1, 1, 1, 0], 2: [1, 1, 0, 0]}), ("old", {1: [1, 0, 0, 0], 2: [0, 0, 0, 0],
                                                                             3: [1, 1, 1, 1]})):
        (tmp_path / folder / "records").mkdir(parents=True)
        for seed, end in ends.items():
            run = record("projection", seed, [1, 0, 0, 0], end)
            (tmp_path / folder / "records" / f"projection-seed{seed}.json").write_text(json.dumps(run))
    out = tmp_path / "statistics.json"
    assert stats.main([str(tmp_path / "new"), "--against", str(tmp_path / "old"), "--baseline", "projection",
                       "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["baseline"] == "projection@old"
    versus = written["versus_baseline"]["projection"]
    assert versus["seeds"] == [1, 2]  # seed 3 ran under the old settings only
    assert versus["mean"] == pytest.approx(((0.75 - 0.25) + (0.5 - 0.0)) / 2)  # per seed: end new - end old
    assert stats.main([str(tmp_path / "new"), "--against", str(tmp_path / "old"), "--baseline", "grpo"]) == 1
    assert "no 'grpo' records" in capsys.readouterr().err


def test_command_line_without_records_fails(tmp_path, capsys):
    assert stats.main([str(tmp_path)]) == 1
    assert "no records" in capsys.readouterr().err


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                          (1e9, 1.9600)])
def test_student_t_quantile_matches_the_tables(df, quantile):
    assert stats.student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)


def test_the_crossed_bootstrap_resamples_problems_once_for_every_seed():
    """Its variance, by hand: seeds that agree on every problem (a pure problem effect) vary
    across replicates only by the problems drawn, var(problems) * (P - 1) / P / P, whatever the
    number of seeds; problems that agree within each seed (a pure seed effect) vary by the
    seeds drawn, var(seed means) * (S - 1) / S / S."""
    rng = np.random.default_rng(5)
    problem_effect = rng.normal(size=50)
    replicates = stats.crossed_bootstrap([problem_effect] * 4, resamples=20000)
    assert replicates.var() == pytest.approx(problem_effect.var() / 50, rel=0.05)
    seed_means = np.array([0.1, -0.3, 0.4, 0.0])
    replicates = stats.crossed_bootstrap([np.full(50, m) for m in seed_means], resamples=20000)
    assert replicates.var() == pytest.approx(seed_means.var() / 4, rel=0.05)
    with pytest.raises(ValueError, match="not a crossed design"):
        stats.crossed_bootstrap([np.zeros(3), np.zeros(4)])


def per_seed_bootstrap(rows, resamples, seed):
    """The method bench/stats.py used before: seeds resampled, then problems resampled
    independently within each drawn seed; its percentile interval was reported."""
    rng = np.random.default_rng(seed)
    drawn_seeds = rng.integers(len(rows), size=(resamples, len(rows)))
    slot_means = np.empty(drawn_seeds.shape)
    for index, row in enumerate(rows):
        slots = drawn_seeds == index
        drawn_problems = rng.integers(len(row), size=(int(slots.sum()), len(row)))
        slot_means[slots] = row[drawn_problems].mean(axis=1)
    return slot_means.mean(axis=1)


def gain_records(arm: str, table) -> list[dict]:
    """Records whose per-problem gains are the rows of `table` (the statistics read only end - start)."""
    return [{"arm": arm, "seed": seed, "problems_start": {"correct": [0.0] * len(row)},
             "problems_end": {"correct": list(row)}} for seed, row in enumerate(table, start=1)]


# Variance components (seed, problem, seed x problem) of the per-problem values in the kept
# records of bench/results/learning (5 seeds x 200 problems; two-way ANOVA by moments, the
# interaction holding the residual): the `embedding` arm's gains, and top-5 + Gumbel minus
# plain GRPO, the difference with the largest seed component.
CROSSED_CASES = {"gain": (0.13, (0.016, 0.103, 0.141)), "difference": (-0.09, (0.046, 0.022, 0.256))}
SIMULATED_DATASETS = 300


@pytest.mark.parametrize("case", list(CROSSED_CASES))
def test_the_interval_covers_the_truth_in_simulated_crossed_comparisons(case):
    """Datasets drawn from value = mean + seed effect + problem effect + seed x problem effect
    (normal, with the kept records' variance components), 5 seeds x 200 problems as in the
    comparison: the reported 95% interval (through arm_gain / paired_difference) covers the
    true mean in 90-98% of them; the per-seed bootstrap that it replaced covers it clearly less
    often on the same datasets."""
    truth, (seed_var, problem_var, interaction_var) = CROSSED_CASES[case]
    rng = np.random.default_rng(2024)
    covered = covered_before = 0
    for dataset in range(SIMULATED_DATASETS):
        table = (truth + rng.normal(0, math.sqrt(seed_var), (5, 1)) + rng.normal(0, math.sqrt(problem_var), (1, 200))
                 + rng.normal(0, math.sqrt(interaction_var), (5, 200)))
        if case == "gain":
            interval = stats.arm_gain(gain_records("a", table), resamples=1000, seed=dataset)["ci95"]
        else:
            interval = stats.paired_difference(gain_records("a", table), gain_records("b", np.zeros_like(table)),
                                               resamples=1000, permutations=1, seed=dataset)["ci95"]
        covered += interval[0] <= truth <= interval[1]
        before = stats.percentile_interval(per_seed_bootstrap(list(table), 1000, dataset))
        covered_before += before[0] <= truth <= before[1]
    coverage, coverage_before = covered / SIMULATED_DATASETS, covered_before / SIMULATED_DATASETS
    print(f"{case}: coverage of the nominal 95% interval {coverage:.3f}, per-seed bootstrap {coverage_before:.3f}")
    assert 0.90 <= coverage <= 0.98
    assert coverage_before <= 0.89 and coverage - coverage_before >= 0.05
