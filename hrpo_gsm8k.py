#!/usr/bin/env python3
"""GRPO training with HRPO hybrid latent reasoning and the thinking projection (GSM8K by default).

    python hrpo_gsm8k.py --lr_thinking_projection 1e-4                 # HRPO's recipe, Qwen2.5-1.5B
    python hrpo_gsm8k.py --model_name ./my-model --dataset_path train.jsonl --output_dir runs/x
    python hrpo_gsm8k.py ... --resume                                   # continue from the last checkpoint
    python hrpo_gsm8k.py ... --hybrid_thinking off                      # plain GRPO, same everything else
    python hrpo_gsm8k.py --task arith --eval_samples 64 --eval_on_start # offline task, held-out accuracy

Defaults are HRPO's published recipe; the seed adds --lr_thinking_projection and the
projection's latent source and options. Every input is checked before training starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from hrpo import LORA_TARGETS
from hrpo.sampling import NEUTRAL_SAMPLING
from hrpo.tasks import SYSTEM_PROMPTS, TASK_NAMES, get_task

RUN_CONFIG = "hrpo_run.json"
EVAL_FILES = {"start": "eval_step0.json", "end": "eval_final.json"}
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


class UsageError(ValueError):
    """Bad input, reported before any training starts."""


def build_parser() -> argparse.ArgumentParser:
    """The flags; the thinking fields (--thinking_*) come from the fork's ThinkingConfig, their one home."""
    from transformers import HfArgumentParser
    from transformers.hybrid_thinking.config import ThinkingConfig

    p = HfArgumentParser(ThinkingConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_name", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub name or local folder of a Qwen2/Llama model")
    a("--task", default="gsm8k", choices=TASK_NAMES,
      help="gsm8k: GSM8K word problems; arith: generated arithmetic problems in GSM8K's format (offline); "
           "math: MATH (hrpo_math.py); mmlu: multiple-choice STEM questions (hrpo_mmlu.py)")
    a("--dataset_path", default=None,
      help="hub dataset name or local .jsonl/.json/.parquet in the task's format (default: the task's, "
           "openai/gsm8k for gsm8k; for arith 'generated' or 'generated:D' with difficulty D in 1-3; "
           "EleutherAI/hendrycks_math or a MATH folder for math; cais/mmlu for mmlu)")
    a("--system_prompt", default="hrpo",
      help=f"one of {sorted(SYSTEM_PROMPTS)} (hrpo: the paper's prompt format) or a prompt text containing the "
           f"answer marker")
    a("--hybrid_thinking", default="on", choices=["on", "off"],
      help="on: HRPO (hybrid rollouts, thinking modules trained); off: plain GRPO with TRL's own trainer on the "
           "same model, LoRA, data, prompts and optimizer (the baseline)")
    a("--output_dir", default=None, help="experiment folder (default: experiments/<model>-<latent source>)")
    a("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="continue from the newest complete checkpoint in --output_dir, or from the checkpoint-N folder given; "
           "a finished run is reported and left as it is")
    a("--lora_rank", type=int, default=32, help="LoRA rank (alpha = 2 x rank) on the 7 projection modules")
    a("--lr", type=float, default=5e-6, help="learning rate of the LoRA weights")
    a("--beta", type=float, default=0.005, help="KL coefficient against the reference (adapter disabled)")
    a("--lr_residual_gate", type=float, default=1e-4, help="learning rate of thinking_residual_gate_r/_i")
    a("--lr_residual_Lambda", type=float, default=1e-3, help="learning rate of thinking_residual_Lambda")
    a("--lr_thinking_projection", type=float, default=1e-4, help="learning rate of thinking_projection (the seed)")
    a("--loss_type", default="grpo", choices=LOSS_TYPES,
      help="TRL's loss aggregation; grpo (HRPO's): per-sequence mean, then mean over the batch")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.99, help="HRPO's 0.99 (TRL/transformers default 0.999)")
    a("--weight_decay", type=float, default=0.1)
    a("--warmup_ratio", type=float, default=0.1)
    a("--lr_scheduler_type", default="cosine")
    a("--optimizer", default=None, help="transformers optim name (default: paged_adamw_8bit on CUDA, adamw_torch on CPU)")
    a("--max_grad_norm", type=float, default=0.1)
    a("--group_size", type=int, default=4, help="completions per prompt (GRPO group)")
    a("--temperature", type=float, default=0.5)
    a("--gradient_accumulation_steps", type=int, default=4)
    a("--per_device_train_batch_size", type=int, default=8, help="completions per device per micro-batch")
    a("--max_prompt_length", type=int, default=1024, help="prompts longer than this (tokens) are left out")
    a("--max_completion_length", type=int, default=1024)
    a("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: one epoch)")
    a("--num_train_epochs", type=float, default=1.0)
    a("--save_steps", type=int, default=250)
    a("--save_total_limit", type=int, default=3)
    a("--logging_steps", type=int, default=1)
    a("--thinking_monitor_every", type=int, default=None,
      help="every N optimizer steps, also compute HRPO's embedding latent on the rollouts and log its cosine to "
           "the projection latent (thinking_projection/cosine_to_embedding_latent); it costs a vocabulary x hidden "
           "product per decoding step of those rollouts. Default: every 10 x --logging_steps; 0: never")
    a("--report_to", default="none", help="none, wandb or tensorboard (when installed)")
    a("--seed", type=int, default=42)
    a("--eval_samples", type=int, default=0,
      help="held-out problems evaluated (greedy, as trained) after training; 0: none")
    a("--eval_on_start", action="store_true", help="also evaluate them before the first step")
    a("--eval_dataset_path", default=None,
      help="held-out data (default: the held-out split --eval_split of --dataset_path's source; a single local "
           "training file has none: name a held-out file here, or pass --eval_on_train_data)")
    a("--eval_split", default="test")
    a("--eval_on_train_data", action="store_true",
      help="let the held-out evaluation read a single local training file (it then scores training rows, and "
           "records the split as train)")
    a("--gradient_checkpointing", default="auto", choices=["auto", "on", "off"],
      help="recompute activations in the backward pass (auto: on with CUDA)")
    a("--backend", default="auto", choices=["auto", "unsloth", "transformers"],
      help="how the model is loaded and trained: unsloth (FastLanguageModel; on CUDA its fast forward paths and "
           "GRPO rewrite, forked for HRPO), or transformers + PEFT with TRL's own GRPOTrainer (the reference "
           "path; unsloth is then not imported). auto: unsloth, on CPU too (its CPU mode runs the fork's own "
           "forward under TRL's own trainer; the path the test suite covers)")
    return p


def parser_with_defaults(description: str, **defaults) -> argparse.ArgumentParser:
    """This script's parser with a task's defaults (hrpo_math.py, hrpo_mmlu.py)."""
    parser = build_parser()
    parser.description = description
    parser.set_defaults(**defaults)
    return parser


def default_output_dir(args) -> Path:
    model = Path(args.model_name.rstrip("/")).name
    arm = args.thinking_latent_source if args.hybrid_thinking == "on" else "grpo"
    return Path("experiments") / f"{model}-{args.task}-{arm}-lr{args.lr_thinking_projection:g}"


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint-N (a partial one, whose save a kill cut short, is passed over)."""
    from hrpo.checkpoint import latest_complete_checkpoint

    return latest_complete_checkpoint(output_dir)[0]


def resume_report(output_dir: Path) -> str:
    """Which checkpoint --resume takes, and which partial ones it passes over (and why)."""
    from hrpo.checkpoint import latest_complete_checkpoint

    folder, skipped = latest_complete_checkpoint(output_dir)
    lines = [f"[hrpo] --resume: continuing from {folder} (complete)"]
    lines += [f"[hrpo] --resume: skipped {partial} (partial: {why})" for partial, why in skipped]
    return "\n".join(lines)


def check_args(args, world_size: int = 1, given: set[str] = frozenset()) -> None:
    """Everything that can be checked without loading the model or the data (``given``: the
    flags on the command line)."""
    check_values(args)
    check_combinations(args, given)
    if args.group_size < 2:
        raise UsageError(f"--group_size {args.group_size}: GRPO needs at least 2 completions per prompt")
    per_generation = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    if per_generation % args.group_size:
        raise UsageError(
            f"--group_size {args.group_size} does not divide the completions per generation batch "
            f"(--per_device_train_batch_size {args.per_device_train_batch_size} x --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps} x {world_size} processes = {per_generation})")
    from hrpo.tasks import system_prompt_text

    try:
        thinking_config(args)
    except ValueError as err:
        raise UsageError(f"the thinking options: {err}") from None
    try:
        system_prompt_text(args.system_prompt, get_task(args.task).answer_marker)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.eval_samples:
        from hrpo.data import DataError
        from hrpo.evaluation import held_out_source

        try:
            held_out_source(args.eval_dataset_path, args.eval_split, training_path=args.dataset_path,
                            allow_training_data=args.eval_on_train_data)
        except DataError as err:
            raise UsageError(f"--eval_samples {args.eval_samples}: {err}") from None
    # a hub name is "org/name"; a path that starts like one of this machine's folders is local
    first = Path(args.model_name).expanduser().parts[0] if args.model_name else ""
    looks_local = (args.model_name.startswith((".", "/", "~")) or args.model_name.count("/") > 1
                   or (args.model_name.count("/") == 1 and Path(first).is_dir()))
    if looks_local and not Path(args.model_name).expanduser().is_dir():
        raise UsageError(f"--model_name {args.model_name}: no such model folder")
    output_dir = Path(args.output_dir)
    if args.resume and args.resume != "latest":
        resume_checkpoint(args)  # names a bad folder
    elif args.resume:
        if last_checkpoint(output_dir) is None:
            from hrpo.checkpoint import COMPLETE_MARKER, latest_complete_checkpoint

            skipped = latest_complete_checkpoint(output_dir)[1]
            partial = "".join(f"; {folder.name} is partial ({why})" for folder, why in skipped)
            hint = (f". A checkpoint written before completion markers existed can be declared complete with "
                    f"`python -m hrpo.checkpoint --mark-complete FOLDER` ({COMPLETE_MARKER})") if skipped else ""
            raise UsageError(f"--resume: no complete checkpoint-* folder in --output_dir {output_dir} to resume "
                             f"from{partial}{hint}")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise UsageError(f"--output_dir {output_dir} exists and is not empty: pass --resume to continue from its "
                         f"last checkpoint, or choose another --output_dir")


POSITIVE = ("lr", "lr_residual_gate", "lr_residual_Lambda", "lr_thinking_projection", "temperature", "lora_rank",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length", "max_prompt_length",
            "save_steps", "logging_steps")
NON_NEGATIVE = ("beta", "weight_decay", "max_grad_norm", "warmup_ratio", "eval_samples", "adam_beta1", "adam_beta2",
                "save_total_limit", "thinking_monitor_every")
# settings that only matter to hybrid thinking, or to a source with a projection
HYBRID_MODEL_TYPES = ("qwen2", "llama")  # the architectures the transformers fork wires hybrid thinking into
HYBRID_ONLY = ("lr_residual_gate", "lr_residual_Lambda", "lr_thinking_projection", "thinking_monitor_every")


def check_values(args) -> None:
    """Each value on its own, against what it may be."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for name in POSITIVE:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UsageError(f"--{name} {getattr(args, name)}: expected a value > 0")
    for name in NON_NEGATIVE:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name} {getattr(args, name)}: expected a value >= 0")
    if args.adam_beta1 >= 1 or args.adam_beta2 >= 1:
        raise UsageError(f"--adam_beta1 {args.adam_beta1} / --adam_beta2 {args.adam_beta2}: expected values < 1")
    for name, kind in (("optimizer", OptimizerNames), ("lr_scheduler_type", SchedulerType)):
        value = getattr(args, name)
        if value is not None and value not in {member.value for member in kind}:
            raise UsageError(f"--{name} {value}: not one of transformers' {kind.__name__}: "
                             f"{', '.join(sorted(member.value for member in kind))}")
    check_report_to(args.report_to)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir}: is a file, expected a folder")


def check_report_to(report_to: str) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = {"none", "all", *INTEGRATION_TO_CALLBACK}
    unknown = [name for name in str(report_to).replace(",", " ").split() if name not in known]
    if unknown:
        raise UsageError(f"--report_to {report_to}: {', '.join(unknown)} is not one of {', '.join(sorted(known))}")


def check_combinations(args, given: set[str]) -> None:
    """Settings that another one makes meaningless are an error when given, not ignored."""
    from dataclasses import fields

    from transformers.hybrid_thinking.config import ThinkingConfig

    if args.hybrid_thinking == "off":
        ignored = sorted(given & ({f.name for f in fields(ThinkingConfig)} | set(HYBRID_ONLY)))
        if ignored:
            raise UsageError(f"{', '.join('--' + name for name in ignored)}: no effect with --hybrid_thinking off "
                             f"(plain GRPO builds no thinking modules); leave them out, or use --hybrid_thinking on")
    elif args.thinking_latent_source == "embedding" and "lr_thinking_projection" in given:
        raise UsageError("--lr_thinking_projection: no effect with --thinking_latent_source embedding, which has no "
                         "thinking_projection; leave it out, or choose projection or embedding_plus_projection")
    if args.eval_on_start and not args.eval_samples:
        raise UsageError("--eval_on_start: no effect without --eval_samples N (the held-out problems to evaluate)")


# Settings that shape the model or the run: on --resume they come from the checkpoint (and
# every thinking field, from the checkpoint's config.json).
RESUMED_SETTINGS = ("model_name", "task", "dataset_path", "system_prompt", "hybrid_thinking", "loss_type",
                    "adam_beta1", "adam_beta2", "lora_rank", "seed", "group_size",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "max_prompt_length",
                    "max_completion_length", "temperature", "beta", "lr", "lr_residual_gate", "lr_residual_Lambda",
                    "lr_thinking_projection", "weight_decay", "warmup_ratio", "lr_scheduler_type", "max_grad_norm",
                    "optimizer")


def resume_checkpoint(args) -> Path | None:
    """The checkpoint --resume continues from: the newest complete one in --output_dir, or the
    complete checkpoint folder given (a path, or a name inside --output_dir)."""
    from hrpo.checkpoint import incomplete_reason

    if not args.resume:
        return None
    if args.resume == "latest":
        return last_checkpoint(Path(args.output_dir))
    folder = Path(args.resume).expanduser()
    if not folder.is_dir() and (Path(args.output_dir) / args.resume).is_dir():
        folder = Path(args.output_dir) / args.resume
    if not folder.is_dir():
        raise UsageError(f"--resume {args.resume}: no such checkpoint folder (a path, or a checkpoint-N folder in "
                         f"--output_dir {args.output_dir})")
    reason = incomplete_reason(folder)
    if reason is not None:
        raise UsageError(f"--resume {args.resume}: {folder} is not a complete checkpoint ({reason})")
    return folder


def finished_run(args) -> str | None:
    """On --resume: why the run in --output_dir is finished (its final files are there and it
    reached the asked --max_steps), else None."""
    history = Path(args.output_dir) / "log_history.json"
    if not args.resume or not history.exists():
        return None
    steps = [row["step"] for row in json.loads(history.read_text()) if "step" in row]
    done = max(steps, default=0)
    if args.max_steps > done:
        return None  # asked to train on
    return f"it finished at step {done} ({history} is its final log)"


def explicit_flags(argv) -> set[str]:
    """The options given on the command line (parsed again with every default suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def checkpoint_settings(folder: Path) -> dict:
    """The run settings saved beside a checkpoint: hrpo_run.json, with the thinking fields of
    its config.json (what the model was built with) over them."""
    settings = {}
    run_file, config_file = folder / RUN_CONFIG, folder / "config.json"
    for path in (run_file, config_file):
        if path.exists():
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise UsageError(f"--resume: {path} is not valid JSON ({err})") from None
    if run_file.exists():
        settings.update({k: v for k, v in json.loads(run_file.read_text()).items() if k in RESUMED_SETTINGS})
    if config_file.exists():
        from transformers.hybrid_thinking.config import ThinkingConfig, thinking_enabled

        config = SimpleNamespace(**json.loads(config_file.read_text()))
        if thinking_enabled(config):  # an HRPO model: fields it predates take their defaults
            fields = ThinkingConfig.from_config(config).to_dict()
            settings.update({k: v for k, v in fields.items() if k != "answer_marker"})
    if not settings:
        raise UsageError(f"--resume: {folder} has neither {RUN_CONFIG} nor config.json: its settings are unknown")
    return settings


def take_checkpoint_settings(args, given: set[str]) -> None:
    """On --resume, the settings that shape the model and the run come from the last
    checkpoint: a flag left out takes the checkpoint's value, a flag given with another
    value is an error (it would continue a different run on the same weights)."""
    folder = resume_checkpoint(args)
    if folder is None:
        return  # check_args says so
    for key, saved in checkpoint_settings(folder).items():
        current = getattr(args, key)
        if key not in given:
            setattr(args, key, saved)
        elif current != saved:
            raise UsageError(f"--{key} {current!r} conflicts with the checkpoint being resumed ({folder}): it was "
                             f"trained with --{key} {saved!r}. Leave the flag out to continue with the checkpoint's "
                             f"value, or start a new run in another --output_dir")


def thinking_config(args):
    """The run's ThinkingConfig: the --thinking_* flags, and the task's answer marker (where
    thinking ends is where the task reads the answer)."""
    from dataclasses import fields

    from transformers.hybrid_thinking.config import ThinkingConfig

    given = {f.name: getattr(args, f.name) for f in fields(ThinkingConfig) if f.init}
    return ThinkingConfig(**given).with_answer_marker(get_task(args.task).answer_marker)


def resolve_backend(args) -> str:
    """auto: unsloth, a dependency of the project, so it is always there. On CPU that is
    unsloth's CPU mode (the fork's own forward, TRL's own trainer); on CUDA its fast paths and
    GRPO rewrite, which the forks carry HRPO through."""
    return "unsloth" if args.backend == "auto" else args.backend


def load_model(args, cuda: bool):
    """LoRA on the seven projections, the thinking modules of the source trained in full.

    Hybrid thinking is opt-in by configuration: the thinking fields go onto the config before
    the model is built, so the fork builds the modules (only those the source uses). With
    --hybrid_thinking off the config is left as it is: upstream's model."""
    from transformers import AutoConfig, set_seed

    set_seed(args.seed)  # the thinking modules (gates, Lambda, projection) are drawn while the model is built
    try:
        config = AutoConfig.from_pretrained(args.model_name)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name {args.model_name}: cannot load its config ({err})") from None
    if args.hybrid_thinking == "on":
        if config.model_type not in HYBRID_MODEL_TYPES:
            names = f" ({', '.join(config.architectures)})" if config.architectures else ""
            raise UsageError(f"--model_name {args.model_name}: a {config.model_type} model{names}; HRPO's thinking "
                             f"modules exist for "
                             f"{' and '.join(HYBRID_MODEL_TYPES)} models (Qwen2 / Qwen2.5, Llama). Use one of those, "
                             f"or --hybrid_thinking off for plain GRPO")
        thinking_config(args).apply_to(config)
    loader = load_with_transformers if resolve_backend(args) == "transformers" else load_with_unsloth
    return loader(args, config, cuda)


def load_with_unsloth(args, config, cuda: bool):
    """unsloth's loader and LoRA (its fast paths on CUDA; the fork's forward on CPU)."""
    import torch
    from unsloth import FastLanguageModel

    from hrpo.data import left_padded

    model, tokenizer = FastLanguageModel.from_pretrained(
        args.model_name, config=config, max_seq_length=args.max_prompt_length + args.max_completion_length,
        load_in_4bit=False, dtype=None if cuda else torch.float32)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
        modules_to_save=trained_thinking_modules(args),
        use_gradient_checkpointing="unsloth" if cuda and args.gradient_checkpointing != "off" else False,
        random_state=args.seed)
    return model, left_padded(tokenizer, model.generation_config.eos_token_id)


def load_with_transformers(args, config, cuda: bool):
    """transformers' loader and PEFT's LoRA; the thinking copies trained in float32 as unsloth trains them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    from hrpo.data import left_padded

    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_name, config=config, dtype=dtype)
    if cuda:
        model.to("cuda")
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS,
                                             modules_to_save=trained_thinking_modules(args)))
    for name, module in model.named_modules():  # thinking copies train in float32, as unsloth does
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in THINKING_MODULES:
            module.modules_to_save["default"].float().requires_grad_(True)
    return model, left_padded(AutoTokenizer.from_pretrained(args.model_name), model.generation_config.eos_token_id)


def trained_thinking_modules(args) -> list[str] | None:
    """The thinking modules the source uses are trained in full with HRPO (the model has no
    others); plain GRPO builds none."""
    from transformers.hybrid_thinking.modeling import thinking_module_names

    return list(thinking_module_names(args.thinking_latent_source)) if args.hybrid_thinking == "on" else None


def load_dataset(args):
    task = get_task(args.task)
    return task.with_prompts(task.load(args.dataset_path, "train"), args.system_prompt)


def load_eval_rows(args) -> tuple[list[dict], dict]:
    """The held-out rows, and where they come from ({"dataset_path", "split"}: the real split)."""
    from hrpo.evaluation import held_out_source

    path, split = held_out_source(args.eval_dataset_path, args.eval_split, training_path=args.dataset_path,
                                  allow_training_data=args.eval_on_train_data)
    dataset = get_task(args.task).load(path, split)
    rows = dataset.select(range(min(args.eval_samples, len(dataset)))).to_list()
    return rows, {"dataset_path": path, "split": split}


def filter_long_prompts(args, dataset, tokenizer):
    from hrpo.data import DataError

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    keep = [i for i, n in enumerate(lengths) if n <= args.max_prompt_length]
    if not keep:
        raise DataError(f"--max_prompt_length {args.max_prompt_length}: every prompt of {args.dataset_path} is longer")
    if len(keep) < len(dataset):
        print(f"[hrpo] left out {len(dataset) - len(keep)} prompts longer than {args.max_prompt_length} tokens")
        dataset = dataset.select(keep)
    return dataset


def use_trainer_checkpointing(args, cuda: bool) -> bool:
    """The trainer's gradient checkpointing; unsloth's backend does its own ("unsloth")."""
    wanted = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and cuda)
    return wanted and not (cuda and resolve_backend(args) == "unsloth")


def grpo_config(args, cuda: bool):
    from trl import GRPOConfig

    import torch

    bf16 = cuda and torch.cuda.is_bf16_supported()
    return GRPOConfig(
        output_dir=str(args.output_dir), learning_rate=args.lr, beta=args.beta, weight_decay=args.weight_decay,
        loss_type=args.loss_type, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        # transformers 5 has no warmup_ratio; it reads a warmup_steps float below 1 as a ratio of the steps
        warmup_steps=args.warmup_ratio, lr_scheduler_type=args.lr_scheduler_type,
        optim=args.optimizer or ("paged_adamw_8bit" if cuda else "adamw_torch"), max_grad_norm=args.max_grad_norm,
        num_generations=args.group_size, temperature=args.temperature,
        generation_kwargs=dict(NEUTRAL_SAMPLING),  # nothing from the model's generation_config reshapes sampling
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_completion_length=args.max_completion_length, max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, report_to=args.report_to, seed=args.seed, bf16=bf16,
        fp16=cuda and not bf16, use_cpu=not cuda,
        gradient_checkpointing=use_trainer_checkpointing(args, cuda), remove_unused_columns=False,
        # every trainable parameter (LoRA, the source's thinking modules) takes part in every training
        # forward, also one without a thinking position: no unused-parameter search after each forward
        # under DDP (HF's Trainer would turn it on for a PEFT model), and a parameter left out is an error
        ddp_find_unused_parameters=False, log_completions=False)


def save_run_config(model, run_args: dict, folder: Path) -> None:
    """The model config (with the thinking fields) and the run's arguments, written beside an
    adapter, so that eval_gsm8k.py can rebuild the model from the folder alone. Bound to the
    run, it is the trainer's ``checkpoint_extras``: part of each checkpoint, before its marker."""
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(folder)
    (folder / RUN_CONFIG).write_text(json.dumps(run_args, indent=2))


def import_unsloth(cuda: bool) -> None:
    # unsloth's GRPO loss may score each group's shared prompt once (PrefixGrouper), a layout
    # in which rollouts cannot be matched to their thinking inputs; sequence packing is fine.
    os.environ.setdefault("UNSLOTH_GRPO_PREFIX_GROUPER", "0")
    # Hybrid decode steps always run eagerly (a captured graph has no thinking inputs), so
    # the CUDA-graph decode unsloth turns on for RL rollouts would only hold buffers.
    os.environ.setdefault("UNSLOTH_DECODE_CUDA_GRAPHS", "0")
    import unsloth  # noqa: F401  (first: it patches transformers/TRL; CPU fallback on CPU)

    if cuda:  # its CPU mode has no PatchFastRL (it leaves TRL alone)
        from unsloth import FastLanguageModel, PatchFastRL

        PatchFastRL("GRPO", FastLanguageModel)


def check_thinking_config(model, args) -> None:
    """The loaded model must carry the thinking options asked for (they shape its modules)."""
    if args.hybrid_thinking == "off":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, wanted in thinking_config(args).to_dict().items():
        got = getattr(base.config, key, None)
        if got != wanted:
            raise UsageError(f"the loaded model has {key}={got!r}, but {wanted!r} was asked for: the loader "
                             f"dropped the config (--backend {args.backend})")


def build_trainer(args, reward_funcs=None):
    """The trainer, ready to train (reward_funcs: default the task's correctness reward)."""
    import torch

    args.dataset_path = args.dataset_path or get_task(args.task).default_dataset

    cuda = torch.cuda.is_available()
    if resolve_backend(args) == "unsloth":
        import_unsloth(cuda)  # before TRL: on CUDA it replaces trl.GRPOTrainer by its rewrite
    else:
        from hrpo.cpu_logprob import route_trl_fused_head

        route_trl_fused_head()  # TRL's log-prob kernel is Triton; without CUDA it cannot run
    from hrpo.trainer import HRPOTrainer
    from patch import patch_trainer_optimizer

    dataset = load_dataset(args)  # data errors before the (slow) model load
    eval_rows, eval_source = load_eval_rows(args) if args.eval_samples else ([], {})
    model, tokenizer = load_model(args, cuda)
    check_thinking_config(model, args)
    dataset = filter_long_prompts(args, dataset, tokenizer)
    if args.hybrid_thinking == "on":
        trainer_class = partial(HRPOTrainer, thinking_monitor_every=args.thinking_monitor_every)
    else:
        from hrpo.trainer import GRPOTrainerWithCompleteCheckpoints as trainer_class  # TRL's own (or unsloth's)
    trainer = trainer_class(model=model, processing_class=tokenizer,
                            reward_funcs=reward_funcs or [get_task(args.task).reward_function()],
                            args=grpo_config(args, cuda), train_dataset=dataset)
    trainer.held_out_rows, trainer.held_out_source = eval_rows, eval_source
    patch_trainer_optimizer(trainer, args.lr_residual_gate, args.lr_residual_Lambda, args.lr_thinking_projection)
    trainer.checkpoint_extras = partial(save_run_config, model, vars(args) | {"output_dir": str(args.output_dir)})
    return trainer


def evaluate_held_out(trainer, args, when: str) -> dict:
    """Greedy held-out accuracy of the model being trained (decoding as trained), written
    to eval_step0.json / eval_final.json in the output folder."""
    from hrpo.evaluation import evaluate_rows

    model = trainer.accelerator.unwrap_model(trainer.model)
    result = evaluate_rows(model, trainer.processing_class, get_task(args.task), trainer.held_out_rows,
                           system_prompt=args.system_prompt, thinking=args.hybrid_thinking == "on", greedy=True,
                           temperature=args.temperature, max_new_tokens=args.max_completion_length,
                           batch_size=args.per_device_train_batch_size * 4)
    result["metrics"].update(step=trainer.state.global_step, **trainer.held_out_source)
    folder = Path(args.output_dir)
    if not trainer.args.should_save:  # every rank evaluates (sharded forwards are collectives), one writes
        return result
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVAL_FILES[when]).write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    print(f"[hrpo] held-out accuracy at step {m['step']}: {m['accuracy']:.3f} ({m['correct']}/{m['total']}, "
          f"greedy, {m['seconds']:.0f} s)", flush=True)
    return result


def train(args) -> Path:
    trainer = build_trainer(args)
    resume_from = str(resume_checkpoint(args)) if args.resume else None
    if resume_from and os.environ.get("LOCAL_RANK", "0") == "0":
        print(resume_report(Path(args.output_dir)) if args.resume == "latest" else
              f"[hrpo] --resume: continuing from {resume_from} (complete)", flush=True)
    if trainer.held_out_rows and args.eval_on_start and not resume_from:
        evaluate_held_out(trainer, args, "start")
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(args.output_dir))
    if trainer.args.should_save:  # with several processes: the main one writes
        trainer.checkpoint_extras(Path(args.output_dir))
        (Path(args.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    if trainer.held_out_rows:
        evaluate_held_out(trainer, args, "end")
    return Path(args.output_dir)


def close_process_group() -> None:
    """After a multi-process run: every rank past a barrier, then the process group torn down,
    so that no rank exits while a peer still talks to it (an abort at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def requested_backend(argv) -> str:
    """--backend as given on the command line, read before anything parses it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, token in enumerate(argv):
        if token == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--backend="):
            return token.split("=", 1)[1]
    return "auto"


def main(argv=None, make_parser=None) -> int:
    """make_parser: the task scripts' (hrpo_math.py, hrpo_mmlu.py), this one's with their defaults.
    unsloth is imported first (parsing imports transformers, whose classes unsloth patches)."""
    if requested_backend(argv) != "transformers":
        import torch

        import_unsloth(torch.cuda.is_available())
    parser = (make_parser or build_parser)()
    args = parser.parse_args(argv)
    args.dataset_path = args.dataset_path or get_task(args.task).default_dataset
    args.output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args)
    if Path(args.model_name).expanduser().is_dir():  # checkpoints record it: make it work from anywhere
        args.model_name = str(Path(args.model_name).expanduser().resolve())
    from hrpo.data import DataError

    try:
        if args.resume:
            take_checkpoint_settings(args, explicit_flags(argv))
        check_args(args, int(os.environ.get("WORLD_SIZE", "1")), explicit_flags(argv))
        finished = finished_run(args)
        if finished:
            print(f"[hrpo] --resume: the run in {args.output_dir} is finished: {finished}. Nothing was changed; to "
                  f"train on, pass a larger --max_steps", flush=True)
            return 0
        train(args)
        close_process_group()
    except (UsageError, DataError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
