"""--task reasoning_gym (hrpo/tasks/reasoning_gym.py): reasoning-gym's generators as offline data,
graded by our extraction and then the generator's own scorer on the extracted answer."""
import json

import pytest

from hrpo.data import DataError
from hrpo.tasks import get_task
from hrpo.tasks.reasoning_gym import answer_text, generated_rows, generator_entry, parse_source

TASK = get_task("reasoning_gym")


@pytest.fixture(scope="module")
def splits():
    return {split: generated_rows("gsm_symbolic", split, train_size=300) for split in ("train", "test")}


def test_the_held_out_split_shares_no_question_with_training(splits):
    train = {row["question"] for row in splits["train"]}
    assert len(splits["train"]) == 300 and 0 < len(splits["test"]) <= 200
    assert not train & {row["question"] for row in splits["test"]}
    # drawn again, the same problems (seeded)
    assert generated_rows("gsm_symbolic", "test", train_size=300) == splits["test"]


def test_grading_reads_the_answer_after_the_marker_with_the_generators_scorer(splits):
    row = splits["test"][0]
    entry = generator_entry(row)
    right, wrong = entry["answer"], str(int(float(entry["answer"])) + 1)
    grade = lambda completion: TASK.grade(completion, row)["correct"]  # noqa: E731
    assert grade(f"Adding up. #### {right}")
    assert grade(f"#### {right}\nso\n#### {right}")  # repeated identical answers count once
    assert not grade(f"#### {right}\n#### {wrong}")  # conflicting answers: none
    assert not grade(f"{right} is what I get, #### {wrong}")  # the number before the marker is not read
    assert not grade(f"The answer is {right}")  # no marker, no answer (the scorer alone would read it)
    assert answer_text("####\n\n  7 apples \n####") == "7 apples"


def test_the_reward_function_takes_trls_columns(splits):
    rows = splits["test"][:2]
    answers = [generator_entry(row)["answer"] for row in rows]
    reward = TASK.reward_function()
    assert reward([f"#### {answers[0]}", "#### -1"], entry=[row["entry"] for row in rows]) == [1.0, 0.0]
    assert reward.__name__ == "reasoning_gym_reward"


def test_a_generator_that_does_not_exist_is_named_with_the_choices():
    with pytest.raises(DataError, match="'gsm_symbolik' is not a reasoning-gym generator; expected one of .*gsm_symbolic"):
        parse_source("gsm_symbolik")
    with pytest.raises(DataError, match="NAME:SIZE"):
        parse_source("gsm_symbolic:0")
    assert parse_source("chain_sum:50") == ("chain_sum", 50)


def test_other_generators_keep_their_metadata_for_the_scorer():
    for name in ("chain_sum", "basic_arithmetic"):
        row = generated_rows(name, "train", train_size=3)[0]
        entry = generator_entry(row)
        assert TASK.grade(f"#### {entry['answer']}", row)["correct"], name
