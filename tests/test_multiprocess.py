"""A training run in two processes (`accelerate launch`, DDP over gloo on CPU), on the tiny model.

The `projection` latent source (all four thinking modules). Every thinking module takes part
in every replay forward, as DDP with find_unused_parameters=False needs; the other sources
under DDP: tests/test_opt_in.py."""
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo import run as hrpo_run
from hrpo.settings_parser import parse_settings
from testing import module_env
from testing.processes import free_port, run_child
from testing.training import length_reward, module_of, save_training_workspace

REPO = Path(__file__).resolve().parent.parent
STEPS = 2


def flags(root: Path, out: Path, accumulation: int = 2) -> list[str]:
    return ["--model_name", str(root / "model"), "--dataset_path", str(root / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", str(accumulation), "--group_size", "4",
            "--max_completion_length", "10", "--max_prompt_length", "512", "--lora_rank", "4", "--lr", "1e-2",
            "--lr_residual_gate", "1e-2", "--lr_residual_Lambda", "1e-2", "--lr_thinking_projection", "1e-2",
            "--warmup_ratio", "0", "--save_steps", str(STEPS), "--thinking_latent_source", "projection"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Two processes, 2 optimizer steps, each rank recording what the tests compare."""
    root = save_training_workspace(tmp_path_factory.mktemp("ddp"), problems=32)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "ddp_cpu.yaml"), "--main_process_port", str(free_port())]
    argv = [*accelerate, "-m", "testing.run_training", "--record", str(root / "record"), "--",
            *flags(root, root / "out")]
    run_child(argv, timeout=600, what="accelerate launch of 2 training processes", cwd=root,
              env=module_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    records = {(rank, step): torch.load(root / "record" / f"rank{rank}-step{step}.pt", weights_only=False)
               for rank in (0, 1) for step in range(1, STEPS + 1)}
    return root, records


@pytest.mark.slow
def test_two_ranks_stay_on_policy_in_lockstep_on_different_prompts(ddp):
    root, records = ddp
    previous = None
    for step in range(1, STEPS + 1):
        r0, r1 = records[0, step], records[1, step]
        assert r0["world_size"] == r1["world_size"] == 2
        for rank, record in ((0, r0), (1, r1)):  # each rank's replay reproduces its own sampling
            diffs = record["replay_logprob_diffs"]
            assert len(diffs) == 2 and max(diffs) <= 1e-4, (rank, step, diffs)  # 2 micro-batches
            assert len(record["generations"]) == 1 and record["generations"][0]["thinking_mask"].any()
        params0, params1 = r0["params"], r1["params"]
        assert params0.keys() == params1.keys()
        assert {module_of(n) for n in params0} == set(THINKING_MODULES) | {"lora"}
        # each rank steps its own copy from the all-reduced gradients: equal up to rounding
        unequal = [n for n in params0 if not torch.allclose(params0[n], params1[n], rtol=0, atol=1e-6)]
        assert not unequal, f"step {step}: ranks differ in {unequal[:5]}"
        assert r0["grads"].keys() == params0.keys()  # every trainable parameter had a gradient
        assert not set(r0["prompts"]) & set(r1["prompts"]), f"step {step}: the ranks sampled the same prompts"
        if previous is not None:
            moved = {module_of(n) for n in params0 if not torch.equal(previous[n], params0[n])}
            assert moved == set(THINKING_MODULES) | {"lora"}, moved
        previous = params0


@pytest.mark.slow
def test_the_two_process_checkpoint_reproduces_the_trained_logits_in_one_process(ddp):
    from hrpo.checkpoint import incomplete_reason, load_checkpoint

    root, records = ddp
    checkpoint = root / "out" / f"checkpoint-{STEPS}"
    assert incomplete_reason(checkpoint) is None
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    model, _ = load_checkpoint(checkpoint)
    loaded = dict(model.named_parameters())
    trained = records[0, STEPS]["params"]
    assert all(torch.equal(loaded[n], p) for n, p in trained.items())
    probe = torch.load(root / "record" / "rank0-logits.pt", weights_only=False)
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.load(root / "record" / "rank1-logits.pt", weights_only=False)["logits"],
                               probe["logits"], rtol=0, atol=1e-5)  # both ranks ended with the same model


def merged_rollouts(generations: list[dict], pad_id: int) -> dict:
    """Several ranks' generate() outputs as one batch: prompts left-padded and completions
    right-padded to the longest (zeros and the pad id there, as generate() writes them)."""
    prompt_len = max(g["prompt_mask"].shape[1] for g in generations)
    completion_len = max(g["sequences"].shape[1] - g["prompt_mask"].shape[1] for g in generations)
    merged = {}
    for key, value in generations[0].items():
        if not isinstance(value, torch.Tensor):
            merged[key] = value
            continue
        parts = []
        for g in generations:
            tensor, own_prompt = g[key], g["prompt_mask"].shape[1]
            left = prompt_len - own_prompt
            right = 0 if key == "prompt_mask" else completion_len - (tensor.shape[1] - own_prompt)
            fill = pad_id if key == "sequences" else 0
            shape = list(tensor.shape)
            parts.append(torch.cat([torch.full([shape[0], left, *shape[2:]], fill, dtype=tensor.dtype), tensor,
                                    torch.full([shape[0], right, *shape[2:]], fill, dtype=tensor.dtype)], dim=1))
        merged[key] = torch.cat(parts)
    return merged


@pytest.mark.slow
def test_accumulation_over_two_ranks_gives_one_processs_update_on_the_same_rollouts(ddp, tmp_path):
    """One process, accumulating over as many micro-batches as both ranks together, fed the
    rollouts the two ranks sampled at step 1: the same gradient and the same update."""
    from transformers import TrainerCallback
    from transformers.hybrid_thinking.generation import HybridGenerateOutput

    root, records = ddp
    args = parse_settings(flags(root, tmp_path / "one", accumulation=4) + ["--max_steps", "1"])
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    pad_id = trainer.processing_class.pad_token_id
    rollouts = merged_rollouts([records[0, 1]["generations"][0], records[1, 1]["generations"][0]], pad_id)
    prompt_mask = rollouts.pop("prompt_mask")
    fed = []

    def recorded_generate(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # the one process samples the prompts the two ranks sampled, rank 0's first
        assert torch.equal(input_ids, rollouts["sequences"][:, :prompt_mask.shape[1]] * prompt_mask)
        assert torch.equal(kwargs["attention_mask"], prompt_mask)
        fed.append(True)
        return HybridGenerateOutput(**rollouts)

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generate = recorded_generate
    seen = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kwargs):
            seen["grads"] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                             if p.requires_grad and p.grad is not None}

    trainer.add_callback(Record())
    trainer.train()
    assert fed == [True]
    assert len(trainer.replay_logprob_diffs) == 4 and max(trainer.replay_logprob_diffs) <= 1e-4
    want_grads, want_params = records[0, 1]["grads"], records[0, 1]["params"]
    assert seen["grads"].keys() == want_grads.keys()
    worst_grad = max(((seen["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                     for n, g in want_grads.items())
    params = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    worst_param = max((params[n] - p).abs().max().item() for n, p in want_params.items())
    print(f"one process vs two ranks, step 1: gradient max rel. diff {worst_grad:.1e}, "
          f"parameter max abs diff {worst_param:.1e}")
    # The gradients differ by float32 summation order only. Adam's first step is lr * g / (|g| + eps):
    # where |g| is near eps (1e-8) a gradient difference of 1e-13 moves the update by lr * 1e-5.
    assert worst_grad <= 1e-5 and worst_param <= 1e-3 * args.training.learning_rate


@pytest.mark.slow
def test_synced_sampling_steps_every_rank_until_all_are_done(tmp_path):
    """ZeRO-3 / FSDP path, on CPU: generate(synced_gpus=True) in 2 processes whose rows finish at
    different steps. Both ranks make the same number of forwards (each forward is a collective
    when parameters are sharded), and the finished rank's extra forwards change nothing: each
    rank's output equals its generation alone."""
    import json

    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "testing.synced_sampling", str(tmp_path)]
    run_child(argv, timeout=300, what="torchrun of 2 synced-sampling processes", cwd=REPO,
              env={**os.environ, "OMP_NUM_THREADS": "1"})
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["completion_length"] < r1["completion_length"] == 12  # rank 0 finished first
    assert r0["forwards_alone"] < r0["forwards_synced"] == r1["forwards_synced"] == r1["forwards_alone"]
    assert r0["synced_equals_alone"] and r1["synced_equals_alone"]
    assert r0["full_tensor_of_a_shard"] and r1["full_tensor_of_a_shard"]
    # which thinking modules each forward ran, per rank: the finished rank's extra forwards run none
    # of them (no thinking inputs), so a unit of their own must not be gathered by their own
    # pre-forward during generation (docs/scaling.md: TRL gathers the whole model for generation
    # under ZeRO-3; under FSDP2 hrpo.sharding gathers the thinking unit at every base forward,
    # tests/test_sharded_precision.py)
    extra = r0["thinking_modules_per_forward"][r0["forwards_alone"]:]
    print(f"forwards: rank 0 {r0['forwards_alone']} alone, {r0['forwards_synced']} synced; rank 1 "
          f"{r1['forwards_synced']}; thinking modules in rank 0's extra forwards: {extra}; in rank 1's "
          f"last: {r1['thinking_modules_per_forward'][-1]}")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["projection embedding", "embedding_plus_projection unit"])
def test_fsdp2_sharded_step_matches_one_process(tmp_path, source):
    """FSDP2 at the model level (fully_shard over gloo, 2 processes): hybrid sampling with
    synced_gpus gives the unsharded model's tokens; the replay of the recorded thinking inputs
    is on-policy; the loss, backward and AdamW step give the gradients and parameters of one
    process over both ranks' rollouts; a full state dict gathers the thinking modules whole."""
    import json

    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "testing.fsdp2_step", str(tmp_path), *source.split()]
    run_child(argv, timeout=300, what="torchrun of 2 FSDP2 processes", cwd=REPO,
              env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and r["tokens_equal_unsharded"] and r["thinking_positions"] > 0
        assert r["replay_gap"] <= 1e-4
        assert r["grad_names_equal"] and r["grad_norm"] > 0
        assert r["grad_max_rel_diff"] <= 1e-5 and r["param_max_abs_diff"] <= 1e-6
    assert ranks[0]["saved_whole"] and ranks[0]["saved_equals_trained"]
    assert len(ranks[0]["thinking_parameters"]) == 6


@pytest.mark.parametrize("name, kind, extra", [
    ("ddp", "MULTI_GPU", {}), ("ddp_cpu", "MULTI_GPU", {}),
    ("zero2", "DEEPSPEED", {"zero_stage": 2}), ("zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    ("fsdp", "FSDP", {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"})])
def test_each_accelerate_config_reads_as_its_kind(name, kind, extra):
    """The configs are read by accelerate's own loader; the sharded ones leave the optimizer,
    the accumulation and the clipping to a training run (hrpo/optimizer.py's six groups)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / f"{name}.yaml"))
    assert str(config.distributed_type) == f"DistributedType.{kind}"
    settings = config.deepspeed_config or config.fsdp_config or {}
    assert extra.items() <= settings.items()
    if kind == "DEEPSPEED":
        assert settings["gradient_accumulation_steps"] == settings["gradient_clipping"] == "auto"
        assert "deepspeed_config_file" not in settings  # no optimizer section: the trainer's optimizer
