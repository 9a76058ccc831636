"""hrpo_math.py and hrpo_mmlu.py: their defaults, one training step each on a tiny model
(CPU), and an offline evaluation of the checkpoint (hrpo.evaluate, eval_gsm8k.py's code). The
scripts are run as a user runs them, in this process (runpy), not imported."""
import json

import pytest

import runpy
import sys
from pathlib import Path

from hrpo import evaluate as evaluation_cli
from hrpo import train
from hrpo.checkpoint import RUN_SETTINGS
from hrpo.held_out import result_file_name
from hrpo.data import write_jsonl
from testing.task_rows import ARC_ROWS, MMLU_ROWS, OBQA_ROWS, PROBLEMS, REFERENCES, write_math_folder
from testing.tiny import PLAIN_CHAT_TEMPLATE, save_tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("task-model") / "model", chat_template=PLAIN_CHAT_TEMPLATE)


def tiny_argv(model, data, out, *extra):
    return ["--model_name", str(model), "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--group_size", "4",
            "--max_completion_length", "8", "--max_prompt_length", "1024", "--lora_rank", "4", "--warmup_ratio", "0",
            "--save_steps", "1", *extra]


REPO = Path(__file__).resolve().parent.parent


def run_script(name: str, argv: list[str]) -> int:
    """``python NAME ARGV`` in this process."""
    old = sys.argv
    sys.argv = [str(REPO / name), *map(str, argv)]
    try:
        runpy.run_path(str(REPO / name), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = old
    raise AssertionError(f"{name} did not exit")


def test_the_task_scripts_only_change_defaults(monkeypatch):
    from hrpo.settings_parser import parse_settings, settings_parser

    seen = {}
    monkeypatch.setattr(train, "main", lambda argv=None, description=None, **defaults: seen.update(
        {"description": description, "defaults": defaults}) or 0)
    flat = {}
    for script in ("hrpo_gsm8k.py", "hrpo_math.py", "hrpo_mmlu.py"):
        assert run_script(script, []) == 0
        flat[script] = (parse_settings([], settings_parser(**seen["defaults"])).flat(), seen["description"])
    base = flat["hrpo_gsm8k.py"][0]
    changed = {script: {k: v for k, v in values.items() if base[k] != v} for script, (values, _) in flat.items()}
    # HRPO's MATH and MMLU scripts: 8 completions per prompt, 16 per micro-batch (testing/published.py);
    # TRL derives the generation batch (16 x 4 accumulation steps)
    hrpo_scripts = {"num_generations": 8, "per_device_train_batch_size": 16, "generation_batch_size": 64}
    assert changed["hrpo_math.py"] == {"task": "math", "dataset_path": "EleutherAI/hendrycks_math", **hrpo_scripts}
    assert changed["hrpo_mmlu.py"] == {"task": "mmlu", "dataset_path": "cais/mmlu", **hrpo_scripts}
    assert "MATH" in flat["hrpo_math.py"][1] and "multiple-choice" in flat["hrpo_mmlu.py"][1]


def evaluate(checkpoint, data, count):
    code = evaluation_cli.main(["--checkpoint_path", str(checkpoint), "--dataset_path", str(data), "--split", "test",
                            "--batch_size", "2", "--greedy", "--max_new_tokens", "6", "--num_samples", str(count)])
    assert code == 0
    return json.loads((checkpoint / result_file_name(str(data), "test")).read_text())


def test_math_one_step_and_evaluation(model_dir, tmp_path):
    root = write_math_folder(tmp_path / "MATH", "train", PROBLEMS[:4])
    out = tmp_path / "out"
    assert run_script("hrpo_math.py", tiny_argv(model_dir, root, out)) == 0
    run = json.loads((out / RUN_SETTINGS).read_text())
    assert run["task"] == "math" and run["max_completion_length"] == 8
    logged = json.loads((out / "log_history.json").read_text())[0]
    assert "rewards/math_reward/mean" in logged
    # counted per batch through TRL's log_metric (on this loaded CPU a random answer may time out)
    assert logged["math/timeouts"] >= 0.0 and logged["math/refused"] >= 0.0

    math500 = [{"problem": p["problem"], "solution": p["solution"], "answer": ref}
               for p, ref in zip(PROBLEMS, REFERENCES)]
    write_jsonl(math500, tmp_path / "math500.jsonl")
    result = evaluate(out / "checkpoint-1", tmp_path / "math500.jsonl", 3)
    assert result["metrics"]["task"] == "math" and result["metrics"]["total"] == 3
    assert [e["reference"] for e in result["examples"]] == REFERENCES[:3]


def test_mmlu_one_step_and_evaluation_on_each_layout(model_dir, tmp_path):
    write_jsonl([{"train": row} for row in MMLU_ROWS], tmp_path / "auxiliary_train.jsonl")
    out = tmp_path / "out"
    assert run_script("hrpo_mmlu.py", tiny_argv(model_dir, tmp_path / "auxiliary_train.jsonl", out)) == 0
    run = json.loads((out / RUN_SETTINGS).read_text())
    assert run["task"] == "mmlu"
    assert "rewards/mmlu_reward/mean" in json.loads((out / "log_history.json").read_text())[0]

    for name, rows, references in (("arc.jsonl", ARC_ROWS, ["C", "B"]), ("obqa.jsonl", OBQA_ROWS, ["B"])):
        write_jsonl(rows, tmp_path / name)
        result = evaluate(out / "checkpoint-1", tmp_path / name, len(rows))
        assert result["metrics"]["task"] == "mmlu" and result["metrics"]["total"] == len(rows)
        assert [e["reference"] for e in result["examples"]] == references


def test_bad_data_stops_the_task_scripts_before_training(model_dir, tmp_path, capsys):
    write_jsonl([{"problem": "q?", "solution": "no box"}], tmp_path / "bad_math.jsonl")
    assert run_script("hrpo_math.py", tiny_argv(model_dir, tmp_path / "bad_math.jsonl", tmp_path / "out")) == 2
    assert "bad_math.jsonl, row 0" in capsys.readouterr().err
    write_jsonl([{**MMLU_ROWS[0], "choices": ["one"], "answer": 0}], tmp_path / "bad_mc.jsonl")
    assert run_script("hrpo_mmlu.py", tiny_argv(model_dir, tmp_path / "bad_mc.jsonl", tmp_path / "out")) == 2
    assert "bad_mc.jsonl, row 0: 1 choice(s)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reasoning_gym_one_step_and_held_out_evaluation_offline(model_dir, tmp_path):
    """hrpo-train's command line on a reasoning-gym generator: trains, then the run's own
    held-out evaluation draws the generator's test split (no file, no network)."""
    out = tmp_path / "out"
    argv = tiny_argv(model_dir, "gsm_symbolic:16", out, "--task", "reasoning_gym", "--eval_samples", "3")
    assert train.main(argv) == 0
    run = json.loads((out / RUN_SETTINGS).read_text())
    assert run["task"] == "reasoning_gym" and run["dataset_path"] == "gsm_symbolic:16"
    logged = json.loads((out / "log_history.json").read_text())[0]
    assert "rewards/reasoning_gym_reward/mean" in logged
    result = json.loads(next(out.glob("eval_*.json")).read_text())
    assert result["metrics"]["total"] == 3 and len(result["examples"]) == 3


def test_hrpo_eval_scores_a_base_model_and_a_checkpoint_on_a_configured_generator(model_dir, tmp_path):
    """The comparison a user makes: the untrained model (--base_model) and a trained run, on the same
    configured generator's held-out problems, graded alike; the configuration reaches the rows."""
    source = "chain_sum,max_terms=2,max_digits=2"
    common = ["--task", "reasoning_gym", "--dataset_path", source, "--greedy", "--num_samples", "3",
              "--max_new_tokens", "4"]
    assert evaluation_cli.main(["--base_model", str(model_dir), "--output_dir", str(tmp_path / "base"), *common]) == 0
    base = json.loads((tmp_path / "base" / result_file_name(source, "test")).read_text())
    assert base["metrics"]["thinking"] is False and base["metrics"]["model"] == str(model_dir)
    assert base["metrics"]["total"] == 3 and base["metrics"]["system_prompt"] == "hrpo"
    assert all(len(e["question"].split(":")[1].rstrip(" =").split()) == 3 for e in base["examples"])  # a + b

    out = tmp_path / "run"
    assert train.main(tiny_argv(model_dir, "chain_sum:16,max_terms=2,max_digits=2", out, "--task",
                                "reasoning_gym")) == 0
    assert evaluation_cli.main(["--checkpoint_path", str(out), *common]) == 0
    trained = json.loads((out / result_file_name(source, "test")).read_text())
    assert [e["question"] for e in trained["examples"]] == [e["question"] for e in base["examples"]]
    assert trained["metrics"]["thinking"] is True


def test_hrpo_eval_says_what_a_base_model_lacks(model_dir, tmp_path, capsys):
    assert evaluation_cli.main(["--base_model", str(model_dir), "--greedy"]) == 2
    assert "give --task and --output_dir (a base model has no run settings" in capsys.readouterr().err
    assert evaluation_cli.main(["--base_model", str(model_dir), "--task", "arith", "--output_dir", str(tmp_path),
                                "--thinking", "on"]) == 2
    assert "a base model has no trained thinking modules" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
