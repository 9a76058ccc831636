"""Our model card (hrpo/model_card.py) and the trainers that write it in place of TRL's."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from hrpo.model_card import (FOLDER_PLACEHOLDER, HRPO_BIBTEX, INSTALL_LINE, REPOSITORY_PLACEHOLDER, latest_evaluation,
                             model_card_text)
from testing.processes import run_child

REPO = Path(__file__).resolve().parent.parent

PROJECTION_THINKING = {"thinking_latent_source": "projection", "thinking_latent_scale": "unit",
                       "thinking_projection_layers": 2, "thinking_projection_layernorm": True,
                       "thinking_projection_dropout": 0.0, "thinking_projection_init_std": 0.001,
                       "thinking_residual_r_min": 0.99, "thinking_residual_r_max": 0.999, "thinking_latent_topk": None,
                       "thinking_latent_noise": "gaussian", "thinking_latent_noise_scale": 0.33,
                       "answer_marker": "####"}
FINAL_EVALUATION = {"metrics": {"accuracy": 25 / 64, "correct": 25, "total": 64, "thinking": True, "greedy": True,
                                "temperature": 0.5, "max_new_tokens": 64, "system_prompt": "tutor", "seconds": 12.0,
                                "step": 30, "dataset_path": "openai/gsm8k", "split": "test"},
                    "examples": []}


TRAINING = {"learning_rate": 5e-6, "steps": 30, "lora_r": 32, "lora_alpha": 64, "beta": 0.005, "num_generations": 4,
            "temperature": 0.5, "loss_temperature": 1.0, "settings_file": "hrpo_run.json"}


def front_matter(card: str) -> dict:
    first, matter, _ = card.split("---\n", 2)
    assert first == ""  # the card starts with its metadata
    return yaml.safe_load(matter)


def projection_card(**overrides) -> str:
    facts = {"base_model": "Qwen/Qwen2.5-1.5B-Instruct", "task": "gsm8k", "dataset": "openai/gsm8k",
             "thinking": PROJECTION_THINKING, "evaluation": FINAL_EVALUATION, "hub_model_id": "someone/hrpo-qwen",
             "training": TRAINING}
    return model_card_text(**(facts | overrides))


# ---------------------------------------------------------------- the text

def test_projection_card_names_the_run_its_settings_its_score_and_how_to_load_it():
    card = projection_card()
    assert front_matter(card) == {"base_model": "Qwen/Qwen2.5-1.5B-Instruct", "library_name": "peft",
                                  "tags": ["hrpo", "grpo", "trl", "latent-reasoning"], "datasets": ["openai/gsm8k"]}
    assert "for `Qwen/Qwen2.5-1.5B-Instruct`" in card
    assert "- Task: `gsm8k`" in card and "- Data: `openai/gsm8k`" in card
    for key, value in PROJECTION_THINKING.items():
        assert f"| `{key}` | `{value}` |" in card
    assert "The learnable `thinking_projection` is used" in card
    assert "| accuracy | 0.3906 (25/64) |" in card
    assert "| data | `openai/gsm8k`, split `test` |" in card
    assert "| training step | 30 |" in card
    assert f"```bash\n{INSTALL_LINE}  #" in card and INSTALL_LINE == "./setup.sh"
    assert 'folder = snapshot_download("someone/hrpo-qwen")\nmodel, tokenizer = load_checkpoint(folder)' in card
    assert "sys.path" not in card and "from any folder" in card and f"`{REPOSITORY_PLACEHOLDER}/.venv/bin/python`" in card
    assert "python eval_gsm8k.py --checkpoint_path FOLDER --greedy" in card
    assert HRPO_BIBTEX in card and "arXiv:2505.18454" in HRPO_BIBTEX
    assert "arXiv:2402.03300" in card and "@software{vonwerra2020trl" in card
    assert "fine-tuned version of" not in card  # not TRL's card


def test_the_card_names_the_runs_main_settings_and_its_settings_file():
    card = projection_card()
    for line in ("- Learning rate (LoRA): `5e-06`", "- Optimizer steps: `30`", "- LoRA rank: `32`",
                 "- LoRA alpha: `64`", "- Beta (KL coefficient): `0.005`", "- Group size (completions per prompt): `4`",
                 "- Sampling temperature: `0.5`", "- Loss temperature: `1.0`",
                 "- Every setting of the run: `hrpo_run.json`, beside the adapter"):
        assert line in card, line
    training = card.split("## Training")[1].split("##")[0]
    assert training.index("Learning rate") < training.index("Optimizer steps") < training.index("LoRA rank")
    # a setting not recorded, and a run that wrote no settings file, are left out (not printed as None)
    bare = projection_card(training={"learning_rate": 1e-4})
    assert "- Learning rate (LoRA): `0.0001`" in bare and "None" not in bare.split("## Thinking")[0]
    assert "Every setting of the run" not in bare and "LoRA rank" not in bare


def test_embedding_source_does_not_use_the_projection():
    card = projection_card(thinking=PROJECTION_THINKING | {"thinking_latent_source": "embedding"})
    assert "The learnable `thinking_projection` is not used." in card
    both = projection_card(thinking=PROJECTION_THINKING | {"thinking_latent_source": "embedding_plus_projection"})
    assert "The learnable `thinking_projection` is used" in both


def test_plain_grpo_card_says_so_and_has_no_thinking_projection():
    card = projection_card(thinking=None, evaluation=None)
    assert "trained with plain GRPO" in card
    assert "thinking_projection" not in card
    assert "## Thinking settings" not in card and "## Held-out evaluation" not in card
    assert front_matter(card)["base_model"] == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_local_base_model_or_dataset_stays_out_of_the_metadata(tmp_path):
    card = projection_card(base_model=str(tmp_path), dataset="generated:2", hub_model_id=None)
    assert front_matter(card) == {"library_name": "peft", "tags": ["hrpo", "grpo", "trl", "latent-reasoning"]}
    assert f"`{tmp_path}`: a local model (not on the hub)" in card
    assert "snapshot_download" not in card and "model, tokenizer = load_checkpoint(folder)" in card


def test_latest_evaluation_is_the_newest_of_the_trained_model(tmp_path):
    assert latest_evaluation(tmp_path) is None
    write_evaluation(tmp_path / "eval_step10.json", step=10, correct=3, mtime=100)
    write_evaluation(tmp_path / "eval_step20.json", step=20, correct=5, mtime=200)
    write_evaluation(tmp_path / "eval_step0.json", step=0, correct=1, mtime=300)  # before training
    (tmp_path / "eval_broken.json").write_text("{not json")
    (tmp_path / "eval_other.json").write_text(json.dumps({"accuracy": 1.0}))  # no "metrics"
    assert latest_evaluation(tmp_path)["metrics"]["correct"] == 5


def write_evaluation(path, *, step: int, correct: int, mtime: int) -> dict:
    result = {"metrics": {"accuracy": correct / 8, "correct": correct, "total": 8, "step": step,
                          "dataset_path": "generated", "split": "test", "greedy": True, "thinking": True}}
    path.write_text(json.dumps(result))
    os.utime(path, (mtime, mtime))
    return result


# ---------------------------------------------------------------- the trainer, through TRL and transformers

BASE_MODEL = "tiny-org/tiny-qwen2"
HUB_MODEL_ID = "tiny-org/hrpo-tiny"


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's repository creation and upload recorded, never sent; any other hub call fails (offline)."""
    import huggingface_hub
    from huggingface_hub import RepoUrl

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, str(folder_path), (Path(folder_path) / "README.md").read_text()))
        return "uploaded"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def tiny_trainer(output_dir, hybrid: bool):
    """HRPOTrainer (projection source) or the plain-GRPO trainer on a tiny Qwen2 with LoRA."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers.hybrid_thinking.modeling import thinking_module_names

    from hrpo.tasks import get_task
    from hrpo.tasks.arith import make_problems
    from hrpo.trainer import GRPOTrainerWithCompleteCheckpoints, HRPOTrainer
    from testing.tiny import PLAIN_CHAT_TEMPLATE, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    thinking = {"thinking_latent_source": "projection"} if hybrid else {}
    model = tiny_model("qwen2", tokenizer, hybrid=hybrid, **thinking)
    model.config._name_or_path = BASE_MODEL  # as if loaded from the hub
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=list(thinking_module_names(model.config))))
    config = trl.GRPOConfig(output_dir=str(output_dir), num_generations=4, per_device_train_batch_size=4,
                            max_completion_length=8, max_steps=1, temperature=0.5, top_k=0, top_p=1.0, beta=0.0,
                            use_cpu=True, report_to="none", save_strategy="no", hub_model_id=HUB_MODEL_ID)
    dataset = get_task("arith").with_prompts(Dataset.from_list(make_problems(8, difficulty=2)))
    trainer_class = HRPOTrainer if hybrid else GRPOTrainerWithCompleteCheckpoints
    trainer = trainer_class(model=model, processing_class=tokenizer, args=config, train_dataset=dataset,
                            reward_funcs=[lambda completions, **_: [0.0] * len(completions)])
    trainer.hrpo_task, trainer.hrpo_dataset = "arith", "generated"
    return trainer


def test_push_to_hub_uploads_our_card(tmp_path, hub_calls):
    from transformers.hybrid_thinking.config import ThinkingConfig

    out = tmp_path / "out"
    trainer = tiny_trainer(out, hybrid=True)
    trainer.run_settings = {"settings": {}}  # as hrpo.run sets it: the run writes hrpo_run.json
    out.mkdir(parents=True, exist_ok=True)
    final = write_evaluation(out / "eval_step1.json", step=1, correct=6, mtime=100)
    write_evaluation(out / "eval_step0.json", step=0, correct=2, mtime=200)

    assert trainer.push_to_hub() == "uploaded"

    thinking = ThinkingConfig.from_config(trainer.model.get_base_model().config).to_dict()
    assert thinking["thinking_latent_source"] == "projection"
    # the run's settings as tiny_trainer gives them (TRL's default learning rate; LoRA's default alpha), before training
    training = {"learning_rate": 1e-6, "steps": 0, "lora_r": 4, "lora_alpha": 8, "beta": 0.0, "num_generations": 4,
                "temperature": 0.5, "settings_file": "hrpo_run.json"}
    expected = model_card_text(base_model=BASE_MODEL, task="arith", dataset="generated", thinking=thinking,
                               evaluation=final, hub_model_id=HUB_MODEL_ID, training=training)
    assert hub_calls == [("create_repo", HUB_MODEL_ID), ("upload_folder", HUB_MODEL_ID, str(out), expected)]
    assert "- LoRA rank: `4`" in expected and "- Group size (completions per prompt): `4`" in expected
    assert "| accuracy | 0.7500 (6/8) |" in expected and "| training step | 1 |" in expected
    assert (out / "README.md").read_text() == expected


def test_save_model_leaves_our_card_after_peft_rewrote_it(tmp_path, hub_calls):
    out = tmp_path / "out"
    trainer = tiny_trainer(out, hybrid=False)
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    training = {"learning_rate": 1e-6, "steps": 0, "lora_r": 4, "lora_alpha": 8, "beta": 0.0, "num_generations": 4,
                "temperature": 0.5}  # no run-settings file: the trainer was not made by hrpo.run
    assert card == model_card_text(base_model=BASE_MODEL, task="arith", dataset="generated", thinking=None,
                                   evaluation=None, hub_model_id=HUB_MODEL_ID, training=training)
    assert front_matter(card)["tags"] == ["hrpo", "grpo", "trl", "latent-reasoning"]
    assert (tmp_path / "saved" / "adapter_config.json").exists()
    assert hub_calls == []


# ---------------------------------------------------------------- the card's loading code, outside the repository

@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A checkpoint as a run writes it (the adapter with the thinking modules, config.json, the
    tokenizer), of a tiny base model saved in a folder of its own."""
    from peft import LoraConfig, get_peft_model
    from transformers.hybrid_thinking.modeling import thinking_module_names

    from hrpo import LORA_TARGETS
    from testing.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("saved-run")
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, hidden_size=32, thinking_latent_source="projection")
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(LORA_TARGETS),
                                                  modules_to_save=list(thinking_module_names(model.config))))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    folder = root / "out" / "checkpoint-1"
    peft_model.save_pretrained(folder)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def without_pythonpath() -> dict:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def python_block(card: str) -> str:
    return card.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_cards_loading_code_runs_from_another_folder(saved_checkpoint, tmp_path):
    """The card's Python block, with the folder it asks for filled in, run by the environment's
    Python in a folder outside the repository, without PYTHONPATH: it loads the checkpoint."""
    card = projection_card(hub_model_id=None)
    code = python_block(card)
    assert REPOSITORY_PLACEHOLDER not in code and FOLDER_PLACEHOLDER in code
    code = code.replace(FOLDER_PLACEHOLDER, str(saved_checkpoint))
    code += ("\nimport json, hrpo\nbase = model.get_base_model()\n"
             "print(json.dumps({'hrpo': hrpo.__file__, 'source': base.config.thinking_latent_source, "
             "'r': model.peft_config['default'].r, 'projection': type(base.model.thinking_projection).__name__, "
             "'pad': tokenizer.pad_token is not None}))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "load.py").write_text(code)
    result = run_child([sys.executable, "load.py"], cwd=elsewhere, env=without_pythonpath(), timeout=300,
                       what="the model card's loading code")
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"hrpo": str(REPO / "hrpo" / "__init__.py"), "source": "projection", "r": 4,
                      "projection": "ModulesToSaveWrapper", "pad": True}


def test_the_loader_imports_without_the_repository_on_the_import_path(tmp_path):
    """./setup.sh installs hrpo as a package: it imports from any folder without PYTHONPATH."""
    run_child([sys.executable, "-c", "from hrpo.checkpoint import load_checkpoint"], cwd=tmp_path,
              env=without_pythonpath(), timeout=120, what="import hrpo from another folder")
