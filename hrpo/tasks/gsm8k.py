"""GSM8K: grade-school math word problems, answer after ``####`` (hub ``openai/gsm8k``,
config ``main``, or a local .jsonl/.json/.parquet with ``question`` and ``answer``)."""
from __future__ import annotations

from ..data import DataError, load_rows
from ..rewards import ANSWER_MARKER, extract_answer, reference_answer
from .base import Task


def check_gsm8k(dataset, name: str) -> None:
    """Every row has a question and an answer whose reference number can be read."""
    if len(dataset) == 0:
        raise DataError(f"dataset {name} ({len(dataset)} rows): it is empty")
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise DataError(f"dataset {name}: missing column(s) {sorted(missing)}; expected 'question' and 'answer' "
                        f"(GSM8K format), found {dataset.column_names}")
    for index, row in enumerate(dataset):
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise DataError(f"dataset {name}, row {index}: the question is empty")
        if not isinstance(row["answer"], str) or not row["answer"].strip():
            raise DataError(f"dataset {name}, row {index}: the answer is missing")
        if reference_answer(row["answer"]) is None:
            raise DataError(f"dataset {name}, row {index}: the answer {row['answer'][-60:]!r} has no number "
                            f"after '{ANSWER_MARKER}' (expected '... {ANSWER_MARKER} <number>')")


def load_gsm8k(dataset_path: str, split: str = "train"):
    """A checked `datasets.Dataset` with ``question`` and ``answer`` columns."""
    dataset = load_rows(dataset_path, split, hub_config="main", expected="GSM8K-format")
    check_gsm8k(dataset, dataset_path)
    return dataset


TASK = Task(
    name="gsm8k",
    answer_marker=ANSWER_MARKER,
    default_dataset="openai/gsm8k",
    load=load_gsm8k,
    extract=extract_answer,
    reference=lambda row: reference_answer(row["answer"]),
)
