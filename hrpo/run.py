"""A training run from its settings (``hrpo.config``): the settings checked and resumed where asked
(``prepare``), the data, the trainer built (``build_trainer``) and trained (``train``). The
command line is ``hrpo.train``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .backend import grpo_trainer_base, import_unsloth
from .checkpoint import latest_complete_checkpoint
from .command_line import normalized_argv
from .config import Settings, check_settings, default_output_dir
from .errors import UsageError
from .settings_parser import SettingsParser, given_fields, parse_settings, raw_values, settings_parser
from .loading import load_model, load_tokenizer, model_config, resolve_backend, check_thinking_config
from .resume import check_output_dir, check_run_length, resume_checkpoint, take_checkpoint_settings
from .tasks import get_task


def load_dataset(settings: Settings):
    task = get_task(settings.task.task)
    return task.with_prompts(task.load(settings.task.dataset_path, settings.task.train_split),
                             settings.task.system_prompt)


def load_held_out(settings: Settings, training_rows):
    """The held-out rows (``HeldOut``), or None without --eval_samples; training rows among them
    are refused (see ``check_not_training_rows``)."""
    from .held_out import HeldOut, check_not_training_rows, held_out_source

    count = settings.training.eval_samples
    if not count:
        return None
    path, split = held_out_source(settings.task.eval_dataset_path, settings.task.eval_split,
                                  training_path=settings.task.dataset_path,
                                  allow_training_data=settings.training.eval_on_train_data)
    task = get_task(settings.task.task)
    dataset = task.load(path, split)
    rows = dataset.select(range(min(count, len(dataset)))).to_list()
    if split != "train":
        check_not_training_rows(rows, training_rows, f"the held-out data {path} ({split})",
                                settings.training.eval_on_train_data)
    return HeldOut(rows, {"dataset_path": path, "split": split}, task, settings.task.system_prompt, settings.hybrid)


def filter_long_prompts(settings: Settings, dataset, tokenizer):
    from .data import DataError

    limit = settings.training.max_prompt_length
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    if not keep:
        raise DataError(f"--max_prompt_length {limit}: every prompt of {settings.task.dataset_path} is longer (the "
                        f"shortest has {min(lengths)} tokens, the longest {max(lengths)}, with the chat template and "
                        f"system prompt)")
    if len(keep) < len(dataset):
        print(f"[hrpo] left out {len(dataset) - len(keep)} prompts longer than {limit} tokens")
        dataset = dataset.select(keep)
    return dataset


def reward_functions(settings: Settings) -> list:
    """--reward_funcs by import path, else the task's correctness reward."""
    import importlib

    if not settings.task.reward_funcs:
        return [get_task(settings.task.task).reward_function()]
    functions = []
    for path in settings.task.reward_funcs:
        module, _, name = path.rpartition(".")
        try:
            functions.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as err:
            raise UsageError(f"--reward_funcs {path}: cannot import it ({err})") from None
    return functions


def use_trainer_checkpointing(settings: Settings, cuda: bool) -> bool:
    """The trainer's gradient checkpointing; unsloth's backend on CUDA does its own ("unsloth")."""
    return bool(settings.training.gradient_checkpointing) and not (cuda and resolve_backend(settings) == "unsloth")


def build_trainer(settings: Settings, reward_funcs=None):
    """The trainer, ready to train (reward_funcs: default --reward_funcs or the task's reward)."""
    import torch

    cuda = torch.cuda.is_available()
    if resolve_backend(settings) == "unsloth":
        import_unsloth(cuda)  # before TRL: on CUDA it replaces trl.GRPOTrainer by its rewrite
    else:
        from .cpu_logprob import route_trl_fused_head

        route_trl_fused_head()  # TRL's log-prob kernel is Triton; without CUDA it cannot run
    from .no_signal import NoSignalWarning
    from .trainer import trainer_class

    dataset = load_dataset(settings)  # data errors before the (slow) model load
    held_out = load_held_out(settings, dataset)
    rewards = reward_funcs or reward_functions(settings)
    config = model_config(settings)  # its errors before the tokenizer's
    dataset = filter_long_prompts(settings, dataset, load_tokenizer(settings))  # before the model loads
    model, tokenizer = load_model(settings, cuda, config)
    check_thinking_config(model, settings)
    training = settings.training
    training.gradient_checkpointing = use_trainer_checkpointing(settings, cuda)
    trainer_type = trainer_class(settings.hybrid, grpo_trainer_base(resolve_backend(settings), cuda))
    eval_dataset = dataset.select(range(1)) if held_out and training.eval_strategy != "no" else None
    trainer = trainer_type(model=model, processing_class=tokenizer, reward_funcs=rewards, args=training,
                           train_dataset=dataset, eval_dataset=eval_dataset)
    trainer.add_callback(NoSignalWarning())
    trainer.held_out = held_out
    trainer.run_settings = run_settings_record(settings)
    trainer.hrpo_task, trainer.hrpo_dataset = settings.task.task, settings.task.dataset_path
    trainer.create_optimizer()
    return trainer


def run_settings_record(settings: Settings) -> dict:
    """What the run-settings file holds: every field, and which ones the user set."""
    flat = settings.flat()
    return {"settings": json.loads(json.dumps(flat, default=str)), "given": sorted(settings.given),
            # the fields eval_gsm8k.py reads, at the top level as earlier versions wrote them
            **{key: flat[key] for key in ("task", "dataset_path", "system_prompt", "temperature", "hybrid_thinking",
                                          "max_completion_length")}}


def train(settings: Settings) -> Path:
    output_dir = Path(settings.training.output_dir)
    trainer = build_trainer(settings)
    resume_from = resume_checkpoint(settings)
    if resume_from and os.environ.get("LOCAL_RANK", "0") == "0":
        skipped = latest_complete_checkpoint(output_dir)[1]
        lines = [f"[hrpo] --resume: continuing from {resume_from} (complete)"]
        if settings.training.resume == "latest":
            lines += [f"[hrpo] --resume: skipped {partial} (partial: {why})" for partial, why in skipped]
        print("\n".join(lines), flush=True)
    if resume_from:
        trainer.args.eval_on_start = False  # the run was evaluated at its start
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_model(str(output_dir))
    if trainer.args.should_save:  # with several processes: the main one writes
        trainer.save_run_settings(output_dir)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.evaluate(file_name="eval_final.json")
    trainer.create_model_card()  # with the final evaluation
    trainer.close_engine()
    return output_dir


def prepare(argv: list[str], parser: SettingsParser | None = None) -> Settings:
    """The run's settings, resumed where asked, every check done: nothing loaded yet."""
    parser = parser or settings_parser()
    values = raw_values(parser, argv)
    given = given_fields(parser, normalized_argv(list(argv)))
    if Path(values.model_name_or_path).expanduser().is_dir():  # as checkpoints record it: works from anywhere
        values.model_name_or_path = str(Path(values.model_name_or_path).expanduser().resolve())
    output_dir = Path(values.output_dir) if values.output_dir else default_output_dir(values)
    if values.resume:
        take_checkpoint_settings(values, given, output_dir, parser)
    settings = parse_settings(argv, parser)
    settings.training.output_dir = str(output_dir)
    if Path(settings.model.model_name_or_path).expanduser().is_dir():
        settings.model.model_name_or_path = str(Path(settings.model.model_name_or_path).expanduser().resolve())
    check_settings(settings)
    check_output_dir(settings)
    check_run_length(settings)
    return settings
