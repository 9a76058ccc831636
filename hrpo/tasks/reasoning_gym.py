"""reasoning-gym's procedural generators as a task: verifiable problems that someone else wrote,
generated offline (``--task reasoning_gym --dataset_name gsm_symbolic``).

    --dataset_name NAME            any generator of reasoning-gym by name (gsm_symbolic: GSM8K's
                                   templates with new numbers), its default configuration
    --dataset_name NAME:SIZE       SIZE training problems (default 2,000; the held-out split is 200)

The training split is drawn with seed 0 and the held-out split with seed 1; a held-out
problem whose question is also a training question is dropped (checked, so the two never
share a row). Prompts are the task's: HRPO's system prompt with the answer marker, then the
generator's question (which carries its own instructions on the answer's form).

Grading: our extraction first (the first non-empty line after the answer marker; repeated
identical answers count once, conflicting ones are no answer), then the generator's own
``score_answer`` on that text alone, correct when it scores 1.0. Never the whole completion:
some scorers read the first number of whatever they are given.
"""
from __future__ import annotations

import functools
import json

from ..data import DataError
from ..rewards import ANSWER_MARKER
from .base import Task

SPLIT_SIZES = {"train": 2000, "test": 200}
SPLIT_SEEDS = {"train": 0, "test": 1}


def parse_source(dataset_path: str) -> tuple[str, int | None]:
    """(generator name, training size or None) of ``NAME`` or ``NAME:SIZE``; the name is checked."""
    import reasoning_gym

    name, _, size = dataset_path.partition(":")
    if name not in reasoning_gym.factory.DATASETS:
        raise DataError(f"--dataset_name {dataset_path}: {name!r} is not a reasoning-gym generator; expected one "
                        f"of {', '.join(sorted(reasoning_gym.factory.DATASETS))}")
    if size and not (size.isdigit() and int(size) > 0):
        raise DataError(f"--dataset_name {dataset_path}: expected NAME or NAME:SIZE with SIZE a positive number of "
                        f"training problems")
    return name, int(size) if size else None


@functools.lru_cache(maxsize=8)
def _entries(name: str, split: str, size: int) -> tuple[dict, ...]:
    import reasoning_gym

    return tuple(reasoning_gym.create_dataset(name, size=size, seed=SPLIT_SEEDS[split]))


def generated_rows(name: str, split: str, train_size: int | None = None) -> list[dict]:
    """The ``split`` of generator ``name``: rows with ``question`` and ``entry``, where the entry
    is found again (``generator_entry``): the generator's own entry object is what its scorer reads,
    metadata of any type included. Held-out questions never appear in training."""
    if split not in SPLIT_SIZES:
        raise DataError(f"the split {split!r}: reasoning-gym data has the splits {sorted(SPLIT_SIZES)}")
    sizes = {**SPLIT_SIZES, **({"train": train_size} if train_size else {})}
    training = set() if split == "train" else {entry["question"] for entry in _entries(name, "train", sizes["train"])}
    rows = [{"question": entry["question"],
             "entry": json.dumps({"generator": name, "split": split, "size": sizes[split], "index": index})}
            for index, entry in enumerate(_entries(name, split, sizes[split])) if entry["question"] not in training]
    if not rows:
        raise DataError(f"reasoning-gym {name}: every {split} problem is also a training problem")
    return rows


def generator_entry(row: dict) -> dict:
    """The generator's entry of a row (drawn again, seeded; cached)."""
    where = json.loads(row["entry"])
    return _entries(where["generator"], where["split"], where["size"])[where["index"]]


def load_reasoning_gym(dataset_path: str, split: str = "train"):
    import datasets

    name, train_size = parse_source(dataset_path)
    return datasets.Dataset.from_list(generated_rows(name, split, train_size))


def answer_text(completion: str, marker: str = ANSWER_MARKER) -> str | None:
    """The answer after the marker(s): each marker's first non-empty line; identical ones count
    once, conflicting ones (or none) give None."""
    if not isinstance(completion, str) or marker not in completion:
        return None
    answers = set()
    for segment in completion.split(marker)[1:]:
        line = next((line.strip() for line in segment.splitlines() if line.strip()), None)
        if line is not None:
            answers.add(line)
    return answers.pop() if len(answers) == 1 else None


def scored_correct(answer: str, entry: dict) -> bool:
    """The generator's own scorer on the extracted answer: correct when it gives full marks."""
    import reasoning_gym

    score = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])(answer, entry)
    return score is not None and float(score) >= 1.0


TASK = Task(
    name="reasoning_gym",
    answer_marker=ANSWER_MARKER,
    default_dataset="gsm_symbolic",
    load=load_reasoning_gym,
    extract=answer_text,
    reference=generator_entry,
    equivalent=scored_correct,
    reference_columns=("entry",),
)
