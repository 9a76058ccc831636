"""Smoke tests of the bench scripts: each runs end to end on a tiny model, a few tokens/steps."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench_command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", *args]


def run_bench(name: str, *args: str, timeout: int = 900) -> str:
    proc = subprocess.run(bench_command(name, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow  # three training processes: about 70 s on an idle 2-core CPU
def test_train_step_bench_runs_every_variant(tmp_path):
    out = run_bench("train_step", "--model", "tiny", "--steps", "2", "--new-tokens", "4",
                    "--json", str(tmp_path / "r.json"))
    for variant in ("plain_grpo", "hrpo_embedding", "hrpo_projection"):
        assert variant in out


def test_train_step_bench_reports_a_failing_child(tmp_path):
    proc = subprocess.run(bench_command("train_step", "--model", str(tmp_path / "no-model"), "--steps", "2",
                                        "--new-tokens", "4", "--variants", "hrpo_projection"),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "hrpo_projection child failed" in proc.stderr and "no-model" in proc.stderr


def test_decoding_bench(tmp_path):
    out = run_bench("decoding", "--model", "tiny-qwen2", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                    "--device", "cpu", "--json", str(tmp_path / "r.json"))
    assert (tmp_path / "r.json").exists() and out.strip()
    import json

    from bench.decoding import MODES

    assert set(json.loads((tmp_path / "r.json").read_text())["runs"]["4"]["median"]) == set(MODES)
    assert "embedding+top64+gumbel" in MODES and "projection+gaussian" in MODES


def test_latent_stats_bench(tmp_path):
    out = run_bench("latent_stats", "--model", "tiny-qwen2", "--new-tokens", "4", "--device", "cpu",
                    "--json", str(tmp_path / "r.json"))
    assert (tmp_path / "r.json").exists() and out.strip()


def test_latent_cost_bench(tmp_path):
    out = run_bench("latent_cost", "--model", "tiny-qwen2", "--steps", "4", "--batch", "2", "--repeats", "2",
                    "--json", str(tmp_path / "r.json"))
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert {"lm_head", "full_latent", "top5_latent"} <= set(result["ms_per_step"]) and out.strip()
    assert result["topk"]["5"]["left_out_mass_median"] > 0


def test_marker_bench(tmp_path):
    out = run_bench("marker", "--length", "16", "--batch", "2", "--json", str(tmp_path / "r.json"))
    assert (tmp_path / "r.json").exists() and out.strip()


def test_plot_run_command(tmp_path):
    import json

    history = [{"step": s, "reward": s / 10, "kl": 0.01 * s} for s in range(1, 4)]
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    script = REPO / "scripts" / "plot_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--out", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.suffix for p in (tmp_path / "plots").iterdir()] == [".png"]
    assert "reward per step (3 steps): 0.10 0.20 0.30" in proc.stdout


def test_replay_precision_bench(tmp_path):
    out = run_bench("replay_precision", "--model", "tiny", "--new-tokens", "6", "--json", str(tmp_path / "r.json"))
    import json

    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results["fp32"]["max"] < 1e-4 and "bfloat16, same autocast" in out


@pytest.mark.slow
def test_unsloth_gpu_bench_dry_run_on_cpu(tmp_path):
    """On CPU unsloth has no fast paths, so that one check fails by design; every other must pass."""
    import json

    proc = subprocess.run(bench_command("unsloth_gpu", "--device", "cpu", "--new-tokens", "4", "--json",
                                        str(tmp_path / "r.json")), capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert (tmp_path / "r.json").exists(), proc.stderr[-4000:]
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert checks.pop("fast paths in place") is False
    assert all(checks.values()), checks