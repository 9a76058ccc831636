#!/usr/bin/env python3
"""Time the MATH reward per call on model-like answers (seeded): median, p90, p99, worst.

    python -m scripts.time_math_reward [--count 1000] [--seed 0]

Half the answers are drawn fresh (random numbers, fractions, radicals, polynomials,
intervals, sets, matrices), so few repeat and the parse caches rarely help; the others
are MATH's kinds of reference (integers, fractions, radicals, intervals, sets, matrices,
expressions, text) in correct, reformatted, wrong and malformed forms; 1 in 100 is absurd (huge powers, very long text). The one-off warm-up (math-verify's and
sympy's lazy set-up) is timed separately.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from hrpo.tasks import math as M

# reference -> answers a model might give (right in other forms, and wrong)
CASES = {
    "2": ["2", "2.0", "\\boxed{2}", "$2$", "x = 2", "3", "-2", "two"],
    "\\frac{1}{2}": ["0.5", "1/2", "\\frac12", "\\dfrac{1}{2}", "\\frac{2}{4}", "0.25", "2", "\\frac{1}{3}"],
    "\\frac{\\sqrt{3}}{2}": ["\\sqrt{3}/2", "\\frac{\\sqrt3}{2}", "0.866", "\\frac{\\sqrt{2}}{2}", "\\sqrt{3}",
                             "\\frac{1}{2}\\sqrt{3}"],
    "(1,2]": ["(1, 2]", "\\left(1,2\\right]", "[1,2]", "(1,2)", "1 < x \\le 2", "(2,1]"],
    "\\{1,2\\}": ["1, 2", "2,1", "\\{2, 1\\}", "1,2,3", "1 and 2", "\\{1\\}"],
    "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}": ["\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)",
                                                 "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"],
    "x^2+2x+1": ["(x+1)^2", "x^2 + 2x + 1", "x^2+1", "(x-1)^2", "x^{2}+2x+1"],
    "2\\sqrt{3}": ["\\sqrt{12}", "2 \\sqrt 3", "3\\sqrt{2}", "3.4641", "\\sqrt{6}"],
    "\\text{(C)}": ["C", "(C)", "\\text{(C)}", "\\text{C}", "(B)"],
    "\\frac{\\pi}{3}": ["\\pi/3", "60^\\circ", "\\frac{2\\pi}{6}", "\\pi", "1.047"],
    "1000": ["1,000", "1000.0", "10^3", "100", "1\\,000"],
    "-\\frac{3}{4}": ["-0.75", "-3/4", "\\frac{-3}{4}", "0.75", "-\\frac{4}{3}"],
}
ABSURD = ["9^{9^{9^{9}}}", "x" * 5_000, "(10^{9999})^{9999}", "100000!", "__import__('os').getcwd()",
          "\\frac{" * 30 + "1" + "}" * 30]


def random_answer(rng: random.Random) -> str:
    """A fresh (mostly wrong) answer, so that few answers repeat and the parse caches rarely help."""
    a, b, c = rng.randint(1, 99), rng.randint(2, 99), rng.randint(-50, 50)
    return rng.choice([f"{c}", f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"{a}.{b}", f"{a}\\sqrt{{{b}}}",
                       f"\\frac{{\\sqrt{{{a}}}}}{{{b}}}", f"{a}x^2+{b}x{c:+d}", f"({c}, {a}]", f"\\{{{c}, {a}\\}}",
                       f"{a}\\pi", f"x = {c}", f"{a}^{{{rng.randint(2, 12)}}}",
                       f"\\begin{{pmatrix}} {a} \\\\ {c} \\end{{pmatrix}}"])


def completions(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    refs = list(CASES)
    out = []
    for i in range(count):
        reference = rng.choice(refs)
        if i % 100 == 99:
            answer = rng.choice(ABSURD)
        elif rng.random() < 0.5:
            answer = random_answer(rng)
        else:
            answer = rng.choice(CASES[reference])
        reasoning = "We compute step by step. " * rng.randint(1, 5)
        out.append((f"{reasoning}\n#### {answer}", reference))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    M._prepare()
    warm = time.perf_counter() - start
    times, correct = [], 0
    calls = completions(args.count, args.seed)
    distinct = len({c.rsplit("####", 1)[1] for c, _ in calls})
    slowest = []
    for completion, reference in calls:
        start = time.perf_counter()
        correct += M.math_reward(completion, reference)
        times.append(time.perf_counter() - start)
        slowest = sorted(slowest + [(times[-1], completion.rsplit("####", 1)[1].strip()[:60], reference)])[-5:]
    times.sort()
    ms = [t * 1000 for t in times]
    print(f"warm-up (once per process): {warm:.2f} s")
    print(f"{len(ms)} reward calls ({distinct} distinct answers): median {statistics.median(ms):.2f} ms, "
          f"p90 {ms[int(0.9 * len(ms))]:.1f} ms, "
          f"p99 {ms[int(0.99 * len(ms))]:.1f} ms, worst {ms[-1]:.0f} ms, total {sum(ms) / 1000:.1f} s; "
          f"correct {int(correct)}, timeouts {M.REWARD_STATS['timeouts']}, refused {M.REWARD_STATS['refused']}")
    for seconds, answer, reference in reversed(slowest):
        print(f"  {seconds * 1000:6.0f} ms  {answer!r} vs {reference!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
