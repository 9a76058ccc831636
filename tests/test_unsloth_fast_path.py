"""unsloth's fast forward paths carry HRPO exactly like the transformers fork.

unsloth swaps LlamaModel / LlamaForCausalLM (and Qwen2's) forwards for its own fast
paths. Our series makes those paths take the thinking inputs. Here they run on the CPU
with PyTorch stand-ins for unsloth's Triton RMSNorm and RoPE kernels (testing/unsloth_cpu.py),
and every number is compared with the transformers fork's own forward on the same weights
(testing/unsloth_fast_checks.py, in a subprocess because unsloth patches classes
process-wide). The Triton kernels themselves are checked on a GPU by gpu_checks.sh.
"""
import json
import subprocess
import sys

import pytest

from testing import module_env
from testing.unsloth_fast_checks import VARIANTS, variant_source

ARCHS = ["llama", "qwen2"]
SOURCES = list(VARIANTS)  # the three sources, and two with top-k and noise
FLOAT32_TOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def checks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fast-{request.param}") / "checks.json"
    proc = subprocess.run([sys.executable, "-m", "testing.unsloth_fast_checks", request.param, str(out)],
                          cwd=out.parent, env=module_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return request.param, json.loads(out.read_text())


def test_unsloth_fast_paths_are_in_place(checks):
    arch, results = checks
    for source in SOURCES:
        assert results[source]["forwards"] == ["_CausalLM_fast_forward", "LlamaModel_fast_forward"], source


def test_plain_logits_match_the_fork(checks):
    _, results = checks
    for source in SOURCES:
        assert results[source]["plain_logits"] <= FLOAT32_TOL, source


def test_replay_through_the_fast_forward_matches_the_fork(checks):
    _, results = checks
    for source in SOURCES:
        r = results[source]
        assert r["thinking_positions"] > 0, "the rollouts must contain thinking positions"
        assert r["replay_logprobs"] <= FLOAT32_TOL, source
        assert r["gate_ratio"] <= FLOAT32_TOL, source


def test_hybrid_sampling_through_unsloth_generate_matches_the_fork(checks):
    _, results = checks
    for source in SOURCES:
        r = results[source]
        assert r["same_tokens"] and r["same_thinking_mask"], source
        assert r["sampling_logprobs"] <= FLOAT32_TOL, source
        assert r["fast_gate_ratio_recorded"] <= FLOAT32_TOL, source
        # the latent sources recorded while sampling: what each source needs, nothing missing
        if variant_source(source) != "projection":
            assert r["thinking_latents"] is not None and r["thinking_latents"] <= FLOAT32_TOL, source
        if variant_source(source) != "embedding":
            assert r["thinking_hidden"] is not None and r["thinking_hidden"] <= FLOAT32_TOL, source
        if "gaussian" in source:
            assert r["thinking_noise"] is not None and r["thinking_noise"] <= FLOAT32_TOL, source


def test_fast_replay_reproduces_fast_sampling(checks):
    _, results = checks
    for source in SOURCES:
        r = results[source]
        assert r["fast_replay_vs_sampling"] <= 1e-4, source
        # negative control: without the thinking inputs the replay scores other distributions
        assert r["fast_discrete_replay_vs_sampling"] > 1e-3, source


def test_gradients_through_the_fast_training_forward_match_the_fork(checks):
    _, results = checks
    for source in SOURCES:
        names = {name.split(".")[0] for name in results[source]["grads"]}
        assert ("thinking_projection" in names) == (variant_source(source) != "embedding"), (source, names)  # built for the source
        for name, g in results[source]["grads"].items():
            assert "norm" in g, (source, name, g)
            assert g["norm"] > 0, (source, name)
            assert g["max_rel"] <= 1e-4, (source, name, g)
