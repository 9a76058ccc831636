"""The task interface, the calibrated arithmetic task, and the recipe flags of the training script."""
import pytest

from hrpo.data import DataError
from hrpo.rewards import reference_answer
from hrpo.tasks import get_task, system_prompt_text
from hrpo.tasks.arith import DIFFICULTIES, generated_split, make_problems, parse_generated
from hrpo.tasks.gsm8k import check_gsm8k


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_generated_problems_are_seeded_distinct_and_gsm8k_format(difficulty):
    import datasets

    rows = make_problems(200, seed=7, difficulty=difficulty)
    assert rows == make_problems(200, seed=7, difficulty=difficulty)
    assert rows != make_problems(200, seed=8, difficulty=difficulty)
    assert len({row["question"] for row in rows}) == 200
    check_gsm8k(datasets.Dataset.from_list(rows), f"arith difficulty {difficulty}")
    for row in rows:  # the worked answer's result is the reference
        assert reference_answer(row["answer"]) == int(row["answer"].split("####")[1])


def test_generated_test_split_never_repeats_a_training_question():
    train = {row["question"] for row in generated_split("train")}
    test = generated_split("test")
    assert len(test) == 200 and not train & {row["question"] for row in test}


def test_arith_dataset_path_forms(tmp_path):
    from hrpo.data import write_jsonl

    task = get_task("arith")
    assert parse_generated("generated") == 2 and parse_generated("generated:3") == 3
    assert parse_generated("data/x.jsonl") is None
    assert len(task.load("generated:1", "test")) == 200
    write_jsonl(make_problems(5, difficulty=1), tmp_path / "test.jsonl")
    assert len(task.load(str(tmp_path / "test.jsonl"), "test")) == 5
    with pytest.raises(DataError, match="generated:D"):
        task.load("generated:9", "train")
    with pytest.raises(DataError, match="splits"):
        task.load("generated", "validation")


def test_task_reward_function_is_named_and_grades_by_the_answer_column():
    reward = get_task("arith").reward_function()
    assert reward.__name__ == "arith_reward"  # TRL logs rewards/arith_reward/mean
    completions = [[{"role": "assistant", "content": "3 + 4 = 7 #### 7"}], "#### 7\n#### 8", "#### 7\n#### 7"]
    assert reward(completions, answer=["#### 7"] * 3, prompts=None, completion_ids=None) == [1.0, 0.0, 1.0]


def test_system_prompts():
    assert "#### tag" in system_prompt_text("hrpo", "####")  # HRPO's prompt format
    assert "####" in system_prompt_text("tutor", "####")
    assert system_prompt_text("Answer after ####.", "####") == "Answer after ####."
    with pytest.raises(ValueError, match="answer marker"):
        system_prompt_text("Just answer.", "####")
    prompt = get_task("gsm8k").to_prompt("What is 2+2?")
    assert [m["role"] for m in prompt] == ["system", "user"] and "#### tag" in prompt[0]["content"]


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="--task 'nope'"):
        get_task("nope")


def test_make_arith_data_script_writes_the_generated_splits(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "scripts.make_arith_data", "--out", str(tmp_path), "--difficulty", "1"],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert written == generated_split("test", 1)
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 2000


def test_the_training_defaults_are_hrpos_recipe(tmp_path):
    """loss aggregation per sequence ("grpo", TRL 1.15 defaults to "dapo"), Adam betas
    (0.9, 0.99), HRPO's prompt; each a flag."""
    from hrpo.settings_parser import parse_settings

    settings = parse_settings(["--output_dir", str(tmp_path)])
    config = settings.training
    assert (config.loss_type, config.adam_beta1, config.adam_beta2) == ("grpo", 0.9, 0.99)
    assert (config.top_k, config.top_p, config.temperature, config.beta) == (0, 1.0, 0.5, 0.005)
    assert settings.task.system_prompt == "hrpo" and config.hybrid_thinking == "on"
    changed = parse_settings(["--loss_type", "dapo", "--adam_beta2", "0.999", "--output_dir", str(tmp_path)])
    assert (changed.training.loss_type, changed.training.adam_beta2) == ("dapo", 0.999)
