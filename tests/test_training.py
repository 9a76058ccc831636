"""GRPO training through the training code path (hrpo.run) on a tiny model (CPU, unsloth's CPU mode)."""
import copy
import json
import types
from pathlib import Path

import pytest
import torch
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo import settings_parser as hrpo_settings
from hrpo.errors import UsageError
from hrpo import evaluate as evaluation_cli
from hrpo import train as hrpo_train
from hrpo import loading, resume
from hrpo import run as hrpo_run
from hrpo.held_out import result_file_name
from hrpo.checkpoint import latest_complete_checkpoint, mark_complete, write_run_settings
from hrpo.data import write_jsonl
from hrpo.tasks.arith import make_problems
from hrpo.optimizer import parameter_groups, patch_trainer_optimizer
from testing.tiny import PLAIN_CHAT_TEMPLATE, encode_prompts, tiny_model, tiny_tokenizer
from testing.training import (length_reward, module_of, save_training_workspace, tiny_training_args, tiny_training_argv,
                              trainable)

REPO = Path(__file__).resolve().parent.parent
COSINE = "thinking_projection/cosine_to_embedding_latent"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_training_workspace(tmp_path_factory.mktemp("train"))


# ---------------------------------------------------------------- the optimizer

def test_six_parameter_groups_with_their_rates_and_undecayed_projection_norm(workspace):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", hidden_size=32, thinking_projection_layernorm=True,
                                      thinking_latent_source="projection"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=list(THINKING_MODULES)))
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(workspace / "opt"), learning_rate=5e-6, weight_decay=0.1,
                             optim="adamw_torch", report_to="none", use_cpu=True)
    trainer = types.SimpleNamespace(args=args, model=model)
    optimizer = patch_trainer_optimizer(trainer, 1e-4, 1e-3, 2e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["main_decay", "main_no_decay", "gate", "lambda", "projection", "projection_no_decay"]
    expected = {"main_decay": (5e-6, 0.1), "main_no_decay": (5e-6, 0.0), "gate": (1e-4, 0.1),
                "lambda": (1e-3, 0.0), "projection": (2e-4, 0.1), "projection_no_decay": (2e-4, 0.0)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == expected
    by_id = {id(p): n for n, p in trainable(model).items()}
    seen = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(by_id.values())  # every trainable parameter exactly once, none missing
    names = {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert all("lora_" in n for n in names["main_decay"])
    assert names["gate"] and all("thinking_residual_gate" in n for n in names["gate"])
    assert names["lambda"] and all("thinking_residual_Lambda" in n for n in names["lambda"])
    # the projection's matrix decays, its LayerNorm's weight and bias do not
    assert {n.split("thinking_projection.")[-1] for n in names["projection"]} == {"modules_to_save.default.weight"}
    assert {n.split("thinking_projection.")[-1] for n in names["projection_no_decay"]} == {
        "modules_to_save.default.norm.weight", "modules_to_save.default.norm.bias"}
    assert parameter_groups(model, 1, 0, 1, 1, 1)[1]["params"] == []  # LoRA has nothing undecayed


# ---------------------------------------------------------------- one real step

class GradientRecorder:
    def __init__(self):
        self.norms = {}

    def callback(self, trainer):
        from transformers import TrainerCallback

        recorder = self

        class Record(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                for name, p in trainable(trainer.model).items():
                    if p.grad is not None:
                        key = module_of(name)
                        recorder.norms[key] = recorder.norms.get(key, 0.0) + p.grad.float().norm().item()

        return Record()


@pytest.mark.parametrize("source, backend, checkpointing", [
    ("projection", "auto", "off"), ("embedding_plus_projection", "auto", "off"),
    ("projection", "transformers", "off"), ("projection", "transformers", "on")])
def test_one_training_step_trains_every_thinking_module_and_lora(workspace, tmp_path, source, backend,
                                                                 checkpointing):
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", source, "--backend", backend,
                    "--gradient_checkpointing", checkpointing)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    recorder = GradientRecorder()
    trainer.add_callback(recorder.callback(trainer))
    before = {n: p.detach().clone() for n, p in trainable(trainer.model).items()}
    trainer.train()
    after = trainable(trainer.model)
    changed = {module_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert changed >= set(THINKING_MODULES) | {"lora"}, changed
    assert all(recorder.norms.get(m, 0) > 0 for m in THINKING_MODULES), recorder.norms
    # the replay inside the trainer reproduced the rollout's sampling log-probs, for each
    # of the gradient-accumulation micro-batches (on-policy: no update in between)
    assert len(trainer.replay_logprob_diffs) == 2
    assert max(trainer.replay_logprob_diffs) <= 1e-4
    logged = trainer.state.log_history[0]
    for key in ("reward", "kl", "thinking/embeds_ratio", "thinking/hidden_ratio", "thinking_projection/weight_norm",
                "thinking_projection/drift_abs", "completions/mean_length"):
        assert key in logged, key
    from hrpo.metric_names import RENAMED_METRICS

    assert not set(RENAMED_METRICS) & set(logged)  # every HRPO metric under a prefix
    assert logged["kl"] > 0  # policy (hybrid) vs reference (discrete tokens only)
    # relative drift only where the projection does not start at zero; sampled before any update,
    # the step's rollouts saw no drift at all
    assert ("thinking_projection/drift" in logged) == (source == "projection")
    assert logged["thinking_projection/drift_abs"] == 0.0
    if source == "embedding_plus_projection":  # the zero projection adds nothing: the fed latent is HRPO's
        assert logged[COSINE] == pytest.approx(1.0, abs=1e-5)


def test_the_six_groups_survive_an_engine_that_makes_the_optimizer_again(workspace, tmp_path):
    """DeepSpeed's init sets trainer.optimizer = None and calls create_optimizer(); the trainer's
    default groups would give the thinking modules the main rate and decay Lambda."""
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    before = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in trainer.optimizer.param_groups}
    trainer.optimizer = None  # what transformers.integrations.deepspeed.deepspeed_init does
    optimizer = trainer.create_optimizer()
    after = {g.get("name"): (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    assert after == before
    assert after["lambda"][:2] == (args.training.lr_residual_Lambda, 0.0)


def test_checkpoint_reloads_and_reproduces_logits(workspace, tmp_path):
    from hrpo.checkpoint import load_checkpoint

    args = tiny_training_args(workspace, tmp_path / "out")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "config.json").exists()
    model, tokenizer = load_checkpoint(checkpoint)
    assert model.config.thinking_latent_source == "projection"
    live = trainer.model.eval()
    enc = encode_prompts(tokenizer, ["1+2=?", "abc"])
    thinking = {"thinking_mask": enc.attention_mask.bool(),
                "thinking_hidden": torch.randn(*enc.input_ids.shape, 64)}
    with torch.no_grad():
        for extra in ({}, thinking):
            expected = live(**enc, **extra).logits
            got = model(**enc, **extra).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(live(**enc).logits, live(**enc, **thinking).logits)


def test_resume_continues_step_counter_and_optimizer_state(workspace, tmp_path):
    out = tmp_path / "out"
    assert hrpo_train.main(tiny_training_argv(workspace, out)) == 0
    saved = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=False)

    args = tiny_training_args(workspace, out, "--resume")
    args.training.max_steps = 2
    trainer = hrpo_run.build_trainer(args)
    seen = {}
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if "step" not in seen:
                seen["step"] = state.global_step
                seen["state"] = copy.deepcopy(trainer.optimizer.state_dict()["state"])  # live tensors

    trainer.add_callback(Probe())
    trainer.train(resume_from_checkpoint=str(latest_complete_checkpoint(out)[0]))
    assert seen["step"] == 1 and trainer.state.global_step == 2
    for key, value in saved["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(seen["state"][key][field], value[field])


def cli_argv(workspace, out, *extra):
    return tiny_training_argv(workspace, out, *extra)


# ---------------------------------------------------------------- bad input

def run_main(capsys, argv):
    code = hrpo_train.main(argv)
    return code, capsys.readouterr().err


def test_existing_output_dir_without_resume_is_a_clear_error(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    code, err = run_main(capsys, cli_argv(workspace, out))
    assert code == 2 and "--output_dir" in err and "--resume" in err
    assert (out / "something").exists()
    code, err = run_main(capsys, cli_argv(workspace, tmp_path / "empty") + ["--resume"])
    assert code == 2 and "no complete checkpoint" in err


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q?", "answer": "#### 3"}, {"question": "r?"}], "row 1"),
    ([{"question": "q?", "answer": "the answer is three #### three"}], "no number after '####'"),
    ([], "empty"),
])
def test_bad_dataset_is_named_before_training(workspace, tmp_path, capsys, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = cli_argv(workspace, tmp_path / "out")
    argv[argv.index("--dataset_path") + 1] = str(data)
    code, err = run_main(capsys, argv)
    assert code == 2 and message in err and "bad.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_group_size_and_model_path_errors(workspace, tmp_path, capsys):
    argv = cli_argv(workspace, tmp_path / "out")
    bad_group = argv + ["--group_size", "3"]
    code, err = run_main(capsys, bad_group)
    assert code == 2 and "num_generations (3)" in err and "8" in err
    missing = list(argv)
    missing[missing.index("--model_name") + 1] = str(tmp_path / "no-such-model")
    code, err = run_main(capsys, missing)
    assert code == 2 and "no-such-model" in err and "no such model folder" in err
    bad_range = argv + ["--residual_r_min", "0.999", "--residual_r_max", "0.99"]
    code, err = run_main(capsys, bad_range)
    assert code == 2 and "thinking_residual_r_min" in err
    conflict = argv + ["--thinking_latent_source", "embedding_plus_projection", "--thinking_projection_layernorm"]
    code, err = run_main(capsys, conflict)
    assert code == 2 and "layernorm" in err


# ---------------------------------------------------------------- evaluation and plots

def test_eval_writes_results_next_to_checkpoint(workspace, tmp_path, capsys):
    args = tiny_training_args(workspace, tmp_path / "out")
    hrpo_run.build_trainer(args, reward_funcs=[length_reward]).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    write_jsonl(make_problems(5, seed=3, difficulty=3), tmp_path / "test.jsonl")
    for thinking in ("on", "off"):
        code = evaluation_cli.main(["--checkpoint_path", str(checkpoint), "--dataset_path", str(tmp_path / "test.jsonl"),
                                "--split", "test", "--batch_size", "2", "--greedy", "--max_new_tokens", "8",
                                "--thinking", thinking])
        assert code == 0
        result = json.loads((checkpoint / result_file_name(str(tmp_path / "test.jsonl"), "test")).read_text())
        assert result["metrics"]["total"] == 5 and result["metrics"]["thinking"] == (thinking == "on")
        assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
        assert len(result["examples"]) == 5 and {"completion", "reference", "correct"} <= set(result["examples"][0])
    assert evaluation_cli.main(["--checkpoint_path", str(tmp_path), "--dataset_path", str(tmp_path / "test.jsonl")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    # without --dataset_path: the run trained on a single local file, which has no held-out split
    quick = ["--checkpoint_path", str(checkpoint), "--batch_size", "2", "--greedy", "--max_new_tokens", "4",
             "--num_samples", "2"]
    assert evaluation_cli.main(quick) == 2
    assert "is a single file, which has no held-out split" in " ".join(capsys.readouterr().err.split())
    assert evaluation_cli.main(quick + ["--eval_on_train_data"]) == 0
    scored = json.loads((checkpoint / result_file_name(str(workspace / "train.jsonl"), "train")).read_text())
    assert scored["metrics"]["split"] == "train" and scored["metrics"]["dataset_path"] == str(workspace / "train.jsonl")


def test_plot_command_writes_png(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run", Path(__file__).parent.parent / "scripts" / "plot_run.py")
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    history = [{"step": s, "reward": s / 10, "embeds_ratio": 0.99, "hidden_ratio": 0.1, "kl": 0.01 * s,
                "completions/mean_length": 40 + s, "thinking_projection/drift": 0.001 * s} for s in range(1, 6)]
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    assert plot_run.log_history(tmp_path)[0]["thinking/embeds_ratio"] == 0.99  # logged before the prefix
    written = plot_run.plot(tmp_path)
    assert written[0].exists() and written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_refuses_a_forward_that_ignores_the_thinking_inputs(workspace, tmp_path, monkeypatch):
    """A fast path that bypasses the fork's forward would train plain GRPO silently."""
    from transformers.hybrid_thinking.modeling import HybridThinkingMixin

    monkeypatch.setattr(HybridThinkingMixin, "mix_thinking_inputs",
                        lambda self, embeds, *a, **k: (embeds, None))
    with pytest.raises(RuntimeError, match="does not apply the HRPO thinking inputs"):
        hrpo_run.build_trainer(tiny_training_args(workspace, tmp_path / "out"))


def test_long_prompts_are_left_out_and_all_too_long_is_an_error(workspace, tmp_path, capsys):
    from hrpo.data import DataError
    from hrpo.tasks import get_task

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    task = get_task("gsm8k")
    dataset = task.with_prompts(task.load(str(workspace / "train.jsonl"), "train"))
    lengths = [len(tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False).input_ids) for p in dataset["prompt"]]
    cut = sorted(lengths)[len(lengths) // 2]
    args = tiny_training_args(workspace, tmp_path / "out", "--max_prompt_length", str(cut))
    kept = hrpo_run.filter_long_prompts(args, dataset, tokenizer)
    assert len(kept) == sum(n <= cut for n in lengths) < len(dataset)
    assert "left out" in capsys.readouterr().out
    args.training.max_prompt_length = min(lengths) - 1
    with pytest.raises(DataError, match="--max_prompt_length"):
        hrpo_run.filter_long_prompts(args, dataset, tokenizer)


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    from hrpo.data import DataError
    from hrpo.tasks.gsm8k import load_gsm8k

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="no-such-org/no-such-dataset.*local"):
        load_gsm8k("no-such-org/no-such-dataset")


def test_the_answer_marker_reaches_the_model_config_from_the_task(workspace, tmp_path, monkeypatch):
    """Thinking ends where the task reads the answer: a task whose marker is not "####"."""
    import dataclasses

    from hrpo.tasks import get_task

    task = dataclasses.replace(get_task("arith"), answer_marker="ANSWER:")
    import hrpo.tasks

    monkeypatch.setattr(hrpo.tasks, "get_task", lambda name: task)  # what parsing reads
    monkeypatch.setattr(hrpo_run, "get_task", lambda name: task)
    args = tiny_training_args(workspace, tmp_path / "out", "--task", "arith")
    assert args.thinking.answer_marker == "ANSWER:"
    model, _ = loading.load_model(args, cuda=False)
    base = model.get_base_model()
    assert base.config.answer_marker == "ANSWER:" and base.model.answer_marker == "ANSWER:"


def test_a_resumed_run_does_not_announce_new_thinking_modules(workspace, tmp_path, capsys):
    loading.load_model(tiny_training_args(workspace, tmp_path / "out"), cuda=False)
    assert "new thinking modules, trained from here" in capsys.readouterr().out
    loading.load_model(tiny_training_args(workspace, tmp_path / "out", "--resume", "latest"), cuda=False)
    out = capsys.readouterr().out
    assert "new thinking modules" not in out and "restored from the checkpoint when training starts" in out


def test_a_loader_that_drops_the_thinking_config_is_named(workspace, tmp_path):
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    model = tiny_model("qwen2", hidden_size=32)  # built with the default source, "embedding"
    with pytest.raises(UsageError, match="thinking_latent_source='embedding'.*'projection'"):
        loading.check_thinking_config(model, args)
    loading.check_thinking_config(tiny_model("qwen2", hidden_size=32, **args.thinking.to_dict()), args)


def test_transformers_backend_trains_with_trls_own_trainer_and_no_unsloth(workspace, tmp_path):
    """On CUDA, importing unsloth replaces trl.GRPOTrainer by its rewrite; the reference
    backend must not import it at all (checked in a fresh process)."""
    import subprocess
    import sys

    script = f"""
import sys
from hrpo import run as hrpo_run
from pathlib import Path
from testing.training import length_reward, tiny_training_args
args = tiny_training_args(Path({str(workspace)!r}), Path({str(tmp_path / "out")!r}), "--backend", "transformers")
trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
print("unsloth imported:", any(m == "unsloth" or m.startswith("unsloth.") for m in sys.modules))
grpo_bases = [c for c in type(trainer).__mro__ if c.__name__.endswith("GRPOTrainer") and not c.__module__.startswith("hrpo")]
print("base:", grpo_bases[0].__module__)
trainer.train()  # on CPU: TRL's Triton log-prob kernel is routed to hrpo.cpu_logprob
print("trained steps:", trainer.state.global_step)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unsloth imported: False" in proc.stdout
    assert "base: trl.trainer.grpo_trainer" in proc.stdout
    assert "trained steps: 1" in proc.stdout


def thinking_parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(m in n for m in THINKING_MODULES)}


@pytest.fixture(scope="module")
def model_without_thinking_weights(workspace):
    """The tiny model as a hub model is stored: no thinking tensors, so they are drawn at load."""
    from safetensors.torch import load_file, save_file

    folder = workspace / "plain-model"
    if not folder.exists():
        import shutil

        shutil.copytree(workspace / "model", folder)
        weights = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in weights.items() if "thinking" not in k}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_same_seed_gives_the_same_thinking_modules(workspace, model_without_thinking_weights, tmp_path, backend):
    """The thinking modules are initialised when the model is built: after the seed."""
    if backend == "auto":
        from hrpo.backend import import_unsloth

        import_unsloth(cuda=False)
    loads = {}
    for run, seed in (("a", 42), ("b", 42), ("c", 7)):
        torch.randn(17)  # the global RNG stream moves on between loads, as it does in a process
        args = tiny_training_args(workspace, tmp_path / run, "--seed", str(seed), "--backend", backend,
                        "--thinking_latent_source", "projection", "--model_name", str(model_without_thinking_weights))
        model, _ = loading.load_model(args, cuda=False)
        loads[run] = thinking_parameters(model)
    assert loads["a"] and loads["a"].keys() == loads["b"].keys() == loads["c"].keys()
    assert all(torch.equal(loads["a"][n], loads["b"][n]) for n in loads["a"])
    assert any(not torch.equal(loads["a"][n], loads["c"][n]) for n in loads["a"])


# ---------------------------------------------------------------- several stop ids

SECOND_STOP = "."


@pytest.fixture(scope="module")
def two_stop_model(workspace):
    """The tiny model whose generation config stops on two ids (as Qwen2.5 and Llama 3 do)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    folder = workspace / "two-stop-model"
    model = tiny_model("qwen2", tokenizer, hidden_size=64)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SECOND_STOP)]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def favour_token(trainer, token_id: int, bias: float) -> None:
    """Raise the model's own logit of ``token_id`` by about ``bias`` on typical hidden states (its
    lm_head row moves along their mean): the distribution sampled is the one scored, unlike a
    sequence_bias in the generation config, which the on-policy check refuses."""
    base = trainer.model.get_base_model()
    tokenizer = trainer.processing_class
    enc = tokenizer(["1+2=?\n", "12+30=?\n"], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hidden = base.model(**enc).last_hidden_state[enc.attention_mask.bool()].float()
        mean = hidden.mean(0)
        base.lm_head.weight[token_id] += (bias * mean / mean.dot(mean)).to(base.lm_head.weight.dtype)


def test_every_stop_id_ends_a_completion_in_the_replay_and_the_metrics(workspace, two_stop_model, tmp_path):
    import warnings

    args = tiny_training_args(workspace, tmp_path / "out", "--model_name", str(two_stop_model),
                    "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    second = trainer.processing_class.convert_tokens_to_ids(SECOND_STOP)
    assert second in trainer.eos_token_ids
    favour_token(trainer, second, 2.0)  # stop early on the second id, often
    recorded = []
    add = trainer.replay_index.add
    trainer.replay_index.add = lambda out, mask, **kw: (recorded.append((out, mask)), add(out, mask, **kw))[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pad" in str(w.message)], [str(w.message) for w in caught]
    (out, prompt_mask), = recorded
    completion = out.sequences[:, prompt_mask.shape[1]:]
    stops = torch.isin(completion, torch.tensor(trainer.eos_token_ids))
    first_stop = torch.where(stops.any(1), stops.int().argmax(1), completion.shape[1])
    assert (completion[torch.arange(len(completion)), first_stop.clamp(max=completion.shape[1] - 1)]
            == second).any(), "no rollout stopped on the second id: the test shows nothing"
    upto = torch.arange(completion.shape[1])[None] <= first_stop[:, None]
    thinking = out.thinking_mask[:, prompt_mask.shape[1]:] & upto
    expected = (thinking.sum() / upto.sum()).item()
    assert trainer.state.log_history[0]["thinking/positions_frac"] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- the hidden-state hand-over

def drop_last_hidden_state(monkeypatch):
    """A forward that ignores return_last_hidden_state (as one without the fork's hand-over)."""
    import transformers.hybrid_thinking.modeling as modeling

    monkeypatch.setattr(modeling, "last_position_hidden", lambda hidden_states, wanted: None)


def test_start_up_check_refuses_a_forward_without_the_hidden_state(workspace, tmp_path, monkeypatch):
    drop_last_hidden_state(monkeypatch)
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    with pytest.raises(RuntimeError, match="returned no last_hidden_state"):
        hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    embedding = tiny_training_args(workspace, tmp_path / "out2", "--thinking_latent_source", "embedding")
    hrpo_run.build_trainer(embedding, reward_funcs=[length_reward])  # needs no hidden state


def test_a_rollout_that_fell_back_to_the_embedding_method_stops_training(workspace, tmp_path, monkeypatch):
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    drop_last_hidden_state(monkeypatch)  # after the start-up check: generation falls back
    with pytest.raises(RuntimeError, match="sampled with thinking_latent_source='embedding'.*'projection'"):
        trainer.train()


# ---------------------------------------------------------------- occasional metrics


@pytest.mark.parametrize("flag, logged", [(None, [True, False]), ("0", [False, False]), ("1", [True, True])])
def test_thinking_monitor_runs_occasionally_by_default(workspace, tmp_path, flag, logged):
    extra = ["--thinking_monitor_every", flag] if flag is not None else []
    args = tiny_training_args(workspace, tmp_path / "out", "--max_steps", "2", "--thinking_latent_source", "projection", *extra)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.train()
    rows = [row for row in trainer.state.log_history if "reward" in row]
    assert [COSINE in row for row in rows] == logged


@pytest.mark.parametrize("noise", ["none", "gaussian"])
def test_cosine_metric_compares_the_embedding_latent_with_the_latent_fed(workspace, tmp_path, noise):
    """embedding_plus_projection feeds E-latent + P(h) (plus the Gaussian noise when configured):
    the metric is the cosine to that, by hand from a rollout, with a projection that has moved."""
    extra = ["--thinking_latent_noise", noise, "--thinking_latent_noise_scale", "0.5"] if noise != "none" else []
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "embedding_plus_projection",
                              "--backend", "transformers", *extra)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.train()
    base = trainer.thinking_base
    tokenizer = trainer.processing_class
    enc = tokenizer(["1+2=?\n", "3+4=?\n"], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = trainer.model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, do_sample=True,
                                     max_new_tokens=10, answer_marker="####")
    prompt_len = enc.input_ids.shape[1]
    mask = out.thinking_mask[:, prompt_len:]
    assert mask.any()
    latents, hidden = out.thinking_latents[:, prompt_len:][mask].float(), out.thinking_hidden[:, prompt_len:][mask]
    projection = dict(base.thinking_projection.named_parameters())
    assert any(p.abs().max() > 0 for n, p in projection.items() if "weight" in n)  # trained away from zero
    with torch.no_grad():
        fed = latents + base.thinking_projection.eval()(hidden).float()
    if noise == "gaussian":
        fed = fed + out.thinking_noise[:, prompt_len:][mask]
    expected = torch.nn.functional.cosine_similarity(latents, fed, dim=-1).mean().item()
    trainer._metrics["eval"].clear()
    trainer._log_thinking_metrics(out, prompt_len, "eval")
    assert trainer._metrics["eval"][COSINE] == [pytest.approx(expected, abs=1e-5)]
    assert expected < 0.9999  # the projection's part is not nothing


def test_help_says_how_often_the_thinking_monitor_runs():
    text = " ".join(hrpo_settings.settings_parser().format_help().split())
    assert "--thinking_monitor_every" in text and "every 10 x --logging_steps; 0: never" in text


def test_replay_check_is_recorded_on_the_first_iteration_only(workspace, tmp_path):
    """With num_iterations 2 the second pass over a generation batch is off-policy."""
    args = tiny_training_args(workspace, tmp_path / "out", "--max_steps", "2", "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.args.num_iterations = trainer.num_iterations = 2
    trainer.train()
    assert len(trainer.replay_logprob_diffs) == 2 and max(trainer.replay_logprob_diffs) <= 1e-4  # 2 micro-batches
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert ["thinking/replay_logprob_max_abs_diff" in row for row in rows] == [True, False]


# ---------------------------------------------------------------- the sampling distribution is the one scored

def workspace_with_generation_config(workspace, root, **settings):
    """The tiny workspace, its model's generation_config.json carrying ``settings``."""
    import shutil

    shutil.copytree(workspace, root)
    path = root / "model" / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | settings))
    return root


@pytest.mark.parametrize("hybrid", ["on", "off"])
def test_a_models_own_sampling_settings_do_not_reach_the_rollouts(workspace, tmp_path, hybrid):
    """min_p and no_repeat_ngram_size in a model's generation_config.json: sampling still uses
    the plain temperature softmax the loss scores, in HRPO (the replay reproduces the
    sampling log-probs) and in plain GRPO (the same generation config)."""
    leaky = workspace_with_generation_config(workspace, tmp_path / "ws", min_p=0.2, no_repeat_ngram_size=2,
                                             repetition_penalty=1.3, top_k=3)
    args = tiny_training_args(leaky, tmp_path / "out", "--hybrid_thinking", hybrid)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged, _ = model._prepare_generation_config(trainer.generation_config)  # what generate() will use
    assert (merged.min_p, merged.no_repeat_ngram_size, merged.repetition_penalty, merged.top_k) == (0.0, 0, 1.0, 0)
    if hybrid == "on":
        trainer.train()
        assert len(trainer.replay_logprob_diffs) == 2 and max(trainer.replay_logprob_diffs) <= 1e-4


@pytest.mark.parametrize("hybrid", ["on", "off"])
def test_a_sampling_setting_without_a_neutral_value_stops_the_run_before_training(workspace, tmp_path, hybrid):
    leaky = workspace_with_generation_config(workspace, tmp_path / "ws", suppress_tokens=[5, 6])
    args = tiny_training_args(leaky, tmp_path / "out", "--hybrid_thinking", hybrid)
    with pytest.raises(ValueError, match=r"suppress_tokens=\[5, 6\].*generation_config.json.*off-policy"):
        hrpo_run.build_trainer(args, reward_funcs=[length_reward])


def test_off_policy_sampling_in_float32_fails_the_first_step(workspace, tmp_path):
    """A leak that gets past the start-up check (here a top-k set on the trainer's own
    generation config) shows up as a replay gap, an error before the first update."""
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    before = {n: p.detach().clone() for n, p in trainable(trainer.model).items()}
    trainer.generation_config.top_k = 3
    with pytest.raises(RuntimeError, match=r"on-policy check.*step 0.*float32.*top_k': 3"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer.model).items())  # nothing was updated


def test_off_policy_sampling_in_half_precision_warns_above_its_bound(workspace, tmp_path):
    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", "projection")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.args.bf16 = True  # judged as half precision; the gap itself is made by hand
    trainer._first_checked_step = None
    with pytest.warns(UserWarning, match="half precision"):
        trainer._judge_replay_gap(3.0)
    trainer._judge_replay_gap(0.5)  # within bf16's rounding: silent (and only one warning a run)


# ---------------------------------------------------------------- resume takes the checkpoint's settings

def fake_checkpoint(workspace, out, *flags):
    """A checkpoint folder as the trainer writes it, for a run started with ``flags``."""
    args = tiny_training_args(workspace, out, *flags)
    model = tiny_model("qwen2", hidden_size=32, **args.thinking.to_dict())
    write_run_settings(model, hrpo_run.run_settings_record(args), out / "checkpoint-1")
    mark_complete(out / "checkpoint-1")


def resumed_args(monkeypatch, argv):
    seen = {}
    monkeypatch.setattr(hrpo_run, "train", lambda settings: seen.setdefault("args", settings))
    code = hrpo_train.main(argv)
    return code, seen.get("args")


def test_resume_takes_the_thinking_options_from_the_checkpoint(workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_checkpoint(workspace, out, "--thinking_latent_source", "embedding", "--lora_rank", "8",
                    "--residual_r_min", "0.95")
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--resume", "--max_steps", "5", "--extend_lr_schedule"]
    code, args = resumed_args(monkeypatch, argv)
    assert code == 0
    assert (args.thinking.thinking_latent_source, args.model.lora_r, args.thinking.thinking_residual_r_min) == (
        "embedding", 8, 0.95)
    assert args.training.max_steps == 5  # not a setting of the model: the command line's
    code, args = resumed_args(monkeypatch, argv + ["--thinking_latent_source", "embedding"])  # the same: fine
    assert code == 0 and args.thinking.thinking_latent_source == "embedding"


@pytest.mark.parametrize("flag, value, name, saved", [
    ("--thinking_latent_source", "projection", "thinking_latent_source", "'embedding'"),
    ("--lora_rank", "32", "lora_r", "8"), ("--lr", "0.5", "learning_rate", "0.01"),
    ("--lr_scheduler_type", "linear", "lr_scheduler_type", "'cosine'"), ("--warmup_ratio", "0.2", "warmup_steps", "0.0"),
    ("--max_grad_norm", "1.0", "max_grad_norm", "0.1"), ("--optimizer", "sgd", "optim", "'adamw_torch"),
    ("--adam_beta2", "0.9", "adam_beta2", "0.99"), ("--num_iterations", "2", "num_iterations", "1"),
    ("--seed", "7", "seed", "42"), ("--max_completion_length", "12", "max_completion_length", "10")])
def test_resume_with_a_conflicting_flag_is_an_error(workspace, tmp_path, monkeypatch, capsys, flag, value, name, saved):
    out = tmp_path / "out"
    fake_checkpoint(workspace, out, "--thinking_latent_source", "embedding", "--lora_rank", "8")
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--resume", flag, value]
    code, args = resumed_args(monkeypatch, argv)
    err = capsys.readouterr().err
    assert code == 2 and args is None
    assert f"--{name} " in err and value in err and saved in err and "checkpoint-1" in err


def test_resume_takes_every_saved_setting_also_entry_script_and_changed_defaults(workspace, tmp_path, monkeypatch):
    """A MATH run (task and length from hrpo_math.py's defaults, never typed) resumed with the
    generic command continues as MATH; a default that changed since (here the temperature,
    recorded as 0.7 and not typed) is the checkpoint's, not today's."""
    out = tmp_path / "out"
    parser = hrpo_settings.settings_parser(task="math", max_completion_length=2048)
    args = hrpo_settings.parse_settings(tiny_training_argv(workspace, out)[:4] + ["--output_dir", str(out)], parser)
    record = hrpo_run.run_settings_record(args)
    assert "task" not in record["given"] and "temperature" not in record["given"]
    record["settings"]["temperature"] = 0.7  # as an earlier version's default
    model = tiny_model("qwen2", hidden_size=32, **args.thinking.to_dict())
    write_run_settings(model, record, out / "checkpoint-1")
    mark_complete(out / "checkpoint-1")
    code, resumed = resumed_args(monkeypatch, ["--output_dir", str(out), "--resume"])
    assert code == 0
    assert (resumed.task.task, resumed.task.dataset_path, resumed.training.max_completion_length) == (
        "math", record["settings"]["dataset_path"], 2048)
    assert resumed.training.temperature == 0.7
    assert resumed.model.model_name_or_path == record["settings"]["model_name_or_path"]


def test_resume_from_a_given_checkpoint_and_a_finished_run(workspace, tmp_path, monkeypatch, capsys):
    """--resume checkpoint-N takes that checkpoint; a finished run is reported and left as it is."""
    out = tmp_path / "out"
    fake_checkpoint(workspace, out, "--lora_rank", "8")
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", "5", "--extend_lr_schedule", "--resume"]
    code, args = resumed_args(monkeypatch, argv + ["checkpoint-1"])
    assert code == 0 and args.model.lora_r == 8 and resume.resume_checkpoint(args) == out / "checkpoint-1"
    code, _ = resumed_args(monkeypatch, argv + ["checkpoint-7"])
    assert code == 2 and "--resume checkpoint-7: no such checkpoint folder" in capsys.readouterr().err
    (out / "log_history.json").write_text(json.dumps([{"step": 5, "loss": 0.1}]))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, args = resumed_args(monkeypatch, argv)
    assert code == 0 and args is None  # nothing trained
    assert "is finished: it finished at step 5" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    code, args = resumed_args(monkeypatch, argv + ["--max_steps", "8"])  # asked to train on
    assert code == 0 and args is not None


def test_another_run_length_on_resume_is_an_error_unless_the_schedule_is_extended(workspace, tmp_path, monkeypatch,
                                                                                capsys):
    """checkpoint-1 of a 1-step cosine run: its multiplier at step 1 is 0; over 5 steps it would be
    0.5 (1 + cos(pi / 5)) = 0.905. A constant schedule does not depend on the length."""
    import math

    out = tmp_path / "out"
    fake_checkpoint(workspace, out, "--lora_rank", "8")
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--resume"]
    code, args = resumed_args(monkeypatch, argv + ["--max_steps", "5"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and args is None
    expected = 0.5 * (1 + math.cos(math.pi / 5))
    assert f"--max_steps 1 -> --max_steps 5: at step 1 the learning-rate multiplier goes 0.000 -> {expected:.3f}" in err
    assert "--extend_lr_schedule" in err
    code, args = resumed_args(monkeypatch, argv + ["--max_steps", "-1", "--num_train_epochs", "2"])
    assert code == 2 and "--max_steps 1 -> --num_train_epochs 2" in capsys.readouterr().err
    code, args = resumed_args(monkeypatch, argv + ["--max_steps", "5", "--extend_lr_schedule"])
    assert code == 0 and args.training.max_steps == 5
    assert f"0.000 -> {expected:.3f}" in capsys.readouterr().out
    code, args = resumed_args(monkeypatch, argv + ["--max_steps", "1"])  # the same length
    assert code == 0
    code, args = resumed_args(monkeypatch, argv)  # no length given: the checkpoint's
    assert code == 0 and args.training.max_steps == 1


def test_an_epoch_based_resume_is_finished_only_after_its_epochs(workspace, tmp_path):
    """--max_steps -1: a run whose final log stops at step 5 of a --max_steps 5 run is not
    finished for 1 epoch; a run that ran its epoch is."""
    out = tmp_path / "out"
    args = tiny_training_args(workspace, out, "--max_steps", "5")
    model = tiny_model("qwen2", hidden_size=32, **args.thinking.to_dict())
    write_run_settings(model, hrpo_run.run_settings_record(args), out)
    (out / "log_history.json").write_text(json.dumps([{"step": 5, "loss": 0.1}]))
    epochs = tiny_training_args(workspace, out, "--max_steps", "-1", "--num_train_epochs", "1", "--resume", "latest")
    assert resume.finished_run(epochs) is None
    write_run_settings(model, hrpo_run.run_settings_record(epochs), out)
    assert "finished its 1 epoch(s) at step 5" in resume.finished_run(epochs)
    assert resume.finished_run(tiny_training_args(workspace, out, "--max_steps", "-1", "--num_train_epochs", "2",
                                                    "--resume", "latest")) is None


def test_rollouts_are_sampled_under_the_trainers_autocast(workspace, tmp_path):
    """The replay scores under accelerator.autocast() (bf16/fp16 on CUDA); sampling must run
    under the same context so that the on-policy check compares like with like."""
    import contextlib

    trainer = hrpo_run.build_trainer(tiny_training_args(workspace, tmp_path / "out"), reward_funcs=[length_reward])
    inside = []
    original_autocast = trainer.accelerator.autocast

    @contextlib.contextmanager
    def recording_autocast(*args, **kwargs):
        inside.append(True)
        try:
            with original_autocast(*args, **kwargs):
                yield
        finally:
            inside.pop()

    trainer.accelerator.autocast = recording_autocast
    base = trainer.thinking_base
    sampled_inside = []
    original_latent = type(base).thinking_latent
    def spy(self, *args, **kwargs):
        if trainer._generating:
            sampled_inside.append(bool(inside))
        return original_latent(self, *args, **kwargs)
    type(base).thinking_latent = spy
    try:
        trainer.train()
    finally:
        type(base).thinking_latent = original_latent
    assert sampled_inside and all(sampled_inside)


def test_plain_grpo_arm_trains_lora_only_and_evaluates_without_thinking(workspace, tmp_path):
    """--hybrid_thinking off: TRL's own GRPOTrainer, the thinking modules untouched, and the
    checkpoint evaluates as trained (plain decoding) without being told."""
    from trl import GRPOTrainer

    from hrpo.trainer import HRPOTrainer

    args = tiny_training_args(workspace, tmp_path / "out", "--hybrid_thinking", "off")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    assert isinstance(trainer, GRPOTrainer) and not isinstance(trainer, HRPOTrainer)
    assert {module_of(n) for n in trainable(trainer.model)} == {"lora"}
    trainer.train()
    trainer.save_run_settings(tmp_path / "out" / "checkpoint-1")
    write_jsonl(make_problems(3, seed=3, difficulty=3), tmp_path / "test.jsonl")
    assert evaluation_cli.main(["--checkpoint_path", str(tmp_path / "out" / "checkpoint-1"), "--dataset_path",
                            str(tmp_path / "test.jsonl"), "--greedy", "--max_new_tokens", "4"]) == 0
    result_file = result_file_name(str(tmp_path / "test.jsonl"), "test")
    metrics = json.loads((tmp_path / "out" / "checkpoint-1" / result_file).read_text())["metrics"]
    assert metrics["thinking"] is False and metrics["task"] == "gsm8k"


def test_every_optimiser_and_schedule_flag_reaches_trls_config(tmp_path):
    config = hrpo_settings.parse_settings([
        "--lr", "3e-4", "--beta", "0.02", "--weight_decay", "0.05", "--warmup_ratio", "0.2",
        "--lr_scheduler_type", "constant_with_warmup", "--max_grad_norm", "0.5", "--adam_beta1", "0.8",
        "--adam_beta2", "0.95", "--loss_type", "dr_grpo", "--temperature", "0.7", "--group_size", "2",
        "--output_dir", str(tmp_path)]).training
    assert (config.learning_rate, config.beta, config.weight_decay, config.warmup_steps) == (3e-4, 0.02, 0.05, 0.2)
    assert config.lr_scheduler_type.value == "constant_with_warmup"
    assert (config.max_grad_norm, config.adam_beta1, config.adam_beta2) == (0.5, 0.8, 0.95)
    assert (config.loss_type, config.temperature, config.num_generations) == ("dr_grpo", 0.7, 2)


def test_an_evaluation_between_logging_steps_leaves_the_pending_training_metrics_alone(workspace, tmp_path):
    """The evaluation's log line holds the evaluation's metrics; the training metrics gathered
    since the last logging step stay for their own line (TRL's log() would merge and clear them)."""
    write_jsonl(make_problems(2, seed=5, difficulty=3), tmp_path / "test.jsonl")
    args = tiny_training_args(workspace, tmp_path / "out", "--eval_samples", "2", "--eval_dataset_path",
                              str(tmp_path / "test.jsonl"), "--max_completion_length", "4")
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.model.train()
    trainer._metrics["train"]["reward"].append(0.75)
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]
    assert "eval_accuracy" in metrics and "eval_accuracy" in logged
    assert "reward" not in logged and "eval_reward" not in logged
    assert trainer._metrics["train"]["reward"] == [0.75] and trainer.model.training


def test_held_out_evaluation_every_n_steps_with_reward_functions_by_import_path(workspace, tmp_path):
    """--eval_strategy steps: the trainer's own schedule runs the held-out evaluation, logged with
    the training metrics (eval_accuracy); --reward_funcs imports the reward; the model card is ours."""
    write_jsonl(make_problems(3, seed=5, difficulty=3), tmp_path / "test.jsonl")
    out = tmp_path / "out"
    argv = tiny_training_argv(workspace, out, "--max_steps", "2", "--eval_samples", "3", "--eval_dataset_path",
                              str(tmp_path / "test.jsonl"), "--eval_on_start", "--eval_strategy", "steps",
                              "--eval_steps", "1", "--reward_funcs", "testing.training.length_reward",
                              "--max_completion_length", "6")
    assert hrpo_train.main(argv) == 0
    for name in ("eval_step0.json", "eval_step1.json", "eval_step2.json", "eval_final.json"):
        metrics = json.loads((out / name).read_text())["metrics"]
        assert metrics["total"] == 3 and metrics["split"] == "test"
    history = json.loads((out / "log_history.json").read_text())
    assert [row["step"] for row in history if "eval_accuracy" in row] == [0, 1, 2]
    assert any("rewards/length_reward/mean" in row for row in history)
    card = (out / "README.md").read_text()
    assert "thinking_projection" in card and "/3)" in card  # the final evaluation, on 3 problems
