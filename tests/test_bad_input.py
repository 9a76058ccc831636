"""Bad input is an error before the model loads: it names the setting and the value, and
writes nothing into the output folder (the training command line, in-process)."""
from pathlib import Path

import pytest

from hrpo import train, training
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
    (["--use_vllm"], "--use_vllm: HRPO samples with the fork's hybrid generate()"),
    (["--compile_rollouts"], "--compile_rollouts: needs --backend transformers (got auto)"),
    (["--config", "{ws}/bad.yaml"], "--learning_rate -0.5: expected a value > 0"),
    (["--config", "{ws}/unknown.yaml"], "Unknown arguments from config file: ['--no_such_setting', '3']"),
]


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join(flags) for flags, _ in CASES])
def test_bad_input_is_named_before_the_model_loads_and_writes_nothing(workspace, tmp_path, monkeypatch, capsys,
                                                                      flags, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(training, "load_with_unsloth", no_weights)
    monkeypatch.setattr(training, "load_with_transformers", no_weights)
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
