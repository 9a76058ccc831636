"""arith: generated, seeded arithmetic word problems in GSM8K's format, for CPU-scale runs.

``--dataset_path`` is ``generated`` (the calibrated difficulty), ``generated:D`` (difficulty
D), or a local GSM8K-format file (for instance one written by ``python -m scripts.make_arith_data``).
Generated splits are disjoint: a test question never appears in the training split.

Difficulty (each level mixes the kinds of the levels below it):
    1  one step: add or take away, numbers up to 20
    2  one step: also multiply (up to 12 x 12) and numbers up to 50
    3  two steps: gets some and gives some away; shares out and prices the share
"""
from __future__ import annotations

import random

from ..data import DataError
from ..rewards import ANSWER_MARKER
from . import gsm8k
from .base import Task

CALIBRATED_DIFFICULTY = 2  # SmolLM2-135M-Instruct starts between 0.10 and 0.50 (see bench/README.md)
DIFFICULTIES = (1, 2, 3)
SPLIT_SIZES = {"train": 2000, "test": 200}
SPLIT_SEEDS = {"train": 0, "test": 1}

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]


def _add(rng, name, item, top):
    a, b = rng.randint(2, top), rng.randint(2, top)
    return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n{ANSWER_MARKER} {a + b}")


def _take(rng, name, item, top):
    b = rng.randint(2, top - 2)
    a = b + rng.randint(1, top - b)
    return (f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
            f"{a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} are left.\n{ANSWER_MARKER} {a - b}")


def _multiply(rng, name, item, top):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return (f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that?",
            f"{a} bags of {b} make {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n{ANSWER_MARKER} {a * b}")


def _get_and_give(rng, name, item, top):
    a, b = rng.randint(2, top), rng.randint(2, top)
    c = rng.randint(1, a + b - 1)
    left = a + b - c
    return (f"{name} has {a} {item}, gets {b} more and then gives {c} away. How many {item} does {name} have?",
            f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}, and {a + b} - {c} = <<{a + b}-{c}={left}>>{left} {item}.\n"
            f"{ANSWER_MARKER} {left}")


def _share_and_price(rng, name, item, top):
    per, groups = rng.randint(2, 9), rng.randint(2, 9)
    total, price = per * groups, rng.randint(2, 5)
    return (f"{name} shares {total} {item} equally among {groups} friends and sells each friend's share "
            f"for ${price} per item. How many dollars does one friend's share cost?",
            f"Each friend gets {total} / {groups} = <<{total}/{groups}={per}>>{per} {item}. "
            f"That costs {per} * {price} = <<{per}*{price}={per * price}>>{per * price} dollars.\n"
            f"{ANSWER_MARKER} {per * price}")


# difficulty -> (largest number, the kinds of problem)
_LEVELS = {
    1: (20, (_add, _take)),
    2: (50, (_add, _take, _multiply)),
    3: (50, (_add, _take, _multiply, _get_and_give, _share_and_price)),
}


def make_problems(count: int, seed: int = 0, difficulty: int = CALIBRATED_DIFFICULTY,
                  exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` distinct problems ({"question", "answer"}), none of whose questions is in ``exclude``."""
    if difficulty not in _LEVELS:
        raise ValueError(f"arith difficulty {difficulty!r}: expected one of {DIFFICULTIES}")
    top, kinds = _LEVELS[difficulty]
    rng = random.Random(f"arith-{difficulty}-{seed}")
    rows, seen = [], set(exclude)
    for _ in range(50 * count):
        if len(rows) == count:
            break
        question, answer = rng.choice(kinds)(rng, rng.choice(_NAMES), rng.choice(_ITEMS), top)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": answer})
    if len(rows) < count:
        raise ValueError(f"arith difficulty {difficulty}: only {len(rows)} distinct problems, {count} asked for")
    return rows


def generated_split(split: str, difficulty: int = CALIBRATED_DIFFICULTY) -> list[dict]:
    """The generated ``train`` or ``test`` split; test questions never appear in train."""
    if split not in SPLIT_SIZES:
        raise DataError(f"the split {split!r}: generated arith data has the splits {sorted(SPLIT_SIZES)}")
    exclude = set()
    if split != "train":
        exclude = {row["question"] for row in make_problems(SPLIT_SIZES["train"], SPLIT_SEEDS["train"], difficulty)}
    return make_problems(SPLIT_SIZES[split], SPLIT_SEEDS[split], difficulty, exclude)


def parse_generated(dataset_path: str) -> int | None:
    """The difficulty named by ``generated`` / ``generated:D``, or None for a file path."""
    if dataset_path == "generated":
        return CALIBRATED_DIFFICULTY
    if dataset_path.startswith("generated:"):
        level = dataset_path.split(":", 1)[1]
        if not level.isdigit() or int(level) not in DIFFICULTIES:
            raise DataError(f"--dataset_path {dataset_path}: expected generated:D with D in {DIFFICULTIES}")
        return int(level)
    return None


def load_arith(dataset_path: str, split: str = "train"):
    difficulty = parse_generated(dataset_path)
    if difficulty is None:
        return gsm8k.load_gsm8k(dataset_path, split)
    import datasets

    return datasets.Dataset.from_list(generated_split(split, difficulty))


TASK = Task(
    name="arith",
    answer_marker=ANSWER_MARKER,
    default_dataset="generated",
    load=load_arith,
    extract=gsm8k.TASK.extract,
    reference=gsm8k.TASK.reference,
)
