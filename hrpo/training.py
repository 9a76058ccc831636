"""A training run from its settings (``hrpo.config``): resume, model loading for both
backends, the trainer, held-out evaluation. The command line is ``hrpo.train``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from .backend import import_unsloth
from .checkpoint import RUN_SETTINGS, CheckpointError, latest_complete_checkpoint, read_run_settings
from .config import (HYBRID_MODEL_TYPES, Settings, SettingsParser, UsageError, check_settings, default_output_dir,
                     given_fields, normalized_argv, parse_settings, raw_values, settings_parser)
from .tasks import get_task

# Fields a resumed run may change: where and how often it logs, saves and evaluates, how long it
# runs, where it reports. Every other saved setting comes from the checkpoint.
RESUME_MAY_CHANGE = {"output_dir", "resume", "resume_from_checkpoint", "max_steps", "num_train_epochs", "report_to",
                     "extend_lr_schedule",
                     "run_name", "push_to_hub", "thinking_monitor_every", "backend", "disable_tqdm",
                     "eval_dataset_path", "eval_split", "eval_on_train_data", "eval_samples", "reward_funcs",
                     "compile_rollouts"}
RESUME_MAY_CHANGE_PREFIXES = ("eval_", "logging_", "save_", "hub_", "log_", "dataloader_", "num_completions")
# Resolved when not given, from the machine (hrpo.config.HRPOConfig) or from other fields (TRL's GRPOConfig,
# transformers' TrainingArguments): restored only where the run set them.
DERIVED_DEFAULTS = {"bf16", "fp16", "use_cpu", "gradient_checkpointing", "dtype", "generation_batch_size",
                    "steps_per_generation", "do_eval", "disable_tqdm", "logging_dir"}


# ---------------------------------------------------------------- resume

def resume_checkpoint(settings: Settings) -> Path | None:
    """The checkpoint --resume continues from (see ``find_checkpoint``)."""
    return find_checkpoint(settings.training.resume, Path(settings.training.output_dir))


def find_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``resume`` "latest"), or the complete
    checkpoint folder given (a path, or a name inside ``output_dir``)."""
    from .checkpoint import incomplete_reason

    if not resume:
        return None
    if resume == "latest":
        return latest_complete_checkpoint(output_dir)[0]
    folder = Path(resume).expanduser()
    if not folder.is_dir() and (output_dir / resume).is_dir():
        folder = output_dir / resume
    if not folder.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint folder (a path, or a checkpoint-N folder in "
                         f"--output_dir {output_dir})")
    reason = incomplete_reason(folder)
    if reason is not None:
        raise UsageError(f"--resume {resume}: {folder} is not a complete checkpoint ({reason})")
    return folder


def check_output_dir(settings: Settings) -> None:
    from .checkpoint import COMPLETE_MARKER

    output_dir = Path(settings.training.output_dir)
    if settings.training.resume and settings.training.resume != "latest":
        resume_checkpoint(settings)  # names a bad folder
    elif settings.training.resume:
        folder, skipped = latest_complete_checkpoint(output_dir)
        if folder is None:
            partial = "".join(f"; {folder.name} is partial ({why})" for folder, why in skipped)
            hint = (f". A checkpoint written before completion markers existed can be declared complete with "
                    f"`python -m hrpo.checkpoint --mark-complete FOLDER` ({COMPLETE_MARKER})") if skipped else ""
            raise UsageError(f"--resume: no complete checkpoint-* folder in --output_dir {output_dir} to resume "
                             f"from{partial}{hint}")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise UsageError(f"--output_dir {output_dir} exists and is not empty: pass --resume to continue from its "
                         f"last checkpoint, or choose another --output_dir")


def saved_settings(folder: Path, parser: SettingsParser) -> tuple[dict, dict]:
    """What a checkpoint was trained with, by field name: (every setting a resumed run may not
    change, with the value it had; those to set again: every one of them, whether the run was
    given it, took an entry script's default or a default that has changed since, except the
    ones resolved from the machine or from other fields where the run did not set them). From
    its run-settings file, with the thinking fields of its config.json (what the model was
    built with) over them. A file of an earlier version (flag names as keys, every flag
    listed) is read too."""
    from transformers.hybrid_thinking.config import ThinkingConfig, thinking_enabled

    config_file = folder / "config.json"
    try:
        run = read_run_settings(folder)
        config = json.loads(config_file.read_text()) if config_file.exists() else None
    except (CheckpointError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume: {folder}: {err}") from None
    if run is None and config is None:
        raise UsageError(f"--resume: {folder} has neither {RUN_SETTINGS} nor config.json: its settings are unknown")
    run = run or {}
    names = parser.field_names()
    values = run.get("settings", run)
    given = set(run["given"]) if "given" in run else {names.get(key) for key in values} - DERIVED_DEFAULTS
    effective, restore = {}, {}
    for key, value in values.items():
        name = names.get(key)
        if name is None or name in RESUME_MAY_CHANGE or name.startswith(RESUME_MAY_CHANGE_PREFIXES):
            continue
        effective[name] = value
        if (name in given or name not in DERIVED_DEFAULTS) and not isinstance(value, dict):
            restore[name] = value
    if thinking_enabled(SimpleNamespace(**(config or {}))):  # fields it predates take their defaults
        fields = ThinkingConfig.from_config(SimpleNamespace(**config)).to_dict()
        thinking = {k: v for k, v in fields.items() if k != "answer_marker"}
        effective.update(thinking)
        restore.update(thinking)
    return effective, restore


def take_checkpoint_settings(values, given: set[str], output_dir: Path, parser: SettingsParser) -> None:
    """On --resume, the checkpoint's settings become the parser's defaults: a field left out
    takes the checkpoint's value, a field given with another value is an error (it would
    continue a different run on the same weights). ``values``: the raw values given."""
    folder = find_checkpoint(values.resume, output_dir)
    if folder is None:
        return  # check_output_dir says so
    effective, restore = saved_settings(folder, parser)
    for name in sorted(given & set(effective)):
        current = getattr(values, name, None)
        if _comparable(current) != _comparable(effective[name]):
            raise UsageError(f"--{name} {current!r} conflicts with the checkpoint being resumed ({folder}): "
                             f"it was trained with --{name} {effective[name]!r}. Leave the flag out to continue with "
                             f"the checkpoint's value, or start a new run in another --output_dir")
    parser.set_defaults(**{name: value for name, value in restore.items() if name not in given})


def _comparable(value):
    value = getattr(value, "value", value)  # transformers' enums
    return [_comparable(v) for v in value] if isinstance(value, (list, tuple)) else value


def finished_run(settings: Settings) -> str | None:
    """On --resume: why the run in --output_dir is finished (its final files are there and it
    reached the asked --max_steps, or ran the asked epochs with --max_steps -1), else None."""
    output_dir = Path(settings.training.output_dir)
    history = output_dir / "log_history.json"
    if not settings.training.resume or not history.exists():
        return None
    steps = [row["step"] for row in json.loads(history.read_text()) if "step" in row]
    done = max(steps, default=0)
    training = settings.training
    if training.max_steps > 0:
        return None if training.max_steps > done else f"it finished at step {done} ({history} is its final log)"
    final = _saved_values(output_dir)
    if final.get("max_steps", -1) > 0 or final.get("num_train_epochs") != training.num_train_epochs:
        return None  # it ran another length than the epochs asked for now: asked to train on
    return f"it finished its {training.num_train_epochs:g} epoch(s) at step {done} ({history} is its final log)"


def _saved_values(folder: Path) -> dict:
    """A run-settings file's values by name ({} without one)."""
    run = read_run_settings(folder) or {}
    return run.get("settings", run)


# Schedules whose multiplier does not depend on the run's length (constant_with_warmup does, through a warmup ratio).
LENGTH_FREE_SCHEDULES = {"constant", "reduce_lr_on_plateau"}


def schedule_depends_on_length(training) -> bool:
    name = str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type))
    if name == "constant_with_warmup":
        return 0 < training.warmup_steps < 1
    return name not in LENGTH_FREE_SCHEDULES


def lr_multiplier(training, total_steps: int, step: int) -> float:
    """The schedule's learning-rate multiplier at ``step`` of a ``total_steps`` run (transformers' own
    schedule, warmup as the Trainer computes it)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer, training.get_warmup_steps(total_steps),
                              total_steps, scheduler_specific_kwargs=training.lr_scheduler_kwargs or {})
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def check_run_length(settings: Settings) -> None:
    """On --resume: another run length than the checkpoint's would silently reshape the learning-
    rate schedule (a finished 30-step cosine run resumed for 60 steps jumps from multiplier 0 back
    to 0.59). That is an error unless --extend_lr_schedule asks for it; then it is said."""
    from .checkpoint import checkpoint_step

    folder, training = resume_checkpoint(settings), settings.training
    saved = _saved_values(folder) if folder else {}
    if "max_steps" not in saved or not schedule_depends_on_length(training):
        return
    old = (saved["max_steps"], saved.get("num_train_epochs", training.num_train_epochs))
    new = (training.max_steps, training.num_train_epochs)
    step = checkpoint_step(folder) or 0
    if old[0] == new[0] and (new[0] > 0 or old[1] == new[1]) or 0 < new[0] <= step:
        return  # the same length, or nothing left to train
    length = lambda steps, epochs: f"--max_steps {steps}" if steps > 0 else f"--num_train_epochs {epochs:g}"
    change = f"{length(*old)} -> {length(*new)}"
    if old[0] > 0 and new[0] > 0:
        change += (f": at step {step} the learning-rate multiplier goes {lr_multiplier(training, old[0], step):.3f} "
                   f"-> {lr_multiplier(training, new[0], step):.3f}")
    schedule = f"the {training.lr_scheduler_type.value} learning-rate schedule"
    if not training.extend_lr_schedule:
        raise UsageError(f"--resume from {folder} with another run length ({change}) would rebuild {schedule} over "
                         f"the new length. Pass --extend_lr_schedule to do so, keep the checkpoint's length, or start "
                         f"a new run in another --output_dir")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[hrpo] --extend_lr_schedule: {schedule} is rebuilt over the new length ({change})", flush=True)


# ---------------------------------------------------------------- model

def resolve_backend(settings: Settings) -> str:
    """auto: unsloth, a dependency of the project, so it is always there. On CPU that is
    unsloth's CPU mode (the fork's own forward, TRL's own trainer); on CUDA its fast paths and
    GRPO rewrite, which the forks carry HRPO through."""
    return "unsloth" if settings.training.backend == "auto" else settings.training.backend


def load_model(settings: Settings, cuda: bool):
    """LoRA on the target modules, the thinking modules of the source trained in full.

    Hybrid thinking is opt-in by configuration: the thinking fields go onto the config before
    the model is built, so the fork builds the modules (only those the source uses). With
    --hybrid_thinking off the config is left as it is: upstream's model."""
    from transformers import set_seed

    set_seed(settings.training.seed)  # the thinking modules (gates, Lambda, projection) are drawn while the model is built
    config = model_config(settings)
    loader = load_with_transformers if resolve_backend(settings) == "transformers" else load_with_unsloth
    model, tokenizer = loader(settings, config, cuda)
    if settings.hybrid and os.environ.get("LOCAL_RANK", "0") == "0":
        from transformers.hybrid_thinking.modeling import thinking_module_names

        names = ", ".join(thinking_module_names(settings.thinking.thinking_latent_source))
        if settings.training.resume:
            print(f"[hrpo] thinking modules {names}: restored from the checkpoint when training starts", flush=True)
        else:
            print(f"[hrpo] new thinking modules, trained from here (seed {settings.training.seed}): {names}",
                  flush=True)
    return model, tokenizer


def model_config(settings: Settings):
    """The model's config, with the thinking fields when hybrid (a model type without the thinking
    modules is a UsageError)."""
    from transformers import AutoConfig

    model_args = settings.model
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                            trust_remote_code=settings.training.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load its config ({err})") from None
    if settings.hybrid:
        if config.model_type not in HYBRID_MODEL_TYPES:
            names = f" ({', '.join(config.architectures)})" if config.architectures else ""
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: a {config.model_type} "
                             f"model{names}; HRPO's thinking modules exist for "
                             f"{' and '.join(HYBRID_MODEL_TYPES)} models (Qwen2 / Qwen2.5, Llama). Use one of those, "
                             f"or --hybrid_thinking off for plain GRPO")
        settings.thinking.apply_to(config)
    return config


def _dtype(settings: Settings, cuda: bool):
    import torch

    name = settings.model.dtype
    if name in (None, "auto"):
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    return getattr(torch, name)


def load_with_unsloth(settings: Settings, config, cuda: bool):
    """unsloth's loader and LoRA (its fast paths on CUDA; the fork's forward on CPU)."""
    from unsloth import FastLanguageModel

    from .data import left_padded

    m, t = settings.model, settings.training
    model, tokenizer = FastLanguageModel.from_pretrained(
        m.model_name_or_path, config=config, max_seq_length=t.max_prompt_length + t.max_completion_length,
        load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit, revision=m.model_revision,
        trust_remote_code=settings.training.trust_remote_code, attn_implementation=m.attn_implementation,
        dtype=None if cuda and m.dtype in (None, "auto") else _dtype(settings, cuda))
    model = FastLanguageModel.get_peft_model(
        model, r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules,
        modules_to_save=modules_to_save(settings), use_rslora=m.use_rslora,
        use_gradient_checkpointing="unsloth" if cuda and t.gradient_checkpointing else False,
        random_state=t.seed)
    return model, left_padded(tokenizer, model.generation_config.eos_token_id)


def load_with_transformers(settings: Settings, config, cuda: bool):
    """transformers' loader and PEFT's LoRA; the thinking copies trained in float32 as unsloth trains them."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.hybrid_thinking.modeling import THINKING_MODULES
    from trl import get_quantization_config

    from .data import left_padded

    m = settings.model
    quantization = get_quantization_config(m)
    model = AutoModelForCausalLM.from_pretrained(
        m.model_name_or_path, config=config, dtype=_dtype(settings, cuda), revision=m.model_revision,
        trust_remote_code=settings.training.trust_remote_code, attn_implementation=m.attn_implementation,
        quantization_config=quantization)
    if cuda and quantization is None:
        model.to("cuda")
    model = get_peft_model(model, LoraConfig(
        r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules,
        modules_to_save=modules_to_save(settings), use_rslora=m.use_rslora, use_dora=m.use_dora,
        task_type=m.lora_task_type))
    for name, module in model.named_modules():  # thinking copies train in float32, as unsloth does
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in THINKING_MODULES:
            module.modules_to_save["default"].float().requires_grad_(True)
    tokenizer = AutoTokenizer.from_pretrained(m.model_name_or_path, revision=m.model_revision,
                                              trust_remote_code=settings.training.trust_remote_code)
    return model, left_padded(tokenizer, model.generation_config.eos_token_id)


def modules_to_save(settings: Settings) -> list[str] | None:
    """The thinking modules the source uses are trained in full with HRPO (the model has no
    others; plain GRPO builds none), with any --lora_modules_to_save."""
    from transformers.hybrid_thinking.modeling import thinking_module_names

    names = list(settings.model.lora_modules_to_save or [])
    if settings.hybrid:
        names += list(thinking_module_names(settings.thinking.thinking_latent_source))
    return names or None


def check_thinking_config(model, settings: Settings) -> None:
    """The loaded model must carry the thinking options asked for (they shape its modules)."""
    if not settings.hybrid:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, wanted in settings.thinking.to_dict().items():
        got = getattr(base.config, key, None)
        if got != wanted:
            raise UsageError(f"the loaded model has {key}={got!r}, but {wanted!r} was asked for: the loader "
                             f"dropped the config (--backend {settings.training.backend})")


# ---------------------------------------------------------------- data

def load_dataset(settings: Settings):
    task = get_task(settings.task.task)
    return task.with_prompts(task.load(settings.task.dataset_path, "train"), settings.task.system_prompt)


def load_held_out(settings: Settings, training_rows):
    """The held-out rows (``HeldOut``), or None without --eval_samples; training rows among them
    are refused (see ``check_not_training_rows``)."""
    from .evaluation import HeldOut, check_not_training_rows, held_out_source

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


def load_tokenizer(settings: Settings):
    from transformers import AutoTokenizer

    m = settings.model
    try:
        return AutoTokenizer.from_pretrained(m.model_name_or_path, revision=m.model_revision,
                                             trust_remote_code=settings.training.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {m.model_name_or_path}: cannot load its tokenizer ({err})") from None


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


# ---------------------------------------------------------------- trainer

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
    from .trainer import GRPOTrainerWithCompleteCheckpoints, HRPOTrainer

    dataset = load_dataset(settings)  # data errors before the (slow) model load
    held_out = load_held_out(settings, dataset)
    rewards = reward_funcs or reward_functions(settings)
    model_config(settings)  # its errors before the tokenizer's
    dataset = filter_long_prompts(settings, dataset, load_tokenizer(settings))  # before the model loads
    model, tokenizer = load_model(settings, cuda)
    check_thinking_config(model, settings)
    training = settings.training
    training.gradient_checkpointing = use_trainer_checkpointing(settings, cuda)
    extra = {"thinking_monitor_every": training.thinking_monitor_every} if settings.hybrid else {}
    trainer_class = HRPOTrainer if settings.hybrid else GRPOTrainerWithCompleteCheckpoints
    eval_dataset = dataset.select(range(1)) if held_out and training.eval_strategy != "no" else None
    trainer = trainer_class(model=model, processing_class=tokenizer, reward_funcs=rewards, args=training,
                            train_dataset=dataset, eval_dataset=eval_dataset, **extra)
    trainer.add_callback(NoSignalWarning())
    trainer.held_out = held_out
    trainer.run_settings = run_settings_record(settings)
    trainer.hrpo_task, trainer.hrpo_dataset = settings.task.task, settings.task.dataset_path
    trainer.thinking_learning_rates = (training.lr_residual_gate, training.lr_residual_Lambda,
                                       training.lr_thinking_projection)
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
    return output_dir


def close_process_group() -> None:
    """After a multi-process run: every rank past a barrier, then the process group torn down,
    so that no rank exits while a peer still talks to it (an abort at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
