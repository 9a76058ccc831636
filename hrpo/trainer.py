"""The HRPO trainer: GRPO with hybrid rollouts and a hybrid replay.

It subclasses whatever ``trl.GRPOTrainer`` is when it is imported: TRL 1.15's own class,
or, on CUDA after ``import unsloth``, the ``UnslothGRPOTrainer`` that unsloth generates
from it (``PatchFastRL``), whose loss (``grpo_accumulated_loss``) makes its own forwards.

- Rollouts: the trainer's own generation path, with the model's ``generate`` wrapped for
  the call so that it samples in hybrid mode (``processing_class``,
  ``return_thinking_embeds``) and hands back plain sequences; the per-position thinking
  data goes into a ``ReplayIndex`` keyed by each rollout's tokens.
- The replay: a forward pre-hook on the base model gives every policy forward the
  trainer makes while scoring (old-policy and current log-probs, in TRL's re-padded
  layout or unsloth's left-packed, sequence-packed and chunked ones) the thinking mask
  and latent sources of the rollouts it scores, found by their tokens, plus generate()'s
  position ids; the gates, Lambda and the projection are recomputed inside autograd.
  The reference pass (adapter disabled, a "ref" adapter, or a separate ref_model) stays
  on the discrete tokens, as in HRPO. A scoring forward over tokens that no rollout has
  is an error, never a silent plain-GRPO step.
- The loss temperature: TRL scores every log-prob (the loss's, the old policy's, the
  reference's) at the sampling temperature, the policy that sampled; ``--loss_temperature``
  builds TRL's fused LM head at another one (1.0: HRPO's code), and the on-policy check then
  scores the same hidden states once more at the sampling temperature, to compare like with like.
- Metrics: the trainer's, plus ``embeds_ratio``, ``hidden_ratio``, ``thinking/*`` and
  ``thinking_projection/*`` (weight norm; drift from the initial weights, absolute and, unless
  the projection starts at zero, relative; cosine between the embedding-method latent and the
  latent the source fed, on the same rollouts).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.hybrid_thinking.config import ThinkingConfig, thinking_enabled
from transformers.hybrid_thinking.generation import deterministic_projection
from transformers.hybrid_thinking.modeling import PROJECTION_MODULE, THINKING_INPUTS, HybridThinkingMixin
from trl import GRPOTrainer

from .checkpoint import (RUN_SETTINGS, load_trained_adapter, save_complete_checkpoint,
                         trained_adapter_only_under_zero3, write_run_settings)
from .compiled_rollouts import compile_rollouts, fixed_length_prompts
from .config import loss_temperature, refuse_unsupported_loss_temperature
from .optimizer import patch_trainer_optimizer
from .evaluation import HeldOutEvaluation
from .model_card import latest_evaluation, write_model_card
from .replay import ReplayIndex, ReplayMiss, completion_mask, position_ids_from_mask, stop_token_ids
from .sampling import check_sampling_distribution, distribution_changes, generate_replaced
from .sharding import keep_thinking_modules_float32

MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
# The largest replay-vs-sampling log-prob gap of an on-policy step that is rounding, not a
# different distribution: about 1e-5 is measured in float32; in bf16 the whole model's
# rounding reaches about 0.5 (bench/README.md, "Replay precision in half precision").
REPLAY_GAP_BOUND_FLOAT32 = 1e-3
REPLAY_GAP_BOUND_HALF = 1.0


def find_thinking_base(model) -> HybridThinkingMixin:
    for module in model.modules():
        if isinstance(module, HybridThinkingMixin):
            if not module.has_thinking_modules:
                raise ValueError(f"{type(model).__name__} was built without hybrid thinking: set the thinking fields "
                                 f"(thinking_latent_source, ...) on the config before the model is built "
                                 f"(hrpo_gsm8k.py does), or load an HRPO checkpoint")
            return module
    raise ValueError(f"{type(model).__name__} has no HRPO thinking modules: load the model with the "
                     f"transformers fork (Qwen2 or Llama)")


def gathered_parameters(model):
    """A context in which a model sharded by DeepSpeed ZeRO-3 (built under ``zero.Init``, before
    the engine exists) holds its whole parameters, for a forward outside the engine; any other
    model as it is. A collective: every rank enters it at the same point."""
    parameters = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not parameters:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    parameters = [p for p in parameters if p.ds_status != ZeroParamStatus.AVAILABLE]

    return deepspeed.zero.GatheredParameters(parameters)


def verify_hybrid_forward(model, base) -> None:
    """Refuse a model whose forward ignores the thinking inputs (for instance a forward
    replaced by a fast path that does not know them): it would train plain GRPO while
    logging HRPO."""
    with gathered_parameters(model):
        _verify_hybrid_forward(model, base)


@torch.no_grad()
def _verify_hybrid_forward(model, base) -> None:
    device = next(model.parameters()).device
    input_ids = torch.tensor([[1, 2, 3, 4]], device=device)
    mask = torch.tensor([[False, False, True, True]], device=device)
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG stream alone
    latents = torch.randn(1, 4, base.config.hidden_size, device=device, generator=generator) * 10
    was_training = model.training
    model.eval()
    try:
        plain = model(input_ids=input_ids).logits
        mixed = model(input_ids=input_ids, thinking_mask=mask, thinking_latents=latents,
                      thinking_hidden=latents).logits
        noisy = model(input_ids=input_ids, thinking_mask=mask, thinking_latents=latents, thinking_hidden=latents,
                      thinking_noise=latents).logits if base.config.thinking_latent_noise == "gaussian" else None
    finally:
        model.train(was_training)
    if torch.equal(plain[:, 2:], mixed[:, 2:]):
        raise RuntimeError(f"{type(model).__name__}'s forward does not apply the HRPO thinking inputs: a forward "
                           f"that does not know them is active (unsloth without the HRPO fork's series? run "
                           f"./setup.sh), or use hrpo_gsm8k.py --backend transformers")
    if noisy is not None and torch.equal(noisy[:, 2:], mixed[:, 2:]):
        raise RuntimeError(f"{type(model).__name__}'s forward ignores thinking_noise (Gaussian latent noise is "
                           f"configured): the replay would not feed the noise that sampling fed. Run ./setup.sh "
                           f"(both forks of one version), or use hrpo_gsm8k.py --backend transformers")
    verify_hidden_state_handover(model, base, input_ids)


@torch.no_grad()
def verify_hidden_state_handover(model, base, input_ids) -> None:
    """A projection source needs the forward to hand generation the last position's hidden
    state (``return_last_hidden_state``); without it generation falls back to the embedding
    method and the projection never gets a gradient."""
    source = base.config.thinking_latent_source
    if source == "embedding":
        return
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, return_last_hidden_state=True)
    finally:
        model.train(was_training)
    if getattr(out, "last_hidden_state", None) is None:
        raise RuntimeError(f"thinking_latent_source={source!r} needs the last hidden state, but "
                           f"{type(model).__name__}'s forward returned no last_hidden_state when asked "
                           f"(return_last_hidden_state=True): a forward without the HRPO fork's hand-over is "
                           f"active (run ./setup.sh), or use hrpo_gsm8k.py --backend transformers")


def check_rollout_source(out, base) -> None:
    """Refuse rollouts sampled with another latent source than the model's (generation fell
    back to the embedding method because the forward returned no hidden state): training
    on them would leave the projection without a gradient."""
    wanted = base.config.thinking_latent_source
    if out.thinking_latent_source != wanted:
        raise RuntimeError(f"the rollouts were sampled with thinking_latent_source={out.thinking_latent_source!r}, "
                           f"but the model is configured for {wanted!r}: generation fell back because the forward "
                           f"returned no last hidden state; training on them would not train the projection")


def full_tensor(param) -> torch.Tensor:
    """A parameter's whole value on every rank, for metrics: an FSDP2 shard is a DTensor, a
    DeepSpeed ZeRO-3 parameter a partition (gathered here: a collective, so every rank calls
    this for the same parameters in the same order, as the metrics do)."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach()
    if hasattr(param, "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if param.ds_status == ZeroParamStatus.AVAILABLE:  # already gathered (TRL's generation context)
            return param.detach().clone()
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def default_monitor_every(args) -> int:
    """The thinking monitor's default period: every 10 logging steps."""
    return 10 * max(1, int(args.logging_steps or 1))


def base_model_name(model) -> str | None:
    """The base model an adapter goes on: what the adapter config records (the loader reads
    it), else the base model config's ``_name_or_path``."""
    adapter = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(adapter, "base_model_name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def thinking_settings(config) -> dict | None:
    """Every hybrid-thinking field of a model config, or None for upstream's plain model."""
    return ThinkingConfig.from_config(config).to_dict() if thinking_enabled(config) else None


# ---------------------------------------------------------------- the loss temperature

@contextlib.contextmanager
def fused_head_temperature(temperature: float):
    """TRL's GRPOTrainer builds, when it is made, the fused LM head through which it scores every
    log-prob (the loss's, the old policy's, the reference's, the entropy), at its sampling
    temperature. Made inside this context, the head divides the logits by ``temperature``
    instead; sampling keeps the trainer's temperature. A trainer that builds no head is an error."""
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.add_fused_lm_head
    built = []

    def add_fused_lm_head(model, *args, **kwargs):
        kwargs["temperature"] = temperature
        built.append(model)
        return original(model, *args, **kwargs)

    grpo_module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        grpo_module.add_fused_lm_head = original
    if not built:
        raise RuntimeError(f"--loss_temperature {temperature}: TRL's GRPOTrainer built no fused LM head, so the loss "
                           f"temperature could not be applied (a TRL other than 1.15?)")


class LogProbsAlsoAt:
    """Stands in TRL's fused-LM-head kernel slot during one scoring call: the kernel's own results,
    and besides, without gradient, the log-probs of the same hidden states and tokens at
    ``temperature`` (one more pass through the LM head), in ``found``, in the order of the
    scored tokens."""

    def __init__(self, kernel, temperature: float):
        self.kernel, self.temperature, self.found = kernel, temperature, []

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
        with torch.no_grad():
            again = self.kernel.apply(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                      targets, self.temperature, chunk_size, *rest[:2], ("log_probs",))
        self.found.append(again[0].detach().float())
        return self.kernel.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)

    def per_token(self, scored: torch.Tensor) -> torch.Tensor:
        """The values in ``found`` in place: ``scored`` marks the tokens the head scored
        (rows x completion positions), in the order it scored them; zero elsewhere."""
        values = torch.cat(self.found) if self.found else torch.zeros(0)
        if values.numel() != int(scored.sum()):
            raise RuntimeError(f"the on-policy check at the sampling temperature: TRL's fused LM head scored "
                               f"{values.numel()} tokens, the completion mask has {int(scored.sum())}")
        out = torch.zeros(scored.shape, dtype=torch.float32, device=scored.device)
        out[scored] = values.to(scored.device)
        return out


@contextlib.contextmanager
def log_probs_also_at(temperature: float):
    from trl.trainer import utils as trl_utils

    kernel = trl_utils._ChunkedLogProbFunction
    also = LogProbsAlsoAt(kernel, temperature)
    trl_utils._ChunkedLogProbFunction = also
    try:
        yield also
    finally:
        trl_utils._ChunkedLogProbFunction = kernel


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


class GRPOTrainerWithCompleteCheckpoints(HeldOutEvaluation, HRPOModelCardMixin, GRPOTrainer):
    """The plain-GRPO baseline: the trainer itself, with kill-safe checkpoints and a resume
    that restores the trained adapter (``hrpo.checkpoint``), refusing a sampling distribution
    that the loss does not score (``hrpo.sampling``), writing our model card."""

    run_settings: dict | None = None  # the run-settings file's content, written beside each checkpoint

    def save_run_settings(self, folder) -> None:
        """The model config (with the thinking fields) and the run's settings, beside an adapter,
        so that eval_gsm8k.py and --resume rebuild the run from the folder alone."""
        if self.run_settings is not None:
            write_run_settings(self.accelerator.unwrap_model(self.model), self.run_settings, folder)

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        refuse_unsupported_loss_temperature(
            config, any(cls.__name__ == "UnslothGRPOTrainer" for cls in type(self).__mro__))
        # the temperature of every log-prob TRL scores (the sampling one unless --loss_temperature)
        self.loss_temperature = None if config is None else loss_temperature(config)
        other = config is not None and self.loss_temperature != config.temperature
        with fused_head_temperature(self.loss_temperature) if other else contextlib.nullcontext():
            super().__init__(*args, **kwargs)
        generation_config = getattr(self, "generation_config", None)  # TRL's, without vLLM
        if generation_config is not None:
            model = self.accelerator.unwrap_model(self.model)
            check_sampling_distribution(generation_config, getattr(model, "generation_config", None),
                                        type(self).__name__)
            if getattr(self.args, "compile_rollouts", False):
                compile_rollouts(generation_config, on_cuda=self.accelerator.device.type == "cuda")
                self.generation_kwargs.update(cache_implementation="static")

    def _generate_and_score_completions(self, inputs):
        if not getattr(self.args, "compile_rollouts", False):
            return super()._generate_and_score_completions(inputs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        with fixed_length_prompts(self.accelerator.unwrap_model(self.model), self.args.max_prompt_length,
                                  tokenizer.pad_token_id):
            return super()._generate_and_score_completions(inputs)

    thinking_learning_rates: tuple[float, float, float] | None = None  # gate, Lambda, projection (build_trainer)

    def create_optimizer(self, model=None):
        """The six parameter groups (``hrpo.optimizer``) whenever the trainer creates its optimizer:
        also when DeepSpeed's init drops one made before (it sets ``trainer.optimizer = None``, and
        its default groups gave the thinking modules the main rate and decayed Lambda)."""
        if self.optimizer is None and self.thinking_learning_rates is not None:
            patch_trainer_optimizer(self, *self.thinking_learning_rates, model=model)
        return super().create_optimizer(model)

    def _save_checkpoint(self, model, trial):
        save_complete_checkpoint(self, super()._save_checkpoint, model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with trained_adapter_only_under_zero3(self):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trained_adapter(self, resume_from_checkpoint, model)


class HRPOTrainer(GRPOTrainerWithCompleteCheckpoints):
    """GRPOTrainer with HRPO hybrid latent reasoning (see the module docstring), with the
    baseline's kill-safe checkpoints and a resume that restores the trained adapter and
    thinking modules."""

    def __init__(self, *args, thinking_monitor_every: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            raise ValueError("HRPOTrainer samples with the fork's hybrid generate(); use_vllm is not supported")
        if getattr(self, "tools", None):
            raise ValueError("HRPOTrainer does not support tool calling (multi-turn rollouts)")
        self.thinking_base = find_thinking_base(self.model)
        verify_hybrid_forward(self.model, self.thinking_base)
        self.thinking_monitor_every = default_monitor_every(self.args) if thinking_monitor_every is None \
            else thinking_monitor_every
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.replay_index = ReplayIndex(tokenizer.pad_token_id, self._stop_token_ids(tokenizer))
        self._generating = False
        self._replay_group = "train"  # the ReplayIndex group that scoring forwards look up: the batch's mode
        self._loss_inputs: dict | None = None
        self._rollout_global_step: int | None = None  # the optimizer step at which the buffered rollouts were sampled
        self.replay_logprob_diffs: list[float] = []  # on-policy checks, for tests and logging
        self._first_checked_step: int | None = None  # the optimizer step of the first on-policy check
        self._warned_replay_gap = False
        self._initial_projection = {name: full_tensor(p).clone() for name, p in self._projection_parameters()}
        self._initial_projection_norm = torch.sqrt(
            sum((p.float() ** 2).sum() for p in self._initial_projection.values())) if self._initial_projection else None

    def _prepare_for_training(self, *args, **kwargs):
        # FSDP2: the thinking modules become a float32 unit of their own; DeepSpeed in bf16 warns (hrpo/sharding.py)
        keep_thinking_modules_float32(self.accelerator, self.model, self.optimizer)
        return super()._prepare_for_training(*args, **kwargs)

    # ------------------------------------------------------------ rollouts

    def _stop_token_ids(self, tokenizer) -> list[int]:
        """Every id that ends a completion, as TRL's own completion mask uses them (its
        ``eos_token_ids``: the generation config's ids plus the tokenizer's)."""
        return stop_token_ids(getattr(self, "eos_token_ids", None) or tokenizer.eos_token_id)

    def _projection_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if PROJECTION_MODULE in n and p.requires_grad]

    @contextlib.contextmanager
    def _hybrid_generate(self):
        """Make the model's generate() sample in hybrid mode for the trainer's generation call."""
        model = self.accelerator.unwrap_model(self.model)
        original = model.generate
        monitor = self._thinking_monitor_due()
        tokenizer = getattr(self, "_tokenizer", None) or self.processing_class
        # unsloth's generate switches the model to inference mode: decide the bucket now
        mode = self._mode()

        def generate(*args, **kwargs):
            self._generating = True
            try:
                # the replay scores under the trainer's autocast (bf16/fp16 on CUDA): sample under
                # the same one, so that the float32 thinking modules run at the same precision
                with self.accelerator.autocast():
                    out = original(*args, processing_class=tokenizer, return_thinking_embeds=True,
                                   thinking_monitor=monitor, **kwargs)
            finally:
                self._generating = False
            check_rollout_source(out, self.thinking_base)
            prompt_mask = kwargs.get("attention_mask")
            if prompt_mask is None:
                prompt_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
                prompt_mask = torch.ones_like(prompt_ids)
            self.replay_index.add(out, prompt_mask, group=mode)
            self._log_thinking_metrics(out, prompt_mask.shape[1], mode)
            return out.sequences

        with generate_replaced(model, generate):
            yield

    def _thinking_monitor_due(self) -> bool:
        """Whether this generation also records the embedding-method latent (to compare it with
        the projection's): a V x d product per decoding step, so only every
        ``thinking_monitor_every`` optimizer steps (0: never)."""
        return self.thinking_monitor_every > 0 and self.state.global_step % self.thinking_monitor_every == 0

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _generate_and_score_completions(self, inputs):
        # A new generation batch of this mode: its rollouts replace the previous ones.
        mode = self._mode()
        self.replay_index.clear(mode)
        if mode == "train":
            self._rollout_global_step = self.state.global_step
        with self._hybrid_generate(), self._replay_hook(mode):
            batch = super()._generate_and_score_completions(inputs)
        prompt_completion = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        recorded = self.replay_index.lookup(prompt_completion, attention, group=mode)
        batch["sampled_token_logprobs"] = recorded["sampled_token_logprobs"][:, batch["prompt_ids"].shape[1]:]
        return batch

    # ------------------------------------------------------------ the replay

    def _is_reference_pass(self) -> bool:
        """The policy's own modules score the reference with the adapters disabled (TRL with
        beta > 0 and no "ref" copy, unsloth's rewrite) or with TRL's frozen "ref" adapter. A
        separate ref_model has its own base model, which this hook is not on."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if getattr(unwrapped, "active_adapter", None) == "ref":
            return True
        layer = next((m for m in unwrapped.modules() if isinstance(m, BaseTunerLayer)), None)
        return layer is not None and layer.disable_adapters

    def _feed_thinking_inputs(self, module, args, kwargs):
        if self._generating or kwargs.get("thinking_mask") is not None or self._is_reference_pass():
            return args, kwargs
        if kwargs.get("prefix_seg_info") is not None:
            raise RuntimeError("HRPO cannot replay through unsloth's PrefixGrouper layout (one shared prompt per "
                               "group): set UNSLOTH_GRPO_PREFIX_GROUPER=0 before importing unsloth "
                               "(hrpo_gsm8k.py does)")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("HRPO's replay needs input_ids in every scoring forward, got inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
            attention_mask = None
        try:
            recorded = self.replay_index.lookup(input_ids, attention_mask, kwargs.get("packed_seq_lengths"),
                                                group=self._replay_group)
        except ReplayMiss as err:
            raise RuntimeError(f"HRPO replay: {err}. A scoring forward must only see this batch's rollouts; "
                               f"scoring it on discrete tokens would train plain GRPO while logging HRPO") from None
        for key in THINKING_INPUTS:
            kwargs[key] = recorded[key]
        if kwargs.get("position_ids") is None and attention_mask is not None:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        return args, kwargs

    @contextlib.contextmanager
    def _replay_hook(self, group: str):
        """Scoring forwards get the thinking inputs of ``group``'s rollouts (the batch's mode,
        decided before generation, which may switch the model's mode)."""
        handle = self.thinking_base.register_forward_pre_hook(self._feed_thinking_inputs, with_kwargs=True)
        previous, self._replay_group = self._replay_group, group
        try:
            yield
        finally:
            self._replay_group = previous
            handle.remove()

    def compute_loss(self, model, inputs, *args, **kwargs):
        self._loss_inputs = inputs
        try:
            with self._replay_hook(self._mode()):
                return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            self._loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if any(kwargs.get(key) is not None for key in MULTIMODAL_KEYS):
            raise ValueError("HRPOTrainer is text-only: no multimodal inputs")
        score = super()._get_per_token_logps_and_entropies
        if not self._on_policy_check_due():
            return score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if self.loss_temperature == self.temperature:
            result = score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            self._check_on_policy(result[0])
            return result
        # the loss scores at another temperature than sampling: check the same hidden states at the sampling one
        with log_probs_also_at(self.temperature) as also:
            result = score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        self._check_on_policy(also.per_token(attention_mask[:, -logits_to_keep:].bool()))
        return result

    def _policy_unchanged_since_rollout(self) -> bool:
        """No optimizer step since the buffered rollouts were sampled. With num_iterations > 1
        TRL scores the same generation batch again after updates (off-policy iterations);
        with its default steps_per_generation (= gradient_accumulation_steps) this is exactly
        the first iteration of each generation batch."""
        return self._rollout_global_step == self.state.global_step

    def _on_policy_check_due(self) -> bool:
        """A training loss pass while the policy is the one that sampled the rollouts."""
        inputs = self._loss_inputs
        return (inputs is not None and self.model.training and "sampled_token_logprobs" in inputs
                and self._policy_unchanged_since_rollout())

    def _check_on_policy(self, logps) -> None:
        """The loss pass's log-probs, at the sampling temperature, against the sampling-time ones
        (on-policy: they must agree). unsloth's fused loss returns none here."""
        inputs = self._loss_inputs
        if logps is None:
            return
        mask = inputs["completion_mask"].bool()
        if logps.shape != mask.shape:
            return
        diff = (logps.detach().float() - inputs["sampled_token_logprobs"]).abs()[mask]
        if diff.numel():
            self.replay_logprob_diffs.append(diff.max().item())
            self._metrics["train"]["thinking/replay_logprob_max_abs_diff"].append(diff.max().item())
            self._judge_replay_gap(diff.max().item())

    def _judge_replay_gap(self, gap: float) -> None:
        """Off-policy sampling is loud: in float32 a gap above REPLAY_GAP_BOUND_FLOAT32 in the
        first checked step is an error (before the first update), later a warning; in half
        precision, whose rounding is larger, a warning above REPLAY_GAP_BOUND_HALF."""
        if self._first_checked_step is None:
            self._first_checked_step = self.state.global_step
        half = bool(self.args.bf16 or self.args.fp16) or \
            self.thinking_base.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
        bound = REPLAY_GAP_BOUND_HALF if half else REPLAY_GAP_BOUND_FLOAT32
        if gap <= bound:
            return
        model = self.accelerator.unwrap_model(self.model)
        changes = distribution_changes(getattr(self, "generation_config", None),
                                       getattr(model, "generation_config", None))
        cause = (f"settings that reshape sampling: {changes}" if changes else
                 "no generation setting does: a custom logits processor, or a forward that differs between "
                 "sampling and the replay")
        message = (f"HRPO on-policy check: the replay's log-probs differ from the sampling-time ones by up to "
                   f"{gap:.3g} at step {self.state.global_step} (bound {bound:g} in "
                   f"{'half precision' if half else 'float32'}): the rollouts were not sampled from the "
                   f"distribution the loss scores ({cause})")
        if not half and self.state.global_step == self._first_checked_step:
            raise RuntimeError(message)
        if not self._warned_replay_gap:
            warnings.warn(message, stacklevel=2)
            self._warned_replay_gap = True

    # ------------------------------------------------------------ metrics

    @torch.no_grad()
    def _log_thinking_metrics(self, out, prompt_len: int, mode: str) -> None:
        metrics = self._metrics[mode]
        completion = completion_mask(out.sequences[:, prompt_len:], self.replay_index.eos_token_ids).bool()
        mask = out.thinking_mask[:, prompt_len:] & completion
        count = mask.sum()
        metrics["thinking/positions_frac"].append((count / completion.sum().clamp(min=1)).item())
        if count > 0:
            metrics["embeds_ratio"].append(out.thinking_gate_ratio[:, prompt_len:][mask].mean().item())
            metrics["hidden_ratio"].append(out.thinking_hidden_ratio[:, prompt_len:][mask].mean().item())
        projection = self._projection_parameters()
        if projection:
            whole = {n: full_tensor(p).float() for n, p in projection}
            norm = torch.sqrt(sum((p ** 2).sum() for p in whole.values()))
            drift = torch.sqrt(sum(((p - self._initial_projection[n].float().to(p.device)) ** 2).sum()
                                   for n, p in whole.items()))
            metrics["thinking_projection/weight_norm"].append(norm.item())
            metrics["thinking_projection/drift_abs"].append(drift.item())
            if self._initial_projection_norm > 0:  # not for a zero-initialised projection (embedding_plus_projection)
                metrics["thinking_projection/drift"].append((drift / self._initial_projection_norm).item())
        left_out = out.thinking_latent_left_out_mass
        if count > 0 and left_out is not None and self.thinking_base.config.thinking_latent_topk is not None:
            metrics["thinking/latent_left_out_mass"].append(left_out[:, prompt_len:][mask].mean().item())
        latents, hidden = out.thinking_latents, out.thinking_hidden
        if count > 0 and latents is not None and hidden is not None:
            embedding_latent = latents[:, prompt_len:][mask]
            noise = None if out.thinking_noise is None else out.thinking_noise[:, prompt_len:][mask]
            with deterministic_projection(self.thinking_base):  # as sampling applied it
                fed = self.thinking_base.thinking_latent(embedding_latent, hidden[:, prompt_len:][mask], noise)
            cosine = torch.nn.functional.cosine_similarity(embedding_latent.float(), fed.float(), dim=-1)
            metrics["thinking_projection/cosine_to_embedding_latent"].append(cosine.mean().item())
