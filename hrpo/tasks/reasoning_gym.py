"""reasoning-gym's procedural generators as a task: verifiable problems that someone else wrote,
generated offline (``--task reasoning_gym --dataset_name gsm_symbolic``).

    --dataset_name NAME            any generator of reasoning-gym by name (gsm_symbolic: GSM8K's
                                   templates with new numbers), its default configuration
    --dataset_name NAME:SIZE       SIZE training problems (default 2,000; the held-out split is 200)
    --dataset_name NAME:SIZE,KEY=VALUE,...
                                   the generator's configuration fields (its config dataclass), each
                                   a JSON value or a bare string, e.g.
                                   chain_sum,min_terms=2,max_terms=2,max_digits=2 or
                                   calendar_arithmetic:1000,tasks=["is_leap_year"]

The training split is drawn with seed 0 and the held-out split with seed 1,000,000 (generators
seed problem i with seed + i, so the two ranges never meet); a held-out
problem whose question is also a training question is dropped (checked, so the two never
share a row). Prompts are the task's: HRPO's system prompt with the answer marker, then the
generator's question (which carries its own instructions on the answer's form).

Grading: our extraction first (the first non-empty line after the answer marker; repeated
identical answers count once, conflicting ones are no answer), then the generator's own
``score_answer`` on that text alone, correct when it scores 1.0. Never the whole completion:
some scorers read the first number of whatever they are given.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

from ..data import DataError
from ..rewards import ANSWER_MARKER
from .base import Task

SPLIT_SIZES = {"train": 2000, "test": 200}
# Most generators seed problem i with seed + i, so two splits share problems unless their seed
# ranges are disjoint: held-out problems start where no training set (at most this size) reaches.
SPLIT_SEEDS = {"train": 0, "test": 1_000_000}
MAX_TRAIN_SIZE = SPLIT_SEEDS["test"]


# A configuration field starts after a comma that is followed by KEY= (so JSON lists keep theirs).
_FIELD_START = re.compile(r",(?=\s*\w+\s*=)")
# Fields that belong to the split, not to the configuration.
_SPLIT_FIELDS = ("seed", "size")


def parse_source(dataset_path: str) -> tuple[str, int | None, str]:
    """(generator name, training size or None, its configuration as canonical JSON) of
    ``NAME[:SIZE][,KEY=VALUE...]``: the name, size and fields are checked, and the configuration is
    built once so that the generator's own validation names a bad value here, before training."""
    import reasoning_gym

    head, *fields = _FIELD_START.split(dataset_path)
    name, _, size = head.strip().partition(":")
    if name not in reasoning_gym.factory.DATASETS:
        raise DataError(f"--dataset_name {dataset_path}: {name!r} is not a reasoning-gym generator; expected one "
                        f"of {', '.join(sorted(reasoning_gym.factory.DATASETS))}")
    if size and not (size.isdigit() and 0 < int(size) <= MAX_TRAIN_SIZE):
        raise DataError(f"--dataset_name {dataset_path}: expected NAME or NAME:SIZE with SIZE a number of training "
                        f"problems from 1 to {MAX_TRAIN_SIZE:,}")
    options = generator_options(dataset_path, name, fields)
    return name, int(size) if size else None, json.dumps(options, sort_keys=True)


def generator_options(dataset_path: str, name: str, fields: list[str]) -> dict:
    """KEY=VALUE fields as the generator's configuration (values read as JSON, else as strings)."""
    import reasoning_gym

    allowed = sorted(f.name for f in dataclasses.fields(reasoning_gym.factory.DATASETS[name][1])
                     if f.name not in _SPLIT_FIELDS)
    options = {}
    for text in fields:
        key, _, value = (part.strip() for part in text.partition("="))
        if key not in allowed:
            raise DataError(f"--dataset_name {dataset_path}: {key!r} is not a configuration field of {name}; "
                            f"expected KEY=VALUE with KEY one of {', '.join(allowed)}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        reasoning_gym.create_dataset(name, size=1, seed=0, **options)
    except Exception as err:  # the generator's own validation (assertions, type errors)
        raise DataError(f"--dataset_name {dataset_path}: reasoning-gym refused the configuration "
                        f"{options}: {type(err).__name__}: {err}") from err
    return options


@functools.lru_cache(maxsize=8)
def _entries(name: str, split: str, size: int, options: str = "{}") -> tuple[dict, ...]:
    import reasoning_gym

    return tuple(reasoning_gym.create_dataset(name, size=size, seed=SPLIT_SEEDS[split], **json.loads(options)))


def generated_rows(name: str, split: str, train_size: int | None = None, options: str = "{}") -> list[dict]:
    """The ``split`` of generator ``name``: rows with ``question`` and ``entry``, where the entry
    is found again (``generator_entry``): the generator's own entry object is what its scorer reads,
    metadata of any type included. Held-out questions never appear in training."""
    if split not in SPLIT_SIZES:
        raise DataError(f"the split {split!r}: reasoning-gym data has the splits {sorted(SPLIT_SIZES)}")
    sizes = {**SPLIT_SIZES, **({"train": train_size} if train_size else {})}
    training = (set() if split == "train" else
                {entry["question"] for entry in _entries(name, "train", sizes["train"], options)})
    where = {"generator": name, "split": split, "size": sizes[split], "options": json.loads(options)}
    rows = [{"question": entry["question"], "entry": json.dumps({**where, "index": index})}
            for index, entry in enumerate(_entries(name, split, sizes[split], options))
            if entry["question"] not in training]
    if not rows:
        raise DataError(f"reasoning-gym {name} {json.loads(options)}: every {split} problem is also one of the "
                        f"{sizes['train']} training problems; this configuration has too few distinct problems for "
                        f"that many (ask for fewer, NAME:SIZE, or widen the configuration)")
    return rows


def generator_entry(row: dict) -> dict:
    """The generator's entry of a row (drawn again, seeded; cached)."""
    where = json.loads(row["entry"])
    options = json.dumps(where.get("options", {}), sort_keys=True)
    return _entries(where["generator"], where["split"], where["size"], options)[where["index"]]


def load_reasoning_gym(dataset_path: str, split: str = "train"):
    import datasets

    name, train_size, options = parse_source(dataset_path)
    return datasets.Dataset.from_list(generated_rows(name, split, train_size, options))


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
