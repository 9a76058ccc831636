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


def test_held_out_problems_are_not_the_training_problems_shifted_by_one():
    """Generators seed problem i with seed + i: held-out seeds must not fall inside training's range,
    or the held-out split is the training split shifted by one (chain_sum lost all 200 of its rows)."""
    for name in ("chain_sum", "basic_arithmetic", "leg_counting", "gsm_symbolic"):  # many distinct problems
        assert len(generated_rows(name, "test")) >= 190, name
    with pytest.raises(DataError, match="SIZE a number of training problems from 1 to 1,000,000"):
        parse_source("chain_sum:1000001")


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
    assert parse_source("chain_sum:50") == ("chain_sum", 50, "{}")


def test_the_generators_configuration_reaches_its_problems_and_its_scorer():
    source = 'chain_sum:20, min_terms=2,max_terms=2 ,max_digits=1,allow_negation=false'
    name, size, options = parse_source(source)
    assert (name, size, json.loads(options)) == ("chain_sum", 20, {"min_terms": 2, "max_terms": 2, "max_digits": 1,
                                                                   "allow_negation": False})
    rows = TASK.load(source, "test").to_list()
    for row in rows:
        terms = row["question"].split(":")[1].rstrip(" =").split()[::2]
        assert len(terms) == 2 and all(len(term) == 1 for term in terms), row["question"]
    # the row finds its problem again, configuration included, so the scorer grades the right answer
    assert all(TASK.grade(f"#### {generator_entry(row)['answer']}", row)["correct"] for row in rows)
    assert not TASK.grade("#### 100", rows[0])["correct"]  # two one-digit terms never sum to 100
    # 2,000 training problems exhaust the 200 distinct ones: nothing is left to hold out, and it is said
    with pytest.raises(DataError, match="every test problem is also one of the 2000 training problems; this "
                                        "configuration has too few distinct problems"):
        TASK.load("chain_sum,min_terms=2,max_terms=2,max_digits=1", "test")


def test_a_configuration_value_may_be_a_json_list_with_commas():
    source = 'calendar_arithmetic:10,tasks=["is_leap_year", "weekday_of_date"],year=2024'
    assert json.loads(parse_source(source)[2]) == {"tasks": ["is_leap_year", "weekday_of_date"], "year": 2024}
    questions = [row["question"] for row in TASK.load(source, "train").to_list()]
    assert questions and all("leap year" in q or "weekday" in q or "day of the week" in q for q in questions), questions


def test_a_bad_configuration_is_refused_before_training_naming_the_field():
    with pytest.raises(DataError, match="'max_digit' is not a configuration field of chain_sum; expected KEY=VALUE "
                                        "with KEY one of .*max_digits"):
        parse_source("chain_sum,max_digit=1")
    with pytest.raises(DataError, match="'seed' is not a configuration field"):
        parse_source("chain_sum,seed=3")  # the splits' seeds are the task's, never a field
    with pytest.raises(DataError, match=r"reasoning-gym refused the configuration \{'min_terms': 5, 'max_terms': 2\}"):
        parse_source("chain_sum,min_terms=5,max_terms=2")


def test_other_generators_keep_their_metadata_for_the_scorer():
    for name in ("chain_sum", "basic_arithmetic"):
        row = generated_rows(name, "train", train_size=3)[0]
        entry = generator_entry(row)
        assert TASK.grade(f"#### {entry['answer']}", row)["correct"], name
