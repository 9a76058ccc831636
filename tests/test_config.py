"""The settings (hrpo.config): every GRPOConfig / ModelConfig field reachable from the command
line and from a YAML --config, HRPO's flag names as aliases, the recipes, the README's lines."""
import re
from dataclasses import fields
from pathlib import Path

import pytest
from trl import GRPOConfig, ModelConfig

from hrpo.command_line import normalized_argv
from hrpo.errors import UsageError
from hrpo.settings_parser import parse_settings, settings_parser

REPO = Path(__file__).resolve().parent.parent


def test_every_grpo_and_model_config_field_is_a_flag_and_a_yaml_key():
    parser = settings_parser()
    dests = {action.dest for action in parser._actions}
    wanted = [f.name for cls in (GRPOConfig, ModelConfig) for f in fields(cls) if f.init]
    assert len(wanted) > 150 and not [name for name in wanted if name not in dests]
    # a YAML key is matched like a flag: nothing left over
    assert parser.set_defaults_with_config(**{name: None for name in wanted}) == []


# fields the issue tracker named as unreachable, each set on the command line and in YAML
REACHABLE = {
    "num_iterations": ("2", 2), "epsilon": ("0.3", 0.3), "epsilon_high": ("0.28", 0.28),
    "scale_rewards": ("batch", "batch"), "mask_truncated_completions": ("true", True),
    "importance_sampling_level": ("sequence", "sequence"), "run_name": ("my-run", "my-run"),
    "push_to_hub": ("true", True), "hub_model_id": ("me/hrpo-run", "me/hrpo-run"),
    "lora_alpha": ("48", 48), "lora_dropout": ("0.05", 0.05), "attn_implementation": ("sdpa", "sdpa"),
    "model_revision": ("v2", "v2"), "trust_remote_code": ("true", True), "eval_steps": ("5", 5),
}


def settings_value(settings, name):
    for part in (settings.task, settings.model, settings.training, settings.thinking):
        if hasattr(part, name):
            return getattr(part, name)
    raise AttributeError(name)


@pytest.mark.parametrize("name", sorted(REACHABLE))
def test_once_unreachable_options_are_set_from_flags_and_yaml(name, tmp_path):
    text, value = REACHABLE[name]
    from_flags = parse_settings([f"--{name}", text, "--output_dir", str(tmp_path)])
    config = tmp_path / "recipe.yaml"
    config.write_text(f"{name}: {text}\n")
    from_yaml = parse_settings(["--config", str(config), "--output_dir", str(tmp_path)])
    assert settings_value(from_flags, name) == value == settings_value(from_yaml, name)
    assert name in from_flags.given and name in from_yaml.given


def test_lists_reward_functions_and_target_modules(tmp_path):
    s = parse_settings(["--reward_funcs", "testing.training.length_reward", "hrpo.rewards.completion_text",
                        "--reward_weights", "1.0", "0.5", "--lora_target_modules", "q_proj", "v_proj",
                        "--output_dir", str(tmp_path)])
    assert s.task.reward_funcs == ["testing.training.length_reward", "hrpo.rewards.completion_text"]
    assert s.training.reward_weights == [1.0, 0.5] and s.model.lora_target_modules == ["q_proj", "v_proj"]
    one = parse_settings(["--lora_target_modules", "q_proj", "--output_dir", str(tmp_path)])
    assert one.model.lora_target_modules == ["q_proj"]  # TRL makes a list of one its item; kept a list


@pytest.mark.parametrize("old, new, value", [
    ("--lr", "learning_rate", 3e-4), ("--group_size", "num_generations", 8), ("--lora_rank", "lora_r", 8),
    ("--model_name", "model_name_or_path", "some/model"), ("--optimizer", "optim", "adafactor"),
    ("--warmup_ratio", "warmup_steps", 0.2), ("--residual_r_min", "thinking_residual_r_min", 0.95),
    ("--eval_split", "eval_split", "validation")])
def test_hrpos_flag_names_are_aliases_of_trls(old, new, value, tmp_path):
    s = parse_settings([old, str(value), "--output_dir", str(tmp_path)])
    got = settings_value(s, new)
    assert getattr(got, "value", got) == value and new in s.given
    config = tmp_path / "old.yaml"
    config.write_text(f"{old.lstrip('-')}: {value}\n")
    got = settings_value(parse_settings(["--config", str(config)]), new)
    assert getattr(got, "value", got) == value


def test_help_shows_the_aliases_and_never_says_the_seed():
    text = settings_parser().format_help()
    for old, new in (("--lr", "--learning_rate"), ("--group_size", "--num_generations"), ("--lora_rank", "--lora_r"),
                     ("--model_name", "--model_name_or_path")):
        assert re.search(rf"{new}[ A-Z_]*,.*{old}\b", text), (old, new)
    assert "the seed" not in " ".join(text.split())


def test_flags_after_the_config_win_and_lora_alpha_follows_the_rank(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 1.0e-4\nlora_r: 8\ntask: arith\n")
    s = parse_settings(["--config", str(config), "--lr", "2e-4"])
    assert (s.training.learning_rate, s.model.lora_r, s.model.lora_alpha, s.task.task) == (2e-4, 8, 16, "arith")
    assert s.task.dataset_path == "generated"  # the task's default data


def test_earlier_versions_values_still_parse():
    assert normalized_argv(["--resume", "--lr", "1"]) == ["--resume", "latest", "--lr", "1"]
    assert normalized_argv(["--resume"]) == ["--resume", "latest"]
    assert normalized_argv(["--resume", "checkpoint-3"]) == ["--resume", "checkpoint-3"]
    assert normalized_argv(["--gradient_checkpointing", "on"]) == ["--gradient_checkpointing", "true"]
    assert normalized_argv(["--gradient_checkpointing", "auto", "--lr", "1"]) == ["--lr", "1"]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    s = parse_settings(["--config", str(recipe)])
    assert s.given and s.task.task in recipe.name.split("_")[0] + "arith"


def test_the_readmes_command_lines_parse():
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
             if line.strip().startswith("python hrpo_gsm8k.py")]
    assert len(lines) >= 4
    for line in lines:
        argv = [token for token in line.split("#")[0].split()[2:] if token != "..."]
        parse_settings(argv)  # raises on an unknown flag


def test_an_unknown_yaml_key_and_a_bad_yaml_value_are_named(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rte: 1.0e-4\n")
    with pytest.raises(UsageError, match="learning_rte"):
        parse_settings(["--config", str(config)])
    config.write_text("beta: -1\n")
    with pytest.raises(UsageError, match="--beta -1"):
        parse_settings(["--config", str(config)])
