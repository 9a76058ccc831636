"""lm-evaluation-harness's ``hrpo`` model (hrpo/lm_eval_model.py): on the same held-out rows it
decodes and grades exactly as hrpo-eval (hrpo/evaluate.py), the independent path."""
import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is installed by ./setup.sh (requirements.txt)")

from hrpo import evaluate as evaluation_cli  # noqa: E402
from hrpo import train  # noqa: E402
from hrpo.data import write_jsonl  # noqa: E402
from hrpo.held_out import result_file_name  # noqa: E402
from hrpo.tasks.arith import make_problems  # noqa: E402
from testing.training import save_training_workspace, tiny_training_argv  # noqa: E402

ROWS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    workspace = save_training_workspace(root)
    out = root / "out"
    assert train.main(tiny_training_argv(workspace, out, "--task", "arith", "--max_completion_length", "12")) == 0
    held_out = root / "held_out.jsonl"
    write_jsonl(make_problems(ROWS, seed=7), held_out)
    return out / "checkpoint-1", held_out


def hrpo_eval(checkpoint, held_out, batch_size: int) -> dict:
    assert evaluation_cli.main(["--checkpoint_path", str(checkpoint), "--dataset_path", str(held_out), "--greedy",
                                "--batch_size", str(batch_size)]) == 0
    return json.loads((checkpoint / result_file_name(str(held_out), "test")).read_text())


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_the_same_completions_and_accuracy_as_hrpo_eval(checkpoint, tmp_path, thinking):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from hrpo.lm_eval_model import HRPOLM, write_held_out_task

    folder, held_out = checkpoint
    ours = hrpo_eval(folder, held_out, batch_size=2) if thinking == "on" else None
    if thinking == "off":
        assert evaluation_cli.main(["--checkpoint_path", str(folder), "--dataset_path", str(held_out), "--greedy",
                                    "--batch_size", "2", "--thinking", "off"]) == 0
        ours = json.loads((folder / result_file_name(str(held_out), "test")).read_text())
    name = write_held_out_task(tmp_path / "tasks", held_out, task="arith")
    model = HRPOLM(str(folder), batch_size=2, thinking=thinking)
    results = simple_evaluate(model=model, tasks=[name], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              log_samples=True)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [e["completion"] for e in ours["examples"]]
    assert results["results"][name]["accuracy,none"] == pytest.approx(ours["metrics"]["accuracy"], abs=1e-12)
    assert len(samples) == ROWS


def test_the_command_line_registers_the_model_and_writes_the_task(checkpoint, tmp_path, capsys):
    from hrpo.lm_eval_model import main

    folder, held_out = checkpoint
    assert main(["--model_args", f"checkpoint_path={folder},batch_size=2", "--held_out", str(held_out),
                 "--task", "arith", "--limit", "1", "--output_path", str(tmp_path / "lm-eval-out")]) == 0
    assert "hrpo_held_out" in capsys.readouterr().out
    assert main(["--model_args", f"checkpoint_path={folder}", "--held_out", str(tmp_path / "missing.jsonl")]) == 2


def test_the_command_line_decodes_in_hrpo_evals_batches_unless_told(monkeypatch):
    """lm-eval's own default batch is 1; the hrpo model decodes in hrpo-eval's batches, as the
    recorded comparison did (bench/results/lm_eval), unless --batch_size is given."""
    import sys

    import lm_eval.__main__

    from hrpo.evaluate import EVAL_BATCH_SIZE
    from hrpo.lm_eval_model import main

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    assert main(["--model_args", "checkpoint_path=x", "--tasks", "t"]) == 0
    assert main(["--model_args", "checkpoint_path=x", "--tasks", "t", "--batch_size", "4"]) == 0
    assert main(["ls", "tasks"]) == 0
    assert seen[0][-2:] == ["--batch_size", str(EVAL_BATCH_SIZE)] and seen[0][1:4] == ["run", "--model", "hrpo"]
    assert seen[1].count("--batch_size") == 1 and seen[1][-1] == "4"
    assert "--batch_size" not in seen[2]
