"""The run layer: HRPO's settings reach the trainer through its ``args`` alone, and a new
thinking option is its field (with its checks, in the field's metadata) and the place that
uses it, nothing else."""
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

import hrpo

HRPO = Path(hrpo.__file__).resolve().parent


def tiny_trainer(tmp_path, args):
    """HRPOTrainer built directly (no hrpo.run), on a tiny Qwen2 with LoRA and the projection."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers.hybrid_thinking.modeling import thinking_module_names

    from hrpo.tasks import get_task
    from hrpo.tasks.arith import make_problems
    from hrpo.trainer import HRPOTrainer
    from testing.tiny import PLAIN_CHAT_TEMPLATE, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    model = tiny_model("qwen2", tokenizer, thinking_latent_source="projection")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=list(thinking_module_names(model.config))))
    dataset = get_task("arith").with_prompts(Dataset.from_list(make_problems(8, difficulty=2)))
    trainer = HRPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                          reward_funcs=[lambda completions, **_: [0.0] * len(completions)])
    trainer.create_optimizer()
    return trainer


def group_rates(trainer) -> dict:
    return {group["name"]: group["lr"] for group in trainer.optimizer.param_groups if group["params"]}


COMMON = dict(num_generations=4, per_device_train_batch_size=4, max_completion_length=8, max_steps=1,
              temperature=0.5, beta=0.0, use_cpu=True, report_to="none", save_strategy="no", learning_rate=1e-5)


def test_an_hrpo_trainer_built_directly_trains_the_thinking_modules_at_their_own_rates(tmp_path):
    from hrpo.config import HRPOConfig

    args = HRPOConfig(output_dir=str(tmp_path / "out"), lr_residual_gate=2e-3, lr_residual_Lambda=3e-3,
                      lr_thinking_projection=4e-3, thinking_monitor_every=7, **COMMON)
    trainer = tiny_trainer(tmp_path, args)
    rates = group_rates(trainer)
    assert rates["main_decay"] == 1e-5
    assert (rates["gate"], rates["lambda"], rates["projection"]) == (2e-3, 3e-3, 4e-3)
    assert trainer.thinking_monitor_every == 7


def test_a_plain_grpo_config_gets_hrpos_thinking_rates_never_the_lora_rate(tmp_path):
    import trl

    from hrpo.config import HRPOConfig

    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), top_k=0, top_p=1.0, **COMMON)
    trainer = tiny_trainer(tmp_path, args)
    rates = group_rates(trainer)
    defaults = {f.name: f.default for f in fields(HRPOConfig)}
    assert rates["main_decay"] == 1e-5
    assert (rates["gate"], rates["lambda"], rates["projection"]) == (
        defaults["lr_residual_gate"], defaults["lr_residual_Lambda"], defaults["lr_thinking_projection"])


@pytest.mark.parametrize("name", ["lr_residual_gate", "lr_residual_Lambda", "lr_thinking_projection",
                                  "thinking_monitor_every"])
def test_each_thinking_option_lives_in_two_places(name):
    """Its field (hrpo/config.py) and the one module that uses it: no list, no keyword, no
    attribute set after the trainer is built."""
    places = sorted(path.relative_to(HRPO).as_posix() for path in HRPO.rglob("*.py") if name in path.read_text())
    assert len(places) == 2 and "config.py" in places, places


def test_a_new_thinking_option_is_its_field_and_where_it_is_used(tmp_path):
    """As a contributor adds one: a field with its range and "hybrid_only" mark. Its flag, its
    range check, its refusal with --hybrid_thinking off and its value in the trainer's args come
    from the field alone; the trainer reads it with hrpo_setting."""
    from transformers.hybrid_thinking.config import ThinkingConfig

    from hrpo.config import HRPOConfig, HRPOModelConfig, TaskArguments, check_settings, hrpo_setting
    from hrpo.errors import UsageError
    from hrpo.settings_parser import SettingsParser, parse_settings

    @dataclass
    class WithDummy(HRPOConfig):
        thinking_dummy_rate: float = field(default=0.5, metadata={
            "hybrid_only": True, "range": "> 0", "help": "a thinking option added as a contributor would"})

    parser = SettingsParser((TaskArguments, HRPOModelConfig, WithDummy, ThinkingConfig))
    out = ["--output_dir", str(tmp_path / "out")]
    settings = parse_settings(["--thinking_dummy_rate", "0.25", *out], parser)
    assert hrpo_setting(settings.training, "thinking_dummy_rate") == 0.25
    check_settings(settings)
    with pytest.raises(UsageError, match=r"--thinking_dummy_rate 0.0: expected a value > 0"):
        parse_settings(["--thinking_dummy_rate", "0", *out], parser)
    off = parse_settings(["--thinking_dummy_rate", "0.25", "--hybrid_thinking", "off", *out], parser)
    with pytest.raises(UsageError, match=r"--thinking_dummy_rate: no effect with --hybrid_thinking off"):
        check_settings(off)


def test_the_training_split_is_trls_dataset_train_split():
    from hrpo.run import load_dataset
    from hrpo.settings_parser import parse_settings
    from hrpo.tasks.arith import SPLIT_SIZES

    settings = parse_settings(["--task", "arith", "--dataset_path", "generated", "--dataset_train_split", "test"])
    assert settings.task.train_split == "test"
    assert len(load_dataset(settings)) == SPLIT_SIZES["test"]
    assert len(load_dataset(parse_settings(["--task", "arith", "--dataset_name", "generated"]))) == SPLIT_SIZES["train"]
