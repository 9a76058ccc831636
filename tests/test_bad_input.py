"""Bad input is an error before the model loads: it names the setting and the value, and
writes nothing into the output folder (the training command line, in-process)."""
from pathlib import Path

import pytest

from hrpo import loading, train
from testing.training import save_training_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = save_training_workspace(tmp_path_factory.mktemp("bad-input"))
    from transformers import MistralConfig

    MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2).save_pretrained(root / "mistral")
    (root / "a-file").write_text("not a folder")
    (root / "bad.yaml").write_text("lr: -0.5\n")  # an alias, as a key
    (root / "unknown.yaml").write_text("no_such_setting: 3\n")
    (root / "string.yaml").write_text("just a sentence\n")
    (root / "list.yaml").write_text("- lr: 1e-3\n- beta: 0\n")
    (root / "two-names.yaml").write_text("lr: 1.0e-3\nlearning_rate: 2.0e-3\n")
    (root / "copy-of-train.jsonl").write_text((root / "train.jsonl").read_text())
    return root


CASES = [
    (["--lr", "-1"], "--learning_rate -1.0: expected a value > 0"),
    (["--beta", "-1"], "--beta -1.0: expected a value >= 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: expected a value > 0"),
    (["--max_completion_length", "0"], "--max_completion_length 0: expected a value > 0"),
    (["--temperature", "0"], "--temperature 0.0: expected a value > 0"),
    (["--report_to", "wandbb"], "--report_to wandbb: wandbb is not one of"),
    (["--optimizer", "adamw_bogus"], "--optim adamw_bogus: not one of transformers' OptimizerNames"),
    (["--lr_scheduler_type", "cosinee"], "--lr_scheduler_type cosinee: not one of transformers' SchedulerType"),
    (["--output_dir", "{ws}/a-file"], "--output_dir {ws}/a-file: is a file, expected a folder"),
    (["--hybrid_thinking", "off", "--thinking_latent_source", "embedding"],
     "--thinking_latent_source: no effect with --hybrid_thinking off"),
    (["--hybrid_thinking", "off", "--lr_residual_gate", "1e-3"], "--lr_residual_gate: no effect with --hybrid_thinking off"),
    (["--thinking_latent_source", "embedding", "--lr_thinking_projection", "1e-3"],
     "--lr_thinking_projection: no effect with --thinking_latent_source embedding"),
    (["--eval_on_start"], "--eval_on_start: no effect without --eval_samples"),
    (["--eval_samples", "4"], "--eval_samples 4: the training data {ws}/train.jsonl is a single file, which has no "
                              "held-out split"),
    (["--model_name", "{ws}/mistral"], "--model_name_or_path {ws}/mistral: a mistral model; HRPO's thinking modules exist for qwen2 and llama"),
    (["--model_name", "ws/no-such-model"], "--model_name_or_path ws/no-such-model: no such model folder"),
    (["--thinking_latent_noise", "gaussian"], "thinking_latent_noise='gaussian' needs thinking_latent_noise_scale > 0"),
    (["--group_size", "3"], "generation_batch_size (4) must be divisible by num_generations (3)"),
    (["--eval_strategy", "steps", "--eval_steps", "2"], "--eval_strategy steps: no effect without --eval_samples"),
    (["--use_peft", "false"], "--use_peft false: HRPO trains a LoRA adapter"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0: expected a value in [0, 1)"),
    (["--reward_funcs", "nodots"], "--reward_funcs nodots: expected an import path package.module.function"),
    (["--load_in_4bit"], "--load_in_4bit / --load_in_8bit: bitsandbytes quantization needs CUDA"),
    (["--use_vllm", "--vllm_mode", "server"], "--vllm_mode server: HRPO samples with vLLM in colocate mode only"),
    (["--use_vllm", "--vllm_tensor_parallel_size", "2"],
     "--vllm_tensor_parallel_size 2: hybrid thinking in vLLM is tested with one engine per process only"),
    (["--use_vllm", "--compile_rollouts", "--backend", "transformers"], "--compile_rollouts with --use_vllm"),
    (["--use_vllm", "--fsdp", "full_shard"], "--use_vllm with hybrid thinking under DeepSpeed or FSDP"),
    (["--compile_rollouts"], "--compile_rollouts: needs --backend transformers (got auto)"),
    (["--config", "{ws}/bad.yaml"], "--learning_rate -0.5: expected a value > 0"),
    (["--config", "{ws}/unknown.yaml"], "Unknown arguments from config file: ['--no_such_setting', '3']"),
    # a --config file that is not a mapping of settings
    (["--config", "{ws}/string.yaml"], "--config {ws}/string.yaml: its top level is a str; expected a mapping"),
    (["--config", "{ws}/list.yaml"], "--config {ws}/list.yaml: its top level is a list; expected a mapping"),
    (["--config", "{ws}/missing.yaml"], "--config {ws}/missing.yaml: cannot read it"),
    # one setting under two names
    (["--lr", "1e-3", "--learning_rate", "2e-3"], "--lr 1e-3 and --learning_rate 2e-3 both set learning_rate"),
    (["--config", "{ws}/two-names.yaml"], "--lr 0.001 and --learning_rate 0.002 in --config both set learning_rate"),
    # held-out data that is the training data
    (["--eval_samples", "2", "--eval_dataset_path", "{ws}/train.jsonl"],
     "the held-out data {ws}/train.jsonl is the training file"),
    (["--eval_samples", "2", "--eval_dataset_path", "{ws}/copy-of-train.jsonl"],
     "all 2 held-out rows evaluated are training rows"),
    # TRL's resume flag is --resume
    (["--resume_from_checkpoint", "{ws}/no-checkpoint"], "--resume {ws}/no-checkpoint: no such checkpoint folder"),
    (["--resume", "checkpoint-1", "--resume_from_checkpoint", "checkpoint-2"],
     "--resume checkpoint-1 and --resume_from_checkpoint checkpoint-2 name different checkpoints"),
    # run lengths and other numeric ranges
    (["--max_steps", "-5"], "--max_steps -5: expected -1 or a value > 0"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0: expected a value > 0"),
    (["--num_iterations", "0"], "--num_iterations 0: expected a value >= 1"),
    (["--top_p", "0"], "--top_p 0.0: expected a value in (0, 1]"),
    (["--adam_epsilon", "0"], "--adam_epsilon 0.0: expected a value > 0"),
    (["--epsilon", "-0.2"], "--epsilon -0.2: expected a value > 0"),
    (["--seed", "-1"], "--seed -1: expected a value >= 0"),
    (["--lora_r", "0"], "--lora_r 0: expected a value > 0"),
    (["--group_size", "1"], "--num_generations 1: expected a value >= 2"),
    (["--warmup_ratio", "nan"], "--warmup_steps nan: expected a value >= 0"),
    # what would fail after loading
    (["--loss_temperature", "0"], "--loss_temperature 0.0: expected a value > 0"),
    (["--loss_temperature", "1.0", "--use_cpu", "false", "--backend", "transformers", "--use_vllm",
      "--hybrid_thinking", "off"], "--loss_temperature 1.0 (--temperature 0.5): with --use_vllm"),
    (["--skip_steps_without_signal", "--beta", "0.04"], "--skip_steps_without_signal: needs --beta 0 (got 0.04)"),
    (["--task", "arith", "--dataset_path", "generated", "--dataset_train_split", "validation"],
     "the split 'validation': generated arith data has the splits ['test', 'train']"),
    (["--report_to", "tensorboard"], "--report_to tensorboard: tensorboard is not installed"),
    (["--report_to", "wandb"], "--report_to wandb: wandb is not installed"),
    (["--max_prompt_length", "5"], "--max_prompt_length 5: every prompt of {ws}/train.jsonl is longer (the shortest "
                                   "has"),
]


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join(flags) for flags, _ in CASES])
def test_bad_input_is_named_before_the_model_loads_and_writes_nothing(workspace, tmp_path, monkeypatch, capsys,
                                                                      flags, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(loading, "load_with_unsloth", no_weights)
    monkeypatch.setattr(loading, "load_with_transformers", no_weights)
    monkeypatch.chdir(workspace.parent)
    (workspace.parent / "ws").mkdir(exist_ok=True)  # "ws/..." starts like a folder here: a local path
    out = tmp_path / "out"
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1"]
    argv += [flag.format(ws=workspace) for flag in flags]
    assert train.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.format(ws=workspace) in err, err
    assert not out.exists() or not any(out.iterdir())


def test_push_to_hub_without_a_token_is_refused_before_the_model_loads(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file there
    monkeypatch.setattr(loading, "load_with_unsloth", None)
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--push_to_hub"]
    assert train.main(argv) == 2
    assert "--push_to_hub: no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train.main(argv) == 2
    assert "--push_to_hub: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_config_and_starts_with_the_usage(workspace):
    """--help prints the usage first (no banner of a library before it) and lists --config."""
    import sys

    from testing.processes import run_child

    script = Path(__file__).resolve().parent.parent / "hrpo_gsm8k.py"
    proc = run_child([sys.executable, str(script), "--help"], timeout=300, what="hrpo_gsm8k.py --help")
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    assert "--config RECIPE.yaml" in proc.stdout and "--resume_from_checkpoint" in proc.stdout
    # HRPO's own settings first, in their group; TRL's after, in theirs
    from hrpo.settings_parser import HRPO_GROUP, LIBRARY_GROUP

    text = proc.stdout
    ours, theirs = text.index(f"\n{HRPO_GROUP}:\n"), text.index(f"\n{LIBRARY_GROUP}:\n")
    listed = lambda flag: text.index(f"\n  --{flag} ", ours)  # noqa: E731  (the usage lines come first)
    assert ours < listed("hybrid_thinking") < listed("thinking_latent_source") < theirs < listed("learning_rate")
    assert theirs < listed("lora_r")


def test_the_script_imports_unsloth_before_transformers_and_stops_before_the_model(workspace, tmp_path):
    """As a user runs it: no "Unsloth should be imported before ..." warning, exit 2, the message."""
    import sys

    from testing.processes import run_child

    argv = [sys.executable, str(Path(__file__).resolve().parent.parent / "hrpo_gsm8k.py"), "--model_name", str(workspace / "model"),
            "--dataset_path", str(workspace / "train.jsonl"), "--output_dir", str(tmp_path / "out"), "--lr", "-1"]
    proc = run_child(argv, timeout=300, what="hrpo_gsm8k.py with a bad flag", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--learning_rate -1.0: expected a value > 0" in proc.stderr
    assert "should be imported before" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()
