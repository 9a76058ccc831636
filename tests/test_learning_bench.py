"""Smoke run of bench.learning (tiny model, 2 steps, 1 seed, 2 arms) and the plain-GRPO arm."""
import json
import shlex
import sys
from pathlib import Path

import pytest

from testing.processes import run_child

REPO = Path(__file__).resolve().parent.parent
SMOKE_FLAGS = ["--max_steps", "2", "--eval_samples", "2", "--max_completion_length", "6", "--max_prompt_length",
               "4096", "--per_device_train_batch_size", "4", "--lora_rank", "4"]


def test_learning_bench_smoke_run_and_resume(tmp_path):
    command = [sys.executable, "-m", "bench.learning", "--model", "tiny", "--seeds", "1", "--arms",
               "grpo", "embedding_topk5_gumbel", "--out", str(tmp_path), "--", *SMOKE_FLAGS]
    run_child(command, timeout=900, what="bench.learning smoke run", cwd=REPO)
    result = json.loads((tmp_path / "learning.json").read_text())
    assert set(result["arms"]) == {"grpo", "embedding_topk5_gumbel"}
    for run in result["runs"]:
        assert len(run["reward"]) == 2 and 0.0 <= run["accuracy_start"] <= 1.0 and 0.0 <= run["accuracy_end"] <= 1.0
    assert (tmp_path / "learning.png").stat().st_size > 0
    grpo_log = (tmp_path / "runs" / "grpo-seed1.log").read_text()
    assert "[hrpo] held-out accuracy at step 0" in grpo_log and "at step 2" in grpo_log
    # the plain arm trains no thinking module; the HRPO arm's rollouts are hybrid
    grpo_history = json.loads((tmp_path / "runs" / "grpo-seed1" / "log_history.json").read_text())
    hrpo_history = json.loads((tmp_path / "runs" / "embedding_topk5_gumbel-seed1" / "log_history.json").read_text())
    assert not any("thinking/embeds_ratio" in row for row in grpo_history)
    assert any("thinking/embeds_ratio" in row for row in hrpo_history)
    assert any("thinking/latent_left_out_mass" in row for row in hrpo_history)  # a peer arm: top-k
    from hrpo.checkpoint import run_settings

    settings = run_settings(tmp_path / "runs" / "grpo-seed1")["settings"]
    assert settings["hybrid_thinking"] == "off" and settings["task"] == "arith"
    assert settings["loss_type"] == "grpo" and settings["adam_beta2"] == 0.99 and settings["system_prompt"] == "hrpo"

    record = json.loads((tmp_path / "records" / "grpo-seed1.json").read_text())
    for when in ("problems_start", "problems_end"):
        assert len(record[when]["correct"]) == len(record[when]["answered"]) == 2
        assert set(record[when]["correct"]) <= {0, 1} and set(record[when]["answered"]) <= {0, 1}
    assert record["threads"] >= 1 and "cores" in record["machine"]

    import shutil

    shutil.rmtree(tmp_path / "runs")  # the records alone make the runs done: nothing reruns
    again = run_child(command, timeout=300, what="bench.learning, resumed", cwd=REPO)
    assert again.stdout.count("done before, kept") == 2


def test_a_failing_run_shows_its_error(tmp_path):
    command = [sys.executable, "-m", "bench.learning", "--model", "tiny", "--seeds", "1", "--arms",
               "grpo", "--out", str(tmp_path), "--", *SMOKE_FLAGS, "--group_size", "3"]
    proc = run_child(command, timeout=300, what="bench.learning with a bad flag", check=False, cwd=REPO)
    assert proc.returncode == 1
    assert "must be divisible by num_generations (3)" in proc.stderr


def _learning_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_bench", REPO / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_learning_rate(bench) -> float:
    """The demo recipe's learning rate (the comparison's, unless a flag changes it)."""
    import yaml

    return float(yaml.safe_load(bench.SETTINGS.read_text())["learning_rate"])


def test_a_finished_run_is_kept_only_with_the_settings_asked_for_now(tmp_path):
    bench = _learning_bench()
    settings = ["--task", "arith", "--max_steps", "24", "--lr", "5e-4"]
    wanted = bench.command_for("projection", 1, "model", settings, tmp_path / "b")
    # the same effective settings, given in another order and with a repeated flag (the last one wins)
    same = bench.command_for("projection", 1, "model", ["--lr", "5e-4", "--max_steps", "30", "--task", "arith",
                                                         "--max_steps", "24"], tmp_path / "a")
    assert bench.changed_settings(shlex.join(same), wanted) == {}
    other = bench.command_for("projection", 1, "model", settings + ["--beta", "0"], tmp_path / "a")
    assert bench.changed_settings(shlex.join(other), wanted) == {"beta": (0.0, 0.005)}
    other_arm = bench.command_for("grpo", 1, "model", settings, tmp_path / "b")
    assert "hybrid_thinking" in bench.changed_settings(shlex.join(other_arm), wanted)


def test_a_run_made_with_an_earlier_recipe_is_not_taken_for_the_recipe_now(tmp_path):
    """The record keeps the recipe's text: the demo's recipe gained skip_steps_without_signal after
    the first comparisons ran, and their commands name the same file."""
    bench = _learning_bench()
    settings = bench.comparison_settings([])
    wanted = bench.command_for("projection", 1, "model", settings, tmp_path / "b")
    recipe = bench.recipe_text(settings)
    assert "skip_steps_without_signal: true" in recipe
    assert bench.changed_settings(shlex.join(wanted), wanted, recipe) == {}
    earlier = recipe.replace("skip_steps_without_signal: true", "skip_steps_without_signal: false")
    assert bench.changed_settings(shlex.join(wanted), wanted, earlier) == {"skip_steps_without_signal": (False, True)}


def test_a_run_kept_from_another_checkout_has_the_same_settings(tmp_path):
    """Records name the checkout they ran in (its recipe, its model folder): a clone elsewhere
    keeps them, and a real difference is still found."""
    bench = _learning_bench()
    model = str(bench.REPO / ".cache" / "SmolLM2-135M-Instruct")
    wanted = bench.command_for("projection", 1, model, bench.comparison_settings([]), tmp_path / "b")
    elsewhere = [token.replace(str(bench.REPO), "/elsewhere/hrpo") for token in wanted]
    assert elsewhere != wanted and "/elsewhere/hrpo/configs/recipes/cpu_demo.yaml" in elsewhere
    assert bench.changed_settings(shlex.join(elsewhere), wanted) == {}
    assert bench.changed_settings(shlex.join(elsewhere + ["--lr", "1e-3"]), wanted) == {
        "learning_rate": (1e-3, recipe_learning_rate(bench))}


def test_the_comparison_scores_every_held_out_problem():
    from hrpo.settings_parser import parse_settings
    from hrpo.tasks.arith import SPLIT_SIZES

    bench = _learning_bench()
    assert parse_settings(bench.demo_settings()).flat()["eval_samples"] == 64  # the demo scores a part
    assert parse_settings(bench.comparison_settings([])).flat()["eval_samples"] == SPLIT_SIZES["test"] == 200
    assert parse_settings(bench.comparison_settings(["--eval_samples", "64"])).flat()["eval_samples"] == 64


def _fake_record(path: Path, command: list[str], end: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arm, seed = path.stem.rsplit("-seed", 1)
    path.write_text(json.dumps({
        "arm": arm, "seed": int(seed), "command": shlex.join(command), "wall_seconds": 1.0, "reward": [0.0, 0.5],
        "accuracy_start": 0.25, "accuracy_end": sum(end) / 4, "seconds_per_step": 0.5,
        "problems_start": {"correct": [1, 0, 0, 0], "answered": [1, 1, 0, 0]},
        "problems_end": {"correct": end, "answered": [1, 1, 1, 1]}}))


def test_a_kept_run_with_other_settings_is_an_error_that_loses_nothing(tmp_path, monkeypatch, capsys):
    bench = _learning_bench()
    model = str(tmp_path / "model")
    trained = []

    def fake_run(arm, seed, *args):
        trained.append((arm, seed))
        raise RuntimeError("stopped here")

    monkeypatch.setattr(bench, "run_arm", fake_run)
    folder = bench.run_folder(tmp_path, "grpo", 1)
    record = bench.record_path(tmp_path, "grpo", 1)
    _fake_record(record, bench.command_for("grpo", 1, model, bench.demo_settings(), folder), [1, 0, 0, 1])
    kept = record.read_text()
    argv = ["--model", model, "--seeds", "1", "2", "--arms", "grpo", "--out", str(tmp_path)]
    assert bench.main(argv) == 1
    err = capsys.readouterr().err
    assert "grpo seed 1: --eval_samples 64 -> 200" in err and "--rerun_changed" in err
    assert trained == [] and record.read_text() == kept  # nothing trained, nothing replaced
    assert bench.main(argv + ["--", "--eval_samples", "64"]) == 1  # the settings it was made with: kept
    assert trained == [("grpo", 2)]
    trained.clear()
    assert bench.main(argv + ["--rerun_changed"]) == 1
    assert trained == [("grpo", 1)]


def test_the_summary_carries_the_statistics_of_kept_runs(tmp_path):
    """Runs kept from their records (nothing trains): learning.json has bench.stats' summary."""
    bench = _learning_bench()
    model, settings = str(tmp_path / "model"), bench.comparison_settings([])
    for arm, end in (("grpo", [1, 0, 0, 1]), ("projection", [1, 1, 1, 1])):
        folder = bench.run_folder(tmp_path, arm, 1)
        _fake_record(bench.record_path(tmp_path, arm, 1), bench.command_for(arm, 1, model, settings, folder), end)
    assert bench.main(["--model", model, "--seeds", "1", "--arms", "grpo", "projection", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "learning.json").read_text())
    assert not any(key.startswith("problems_") for run in result["runs"] for key in run)
    statistics = result["statistics"]
    assert statistics["arms"]["projection"]["gain"]["mean"] == pytest.approx(0.75)
    assert statistics["versus_baseline"]["projection"]["mean"] == pytest.approx(0.5)
    assert statistics["arms"]["grpo"]["answered"]["start"]["answered_share"] == pytest.approx(0.5)


def test_report_rebuilds_the_table_and_plot_from_the_records_alone(tmp_path, capsys):
    bench = _learning_bench()
    assert bench.main(["--report", "--out", str(tmp_path)]) == 1
    assert "no records under" in capsys.readouterr().err
    for arm, seed, end in (("projection", 2, [1, 1, 0, 0]), ("grpo", 1, [1, 0, 0, 1]), ("projection", 1, [1, 1, 1, 1]),
                           ("grpo", 2, [0, 0, 0, 0])):
        _fake_record(tmp_path / "records" / f"{arm}-seed{seed}.json", ["hrpo_gsm8k.py"], end)
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "learning.json").read_text())
    assert list(result["arms"]) == ["grpo", "projection"]  # bench order, not file order
    assert result["arms"]["projection"]["seeds"] == [1, 2]
    gain = result["statistics"]["arms"]["projection"]["gain"]
    assert gain["per_seed"] == pytest.approx([0.75, 0.25]) and gain["mean"] == pytest.approx(0.5)
    assert result["statistics"]["versus_baseline"]["projection"]["mean"] == pytest.approx(0.5)
    assert (tmp_path / "learning.png").stat().st_size > 0
    assert "| projection | 2 | +0.500" in capsys.readouterr().out


def test_report_keeps_the_commands_and_settings_the_runs_were_made_with(tmp_path):
    bench = _learning_bench()
    model, settings = str(tmp_path / "model"), bench.comparison_settings(["--dataset_path", "generated:3"])
    for arm, end in (("grpo", [1, 0, 0, 1]), ("projection", [1, 1, 1, 1])):
        folder = bench.run_folder(tmp_path, arm, 1)
        _fake_record(bench.record_path(tmp_path, arm, 1), bench.command_for(arm, 1, model, settings, folder), end)
    ran = ["--model", model, "--seeds", "1", "--arms", "grpo", "projection", "--out", str(tmp_path), "--",
           "--dataset_path", "generated:3"]
    assert bench.main(ran) == 0  # every run kept: nothing trains
    made = json.loads((tmp_path / "learning.json").read_text())
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    rebuilt = json.loads((tmp_path / "learning.json").read_text())
    assert rebuilt.get("settings") == made.get("settings") and rebuilt.get("model") == made.get("model") == model
    assert made["commands"] == rebuilt["commands"] == ["python -m bench.learning " + shlex.join(ran)]
    assert made["settings"] == ["--config", "configs/recipes/cpu_demo.yaml", "--eval_samples", "200",
                                "--dataset_path", "generated:3"]
    assert rebuilt["rebuilt_by"] == f"python -m bench.learning --report --out {tmp_path}"
    assert rebuilt["statistics"] == made["statistics"]


def test_report_reads_an_older_summary_and_records_from_another_checkout(tmp_path):
    """An older learning.json kept one "command" ("learning.py ARGS") and absolute settings;
    older records name the checkout they ran in. The report keeps the command and the settings
    and writes every path relative to the checkout."""
    bench = _learning_bench()
    settings = ["--config", "/elsewhere/hrpo/configs/recipes/cpu_demo.yaml", "--eval_samples", "200"]
    command = ["/elsewhere/hrpo/.venv/bin/python", "/elsewhere/hrpo/hrpo_gsm8k.py", *settings, "--model_name",
               "/elsewhere/hrpo/.cache/SmolLM2-135M-Instruct", "--output_dir",
               "/elsewhere/hrpo/bench/results/x/runs/grpo-seed1", "--seed", "1", "--hybrid_thinking", "off"]
    _fake_record(tmp_path / "records" / "grpo-seed1.json", command, [1, 0, 0, 1])
    (tmp_path / "learning.json").write_text(json.dumps({
        "command": "learning.py --arms grpo --seeds 1 --threads 1", "model": "smollm2",
        "settings": [token.replace("/elsewhere/hrpo", str(bench.REPO)) for token in settings]}))
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    rebuilt = json.loads((tmp_path / "learning.json").read_text())
    assert rebuilt.get("settings") == ["--config", "configs/recipes/cpu_demo.yaml", "--eval_samples", "200"]
    assert rebuilt.get("commands") == ["python -m bench.learning --arms grpo --seeds 1 --threads 1"]
    assert rebuilt["model"] == "smollm2"
    assert rebuilt["runs"][0]["command"] == (
        ".venv/bin/python hrpo_gsm8k.py --config configs/recipes/cpu_demo.yaml --eval_samples 200 --model_name "
        ".cache/SmolLM2-135M-Instruct --output_dir bench/results/x/runs/grpo-seed1 --seed 1 --hybrid_thinking off")
    (tmp_path / "learning.json").unlink()  # no summary at all: the settings come from the records
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "learning.json").read_text())["settings"] == [
        "--config", "configs/recipes/cpu_demo.yaml", "--eval_samples", "200"]


def test_a_run_records_its_command_relative_to_the_checkout(tmp_path, monkeypatch):
    """The run starts in the checkout with its absolute command; bench_run.json (so the record)
    keeps it relative, and a later comparison finds the same settings in it, or a change."""
    import subprocess

    bench = _learning_bench()
    started = []

    def fake_run(command, cwd=None, **kwargs):
        if command[0] == "rm":  # run_arm clears the run folder first
            return real_run(command, **kwargs)
        started.append((command, cwd))
        bench.run_folder(tmp_path, "projection", 1).mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    real_run = subprocess.run

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    model = str(bench.REPO / ".cache" / "SmolLM2-135M-Instruct")
    folder = bench.REPO / "bench" / "results" / "x" / "runs" / "projection-seed1"
    settings = bench.comparison_settings([])
    wanted = bench.command_for("projection", 1, model, settings, folder)
    monkeypatch.setattr(bench, "command_for", lambda *args: wanted)
    bench.run_arm("projection", 1, model, settings, bench.run_folder(tmp_path, "projection", 1), 1)
    assert started == [(wanted, bench.REPO)]
    kept = json.loads((bench.run_folder(tmp_path, "projection", 1) / "bench_run.json").read_text())
    assert str(bench.REPO) not in kept["command"]
    assert shlex.split(kept["command"])[1:] == [
        "hrpo_gsm8k.py", "--config", "configs/recipes/cpu_demo.yaml", "--eval_samples", "200", "--model_name",
        ".cache/SmolLM2-135M-Instruct", "--output_dir", "bench/results/x/runs/projection-seed1", "--seed", "1",
        "--thinking_latent_source", "projection"]
    assert bench.changed_settings(kept["command"], wanted) == {}
    assert bench.changed_settings(kept["command"] + " --lr 1e-3", wanted) == {
        "learning_rate": (1e-3, recipe_learning_rate(bench))}
    bench.run_arm("projection", 1, model, settings, bench.run_folder(tmp_path, "projection", 1), 1,
                  invocation="python -m bench.learning --arms projection --seeds 1")
    kept = json.loads((bench.run_folder(tmp_path, "projection", 1) / "bench_run.json").read_text())
    assert kept["invocation"] == "python -m bench.learning --arms projection --seeds 1"
