"""HRPO through unsloth's GRPO rewrite (PatchFastRL's UnslothGRPOTrainer) on the CPU.

On CUDA, `import unsloth` replaces trl.GRPOTrainer by a generated UnslothGRPOTrainer whose
loss makes its own forwards over left-packed, sequence-packed or padded chunks of the
rollouts. testing/unsloth_grpo_checks.py runs one real HRPO step through it (in a subprocess:
the patch is process-wide) with unsloth's fast forward paths and PyTorch stand-ins for
the Triton kernels, and records every forward of the base model.
"""
import json
import subprocess
import sys

import pytest
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from testing import module_env

# float32 throughout (the checks switch off the loss's autocast): replay and sampling agree to
# ~5e-7; the negative control (the same forwards on discrete tokens) is off by more than 1e-2.
REPLAY_TOL = 1e-5
DISCRETE_MIN = 1e-2


@pytest.fixture(scope="module", params=[("llama", "projection", "1"), ("qwen2", "embedding_plus_projection", "0"),
                                        ("llama", "projection+gaussian", "1")],
                ids=["llama-projection-packed", "qwen2-embedding_plus_projection-padded",
                     "llama-projection-gaussian-packed"])
def run(request, tmp_path_factory):
    arch, source, packing = request.param
    out = tmp_path_factory.mktemp(f"ugrpo-{arch}") / "run.json"
    proc = subprocess.run([sys.executable, "-m", "testing.unsloth_grpo_checks", arch, source, packing, str(out)],
                          cwd=out.parent, env=module_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return request.param, json.loads(out.read_text())


def test_hrpo_trainer_subclasses_the_unsloth_rewrite(run):
    _, result = run
    ours = ["HRPOTrainer", "HybridThinkingTrainerMixin", "RunTrainerMixin", "HeldOutEvaluation", "HRPOModelCardMixin"]
    assert result["mro"][:6] == [*ours, "UnslothGRPOTrainer"]  # our classes, then unsloth's rewrite


def test_every_policy_scoring_forward_gets_the_thinking_inputs(run):
    (_, _, packing), result = run
    forwards = result["forwards"]
    scoring = [f for f in forwards if f["grad"]]
    assert len(scoring) == 2, forwards  # one per gradient-accumulation micro-batch
    assert all(f["thinking"] and not f["reference"] for f in scoring)
    assert all(f["packed"] == (packing == "1") for f in scoring)
    # the only policy forward without thinking inputs is generation's prefill (the prompts only)
    plain_policy = [i for i, f in enumerate(forwards) if not f["thinking"] and not f["reference"]]
    assert plain_policy == [0] and not forwards[0]["grad"], forwards


def test_reference_pass_stays_on_discrete_tokens(run):
    _, result = run
    reference = [f for f in result["forwards"] if f["reference"]]
    assert reference and not any(f["thinking"] for f in reference)


def test_replay_in_unsloths_layouts_reproduces_sampling(run):
    _, result = run
    checked = [f for f in result["forwards"] if f.get("compared")]
    assert sum(f["compared"] for f in checked if f["grad"]) >= 40
    for f in checked:
        assert f["max_diff"] <= REPLAY_TOL, f
        assert f["discrete_max_diff"] >= DISCRETE_MIN, f  # negative control


def test_step_trains_every_thinking_module_and_logs_hrpo_metrics(run):
    _, result = run
    assert set(result["changed"]) >= set(THINKING_MODULES) | {"lora"}, result["changed"]
    assert all(result["grad_norms"].get(m, 0) > 0 for m in THINKING_MODULES), result["grad_norms"]
    logged = result["logged"]
    for key in ("thinking/embeds_ratio", "thinking/hidden_ratio", "thinking/positions_frac", "thinking_projection/weight_norm",
                "kl", "reward"):
        assert key in logged, key
    assert 0.9 < logged["thinking/embeds_ratio"] < 1.0
