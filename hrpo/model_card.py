"""The model card (README.md) of a trained HRPO output folder, in place of the one TRL writes.

TRL's card names no base model for a local one, shows a quick start that cannot load an HRPO
adapter and cites neither HRPO nor the forks it needs. This one says what was trained (LoRA
adapter and thinking modules, or plain GRPO), on what, with which main settings (learning rate,
steps, LoRA rank, beta, group size, temperatures; every setting in the run-settings file it
names), which thinking settings, how it scored on held-out data, and how to load it: the forks,
and ``hrpo.checkpoint.load_checkpoint`` with the repository's root on the import path (the
snippet runs from any folder; ``hrpo`` is not an installable package yet).

Plain text in, text out: ``model_card_text`` imports nothing heavy; the trainer collects the
inputs (``hrpo.trainer.HRPOModelCardMixin``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import RUN_SETTINGS

CARD_NAME = "README.md"
TAGS = ("hrpo", "grpo", "trl", "latent-reasoning")
# The latent sources that feed the learnable projection of the last hidden state.
PROJECTION_SOURCES = ("projection", "embedding_plus_projection")
INSTALL_LINE = "./setup.sh"  # README.md, "Setup and tests": the venv, pinned requirements, both forks
EVAL_COMMAND = "python eval_gsm8k.py --checkpoint_path {folder} --greedy"
# What a reader of the card fills in: where the HRPO repository is, where the run's folder is.
REPOSITORY_PLACEHOLDER = "path/to/HRPO"
FOLDER_PLACEHOLDER = "path/to/this/folder"
# The run's main settings, in the card's order: (key of ``training``, what the card calls it).
TRAINING_FACTS = (("learning_rate", "Learning rate (LoRA)"), ("steps", "Optimizer steps"),
                  ("lora_r", "LoRA rank"), ("lora_alpha", "LoRA alpha"), ("beta", "Beta (KL coefficient)"),
                  ("num_generations", "Group size (completions per prompt)"),
                  ("temperature", "Sampling temperature"), ("loss_temperature", "Loss temperature"))
# An evaluation at this step (eval_step0.json) scored the model before training, not the trained one.
UNTRAINED_STEP = 0

SOURCE_DESCRIPTIONS = {
    "embedding": "HRPO's own latent, the token embeddings weighted by the next-token probabilities",
    "projection": "a learnable projection of the last hidden state, in place of HRPO's embedding-based latent",
    "embedding_plus_projection": "HRPO's embedding-based latent plus a learnable projection of the last hidden "
                                 "state (zero at the start of training, so training starts as HRPO)",
}

HRPO_BIBTEX = """@article{yue2025hybrid,
  title   = {Hybrid Latent Reasoning via Reinforcement Learning},
  author  = {Yue, Zhenrui and Jin, Bowen and Zeng, Huimin and Zhuang, Honglei and Qin, Zhen and Yoon, Jinsung and Shang, Lanyu and Han, Jiawei and Wang, Dong},
  journal = {arXiv preprint arXiv:2505.18454},
  year    = {2025}
}"""
GRPO_BIBTEX = """@article{shao2024deepseekmath,
  title   = {DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models},
  author  = {Shao, Zhihong and Wang, Peiyi and Zhu, Qihao and Xu, Runxin and Song, Junxiao and Bi, Xiao and Zhang, Haowei and Zhang, Mingchuan and Li, Y. K. and Wu, Y. and Guo, Daya},
  journal = {arXiv preprint arXiv:2402.03300},
  year    = {2024}
}"""
TRL_BIBTEX = """@software{vonwerra2020trl,
  title  = {{TRL: Transformer Reinforcement Learning}},
  author = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
  url    = {https://github.com/huggingface/trl},
  year   = {2020}
}"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a hub repository ("owner/name") rather than a local path: only
    a hub id may go into the card's metadata (the hub refuses a path there)."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).expanduser().exists()


def uses_projection(thinking: dict | None) -> bool:
    return thinking is not None and thinking.get("thinking_latent_source") in PROJECTION_SOURCES


def front_matter(base_model: str, dataset: str | None) -> str:
    lines = ["---"]
    if is_hub_id(base_model):
        lines.append(f"base_model: {base_model}")
    lines += ["library_name: peft", "tags:", *(f"- {tag}" for tag in TAGS)]
    if is_hub_id(dataset):
        lines += ["datasets:", f"- {dataset}"]
    return "\n".join(lines + ["---"])


def title(base_model: str, hub_model_id: str | None, thinking: dict | None) -> str:
    if hub_model_id:
        return f"# {hub_model_id.split('/')[-1]}"
    return f"# {'HRPO' if thinking is not None else 'GRPO'} adapter for {Path(base_model).name or base_model}"


def summary(base_model: str, thinking: dict | None) -> str:
    if thinking is None:
        return (f"A LoRA adapter for `{base_model}` trained with plain GRPO: no hybrid latent reasoning, no thinking "
                f"modules; the model reasons in sampled tokens only. It is the baseline that HRPO runs are compared "
                f"with, trained by the same code with the same settings otherwise.")
    source = thinking.get("thinking_latent_source")
    latent = SOURCE_DESCRIPTIONS.get(source, f"the `{source}` source")
    projection = ("The learnable `thinking_projection` is used, and trained with the adapter." if uses_projection(
        thinking) else "The learnable `thinking_projection` is not used.")
    return (f"A LoRA adapter plus HRPO's thinking modules for `{base_model}`, trained with GRPO and HRPO's hybrid "
            f"latent reasoning: while the model reasons, its next input is a learned, gated mix of the sampled "
            f"token's embedding and a continuous latent. Here the latent is {latent}. {projection}")


def base_model_section(base_model: str) -> str:
    where = "a model on the Hugging Face hub" if is_hub_id(base_model) else "a local model (not on the hub)"
    return (f"## Base model\n\n`{base_model}`: {where}. Only the adapter and the thinking modules are in this "
            f"folder; the base weights are loaded from there.")


def training_section(task: str | None, dataset: str | None, thinking: dict | None,
                     training: dict | None = None) -> str:
    """``training``: the run's main settings by the keys of TRAINING_FACTS (a missing one is left
    out), and ``settings_file``, the run-settings file beside the adapter, if the run wrote one."""
    method = ("GRPO (TRL 1.15) with HRPO's hybrid rollouts and replay" if thinking is not None else
              "plain GRPO (TRL 1.15)")
    training = training or {}
    lines = ["## Training", "",
             f"- Task: `{task}`" if task else "- Task: not recorded",
             f"- Data: `{dataset}`" if dataset else "- Data: not recorded",
             f"- Method: {method}"]
    lines += [f"- {label}: `{training[key]}`" for key, label in TRAINING_FACTS if training.get(key) is not None]
    if training.get("settings_file"):
        lines.append(f"- Every setting of the run: `{training['settings_file']}`, beside the adapter (in each "
                     f"checkpoint-N, and in the output folder once training ends); `--resume` and "
                     f"`eval_gsm8k.py` read it")
    return "\n".join(lines)


def table_cell(value) -> str:
    return f"`{value}`".replace("|", "\\|")


def thinking_section(thinking: dict | None) -> str | None:
    if thinking is None:
        return None
    rows = [f"| `{key}` | {table_cell(value)} |" for key, value in thinking.items()]
    return "\n".join(["## Thinking settings", "", "Saved in `config.json`; the model is rebuilt from them.", "",
                      "| setting | value |", "|---|---|", *rows])


def evaluation_rows(metrics: dict) -> list[str]:
    rows = []
    if "accuracy" in metrics:
        counts = f" ({metrics['correct']}/{metrics['total']})" if "correct" in metrics and "total" in metrics else ""
        rows.append(f"| accuracy | {metrics['accuracy']:.4f}{counts} |")
    if "dataset_path" in metrics:
        split = f", split `{metrics['split']}`" if "split" in metrics else ""
        rows.append(f"| data | `{metrics['dataset_path']}`{split} |")
    if "step" in metrics:
        rows.append(f"| training step | {metrics['step']} |")
    if "greedy" in metrics:
        decoding = "greedy" if metrics["greedy"] else f"sampled at temperature {metrics.get('temperature')}"
        rows.append(f"| decoding | {decoding} |")
    if "thinking" in metrics:
        rows.append(f"| hybrid thinking | {'on' if metrics['thinking'] else 'off'} |")
    if "max_new_tokens" in metrics:
        rows.append(f"| max new tokens | {metrics['max_new_tokens']} |")
    return rows


def evaluation_section(evaluation: dict | None) -> str | None:
    metrics = (evaluation or {}).get("metrics")
    if not metrics:
        return None
    return "\n".join(["## Held-out evaluation", "", "| | value |", "|---|---|", *evaluation_rows(metrics)])


def install_note(thinking: dict | None) -> str:
    if thinking is None:
        return ("The loader below comes with the HRPO repository, installed with its forks of transformers and "
                "unsloth (the adapter itself is a plain PEFT LoRA adapter on the upstream model). In a clone of it:")
    return ("HRPO's thinking modules exist only in the HRPO repository's forks of transformers and unsloth: upstream "
            "transformers cannot load this folder. In a clone of that repository, install them with:")


def where_to_run() -> str:
    return (f"Then run the following with that environment's Python (`{REPOSITORY_PLACEHOLDER}/.venv/bin/python`, "
            f"where `{REPOSITORY_PLACEHOLDER}` is the clone, or the environment `./setup.sh --no-venv` installed "
            f"into), from any folder: `./setup.sh` installs `hrpo` itself as a package.")


def loading_snippet(hub_model_id: str | None) -> list[str]:
    """The imports, where the folder is, the loader."""
    load = "model, tokenizer = load_checkpoint(folder)  # base model, saved config (thinking fields), adapter"
    if hub_model_id:
        return ["from huggingface_hub import snapshot_download", "from hrpo.checkpoint import load_checkpoint",
                "", f'folder = snapshot_download("{hub_model_id}")', load]
    return ["from hrpo.checkpoint import load_checkpoint", "",
            f'folder = "{FOLDER_PLACEHOLDER}"  # the run\'s output folder, or a checkpoint-N in it', load]


def usage_section(thinking: dict | None, hub_model_id: str | None) -> str:
    decoding = ("Hybrid decoding takes `processing_class=tokenizer` in `model.generate` (and `is_inference=True` for "
                "greedy), as `hrpo/held_out.py` passes them." if thinking is not None else
                "It decodes tokens only, like any causal LM.")
    return "\n".join([
        "## How to load it", "", install_note(thinking), "",
        "```bash", f"{INSTALL_LINE}  # .venv with the pinned requirements and both forks", "```", "",
        where_to_run(), "", "```python", *loading_snippet(hub_model_id), "```", "", decoding, "",
        "Held-out accuracy, decoding as trained, in the clone (writes `eval_<data>_<split>.json` into the folder):", "",
        "```bash", EVAL_COMMAND.format(folder="FOLDER"), "```"])


def citation_section() -> str:
    return "\n".join(["## Citation", "", "HRPO:", "", "```bibtex", HRPO_BIBTEX, "```", "",
                      "GRPO:", "", "```bibtex", GRPO_BIBTEX, "```", "", "TRL:", "", "```bibtex", TRL_BIBTEX, "```"])


def model_card_text(*, base_model: str, task: str | None, dataset: str | None, thinking: dict | None,
                    evaluation: dict | None, hub_model_id: str | None = None, training: dict | None = None) -> str:
    """The README.md of an HRPO output folder (``thinking`` None: a plain-GRPO run;
    ``evaluation``: the JSON of eval_final.json / eval_<data>_<split>.json; ``training``: the
    run's main settings, see ``training_section``)."""
    sections = [front_matter(base_model, dataset), title(base_model, hub_model_id, thinking),
                summary(base_model, thinking), base_model_section(base_model),
                training_section(task, dataset, thinking, training), thinking_section(thinking),
                evaluation_section(evaluation), usage_section(thinking, hub_model_id),
                citation_section()]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(output_dir, **card) -> Path:
    """Write ``model_card_text(**card)`` to ``output_dir``/README.md."""
    path = Path(output_dir) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card_text(**card))
    return path


def latest_evaluation(output_dir) -> dict | None:
    """The newest eval_*.json in ``output_dir`` with metrics of the trained model (an evaluation
    at step 0, before training, is left out), or None."""
    found = []
    for path in Path(output_dir).glob("eval_*.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        metrics = result.get("metrics") if isinstance(result, dict) else None
        if isinstance(metrics, dict) and metrics.get("step") != UNTRAINED_STEP:
            found.append((path.stat().st_mtime_ns, path.name, result))
    return max(found, key=lambda item: item[:2])[2] if found else None


# ---------------------------------------------------------------- the trainers' card

def base_model_name(model) -> str | None:
    """The base model an adapter goes on: what the adapter config records (the loader reads
    it), else the base model config's ``_name_or_path``."""
    adapter = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(adapter, "base_model_name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def thinking_settings(config) -> dict | None:
    """Every hybrid-thinking field of a model config, or None for upstream's plain model."""
    from transformers.hybrid_thinking.config import ThinkingConfig, thinking_enabled

    return ThinkingConfig.from_config(config).to_dict() if thinking_enabled(config) else None


class HRPOModelCardMixin:
    """Our model card (``hrpo.model_card``) wherever TRL or transformers would write theirs:
    ``create_model_card`` (TRL calls it before each checkpoint, ``push_to_hub`` before the
    upload) and after ``save_model``, whose PEFT ``save_pretrained`` rewrites a folder's
    README.md (its own template, or our card with its tags replaced). The main process writes."""

    hrpo_task: str | None = None  # set by whoever builds the trainer
    hrpo_dataset: str | None = None

    def model_card_facts(self, folder) -> dict:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return {"base_model": base_model_name(model) or "unknown", "task": getattr(self, "hrpo_task", None),
                "dataset": getattr(self, "hrpo_dataset", None), "thinking": thinking_settings(base.config),
                "evaluation": latest_evaluation(folder),
                "hub_model_id": getattr(self, "hub_model_id", None) or self.args.hub_model_id,
                "training": self.training_facts(model)}

    def training_facts(self, model) -> dict:
        """The run's main settings as this trainer runs them (``hrpo.model_card.TRAINING_FACTS``):
        the optimizer steps taken so far, the adapter's rank, and the run-settings file when the run
        writes one beside its checkpoints."""
        args, adapter = self.args, getattr(model, "peft_config", {}).get("default")
        temperature = getattr(self, "loss_temperature", None)
        return {"learning_rate": args.learning_rate, "steps": self.state.global_step,
                "lora_r": getattr(adapter, "r", None), "lora_alpha": getattr(adapter, "lora_alpha", None),
                "beta": args.beta, "num_generations": args.num_generations, "temperature": args.temperature,
                "loss_temperature": temperature if temperature not in (None, args.temperature) else None,
                "settings_file": RUN_SETTINGS if getattr(self, "run_settings", None) is not None else None}

    def write_hrpo_model_card(self, folder) -> None:
        if self.is_world_process_zero():
            write_model_card(folder, **self.model_card_facts(folder))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """In place of TRL's card (its arguments are not used: the card describes the run)."""
        self.write_hrpo_model_card(self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        self.write_hrpo_model_card(self.args.output_dir if output_dir is None else output_dir)
