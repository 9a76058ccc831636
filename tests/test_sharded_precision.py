"""The thinking modules run in float32 under sharded bf16 mixed precision (docs/design.md:
the thinking modules are float32 in every backend; docs/scaling.md, "Mixed precision").

FSDP2: accelerate's bf16 MixedPrecisionPolicy cast every parameter of the root unit, the
thinking modules included, to bf16 for the forward (Lambda 6.70 seen as 6.6875, a step from
9.03 to 9.029 not seen at all). ``hrpo.sharding`` shards them as their own float32 unit.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from testing import module_env
from testing.processes import free_port, run_child
from testing.training import save_training_workspace

REPO = Path(__file__).resolve().parent.parent


def assert_forward_saw_the_float32_masters(record: dict, when: str) -> None:
    """Each thinking module's forward read its parameters in float32, with the master's values
    (the all-gather copies them: equal exactly)."""
    seen, master = record[when]["seen"], record[when]["master"]
    assert sorted(seen) == sorted(master) == record["modules"]
    for module in sorted(record["modules"], key=lambda m: m != record["lambda_module"]):  # Lambda first
        for name, got in seen[module].items():
            want = master[module][name]
            assert want["dtype"] == "float32", (module, name, want)
            assert got["dtype"] == "float32" and got["first"] == want["first"], (
                f"rank {record['rank']}, {when} the step: {module}.{name}'s forward read {got['dtype']} "
                f"{got['first']}, the float32 master holds {want['first']}")


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_runs_the_thinking_modules_in_float32(tmp_path):
    """2 gloo processes: the training loader's model (bf16 weights, LoRA, float32 thinking copies,
    the embedding_plus_projection source) sharded as the trainer and accelerate's FSDP2 path shard
    it under configs/fsdp.yaml (bf16). The decoder layers compute in bf16; the thinking modules'
    forward reads float32, the master values exactly, before and after an AdamW step; synced
    sampling where one rank finishes after one token and the other after 12 enters the same
    collectives on both (the thinking unit), then one rank alone applies a thinking module outside a
    forward (as the trainer's metrics do) without a collective, and sampling forms the
    embedding-method latent between
    forwards from the whole embedding matrix (accelerate's own embedding unit resharded it:
    "got mixed torch.Tensor and DTensor")."""
    from testing.fsdp2_precision import LAMBDA_PROBE, MAX_NEW_TOKENS

    workspace = save_training_workspace(tmp_path / "workspace", problems=8)
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "testing.fsdp2_precision", str(workspace), str(out)]
    run_child(argv, timeout=300, what="torchrun of 2 FSDP2 bf16 processes", cwd=REPO,
              env=module_env(OMP_NUM_THREADS="1"))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["completion_length"] == 1 and ranks[1]["completion_length"] == MAX_NEW_TOKENS
    for record in ranks:
        assert record["world"] == 2 and record["mixed_precision"] == "bf16"
        assert record["source"] == "embedding_plus_projection"
        assert record["layer_dtype"] == "bfloat16"  # the policy is in force for the rest of the model
        assert len(record["modules"]) == 4  # the gates, Lambda and the projection: PEFT's trained copies
        assert all(".modules_to_save.default" in m for m in record["modules"])
        assert_forward_saw_the_float32_masters(record, "before")
        assert_forward_saw_the_float32_masters(record, "after")
        lam = record["lambda_module"]
        before = record["before"]["seen"][lam]["Lambda"]["first"][:2]
        after = record["after"]["seen"][lam]["Lambda"]["first"][:2]
        assert before == pytest.approx(list(LAMBDA_PROBE), abs=1e-6)  # bf16 would read 6.6875 and 9.0
        steps = [a - b for a, b in zip(after, before)]
        # AdamW's first step moves each entry by lr (1e-3) against its gradient's sign
        assert all(abs(abs(s) - 1e-3) <= 1e-5 for s in steps), steps
    print(f"Lambda[:2] in the forward: {ranks[0]['before']['seen'][lam]['Lambda']['first'][:2]} -> "
          f"{ranks[0]['after']['seen'][lam]['Lambda']['first'][:2]} after one AdamW step")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="accelerate runs FSDP only on an accelerator (on CPU it falls back to DDP): needs CUDA")
def test_fsdp_config_trains_with_float32_thinking_modules_on_a_gpu(tmp_path):
    """The real thing: `accelerate launch --config_file configs/fsdp.yaml` (FSDP2, bf16), one
    process, one training step; each thinking module's forward in the step read float32."""
    from testing.training import tiny_training_argv

    workspace = save_training_workspace(tmp_path / "workspace", problems=8)
    record = tmp_path / "record"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "fsdp.yaml"),
            "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "testing.run_training",
            "--record", str(record), "--",
            *tiny_training_argv(workspace, tmp_path / "out", "--backend", "transformers",
                                "--thinking_latent_source", "projection")]
    run_child(argv, timeout=600, what="accelerate launch of FSDP2 bf16 training", cwd=REPO,
              env=module_env(PYTHONUNBUFFERED="1"))
    step = torch.load(record / "rank0-step1.pt", weights_only=False)
    assert step["distributed_type"] == "DistributedType.FSDP", step["distributed_type"]
    forward = step["thinking_forward"]
    assert len(forward) == 4, forward
    dtypes = {f"{module}.{name}": p["dtype"] for module, params in forward.items() for name, p in params.items()}
    assert set(dtypes.values()) == {"float32"}, dtypes


@pytest.mark.parametrize("config, mode", [({"bf16": {"enabled": True}, "fp16": {"enabled": False}}, "bf16"),
                                          ({"fp16": {"enabled": "true"}}, "fp16"),
                                          ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, None)])
def test_deepspeed_in_half_precision_is_named_with_what_it_does_to_the_thinking_modules(config, mode):
    """DeepSpeed's bf16/fp16 mode casts every parameter (no setting keeps one in float32):
    the trainer's preparation warns, naming the mode; in fp32 it says nothing. Nothing is sharded."""
    import warnings
    from types import SimpleNamespace

    from hrpo.sharding import keep_thinking_modules_float32
    from testing.tiny import tiny_model

    model = tiny_model("qwen2", thinking_latent_source="projection")
    accelerator = SimpleNamespace(is_fsdp2=False, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert keep_thinking_modules_float32(accelerator, model) == []
    messages = [str(w.message) for w in caught if "DeepSpeed" in str(w.message)]
    if mode is None:
        assert messages == []
    else:
        assert len(messages) == 1 and f"DeepSpeed's {mode} mode casts every parameter to {mode}" in messages[0]
        assert "thinking modules" in messages[0] and "docs/scaling.md" in messages[0]
