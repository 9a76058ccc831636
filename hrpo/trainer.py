"""The HRPO trainer: GRPO with hybrid rollouts and a hybrid replay.

The trainers are mixins put on the GRPOTrainer that the run's backend chooses
(``trainer_class``, ``hrpo.backend.grpo_trainer_base``): TRL 1.15's own, or, on CUDA with the
unsloth backend, the ``UnslothGRPOTrainer`` that unsloth generates from it (``PatchFastRL``),
whose loss (``grpo_accumulated_loss``) makes its own forwards. ``HRPOTrainer`` and
``GRPOTrainerWithCompleteCheckpoints`` are the two on ``trl.GRPOTrainer`` as imported. Every HRPO
setting comes from the trainer's ``args``: an ``HRPOConfig``, or a plain ``GRPOConfig`` with
HRPO's defaults (``hrpo.config.hrpo_setting``).

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
- Metrics: the trainer's, plus ``thinking/*`` (``thinking/embeds_ratio``, ``thinking/hidden_ratio``, ...) and
  ``thinking_projection/*`` (weight norm; drift from the initial weights, absolute and, unless
  the projection starts at zero, relative; cosine between the embedding-method latent and the
  latent the source fed, on the same rollouts).
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.hybrid_thinking.generation import deterministic_projection
from transformers.hybrid_thinking.modeling import PROJECTION_MODULE, THINKING_INPUTS
import trl

from .backend import UNSLOTH_GRPO_TRAINER
from .checkpoint import (load_trained_adapter, save_complete_checkpoint,
                         trained_adapter_only_under_zero3, write_run_settings)
from .compiled_rollouts import compile_rollouts, fixed_length_prompts
from .config import (hrpo_setting, loss_temperature, refuse_unsupported_loss_temperature,
                     refuse_unsupported_step_skipping)
from .optimizer import patch_trainer_optimizer
from .held_out import HeldOutEvaluation
from .distributed import full_tensor
from .loss_temperature import fused_head_temperature, log_probs_also_at
from .metric_names import GATE_RATIO_METRIC, HIDDEN_RATIO_METRIC
from .model_card import HRPOModelCardMixin
from .no_signal import SkipStepsWithoutSignal
from .model_checks import check_rollout_source, find_thinking_base, verify_hybrid_forward
from .replay import ReplayIndex, ReplayMiss, completion_mask, position_ids_from_mask, stop_token_ids
from .sampling import check_sampling_distribution, distribution_changes, generate_replaced
from .sharding import keep_thinking_modules_float32
from .vllm_rollouts import EngineRollouts, check_engine_settings, engine_dtype, replay_entries, write_engine_folder

MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
# The largest replay-vs-sampling log-prob gap of an on-policy step that is rounding, not a
# different distribution: about 1e-5 is measured in float32; in bf16 the whole model's
# rounding reaches about 0.5 (bench/README.md, "Replay precision in half precision").
REPLAY_GAP_BOUND_FLOAT32 = 1e-3
REPLAY_GAP_BOUND_HALF = 1.0


def default_monitor_every(args) -> int:
    """The thinking monitor's default period: every 10 logging steps."""
    return 10 * max(1, int(args.logging_steps or 1))


class RunTrainerMixin(HeldOutEvaluation, HRPOModelCardMixin):
    """What every trainer of a run adds to its GRPOTrainer: kill-safe checkpoints and a resume
    that restores the trained adapter (``hrpo.checkpoint``), the six parameter groups, refusing
    a sampling distribution that the loss does not score (``hrpo.sampling``), the loss
    temperature, held-out evaluation and our model card. On its own (with a GRPOTrainer) it is
    the plain-GRPO baseline."""

    run_settings: dict | None = None  # the run-settings file's content, written beside each checkpoint
    hybrid_rollouts = False  # whether rollouts mix latents (the vLLM engine then runs the plugin)

    def save_run_settings(self, folder) -> None:
        """The model config (with the thinking fields) and the run's settings, beside an adapter,
        so that eval_gsm8k.py and --resume rebuild the run from the folder alone."""
        if self.run_settings is not None:
            write_run_settings(self.accelerator.unwrap_model(self.model), self.run_settings, folder)

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        refuse_unsupported_loss_temperature(
            config, any(cls.__name__ == UNSLOTH_GRPO_TRAINER for cls in type(self).__mro__))
        # the temperature of every log-prob TRL scores (the sampling one unless --loss_temperature)
        self.loss_temperature = None if config is None else loss_temperature(config)
        other = config is not None and self.loss_temperature != config.temperature
        use_vllm = bool(getattr(config, "use_vllm", False))
        if use_vllm:  # TRL starts no engine of its own: _start_engine starts ours (hrpo.vllm_rollouts)
            check_engine_settings(config, self.hybrid_rollouts)
            config.use_vllm = False
        try:
            with fused_head_temperature(self.loss_temperature) if other else contextlib.nullcontext():
                super().__init__(*args, **kwargs)
        finally:
            if use_vllm:
                config.use_vllm = True
        generation_config = getattr(self, "generation_config", None)  # TRL's, from the sampling settings
        if generation_config is not None:
            model = self.accelerator.unwrap_model(self.model)
            # vLLM samples with TRL's settings only; generate() falls back on the model's for unset ones
            fallback = None if use_vllm else getattr(model, "generation_config", None)
            check_sampling_distribution(generation_config, fallback, type(self).__name__)
            if getattr(self.args, "compile_rollouts", False):
                compile_rollouts(generation_config, on_cuda=self.accelerator.device.type == "cuda")
                self.generation_kwargs.update(cache_implementation="static")
        if use_vllm:
            self._start_engine()

        self.step_skipper = None
        if getattr(self.args, "skip_steps_without_signal", False):
            refuse_unsupported_step_skipping(self.args, deepspeed=self.is_deepspeed_enabled)
            self.step_skipper = SkipStepsWithoutSignal(self.accelerator.device)
            self.add_callback(self.step_skipper)

    def _start_engine(self) -> None:
        """``--use_vllm``: TRL's colocated vLLM generation (the arguments trl 1.15's GRPOTrainer gives it),
        started by ``hrpo.vllm_rollouts.EngineRollouts`` for both arms."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        check_engine_settings(args, self.hybrid_rollouts, sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled)
        self._engine_folder = tempfile.TemporaryDirectory(prefix="hrpo-vllm-engine-")  # removed with the trainer
        self.use_vllm = True
        self.vllm_generation = EngineRollouts(
            model=self.model, accelerator=self.accelerator, processing_class=self.processing_class,
            mode=args.vllm_mode, structured_outputs_regex=args.vllm_structured_outputs_regex,
            server_base_url=args.vllm_server_base_url, server_host=args.vllm_server_host,
            server_port=args.vllm_server_port, group_port=args.vllm_group_port,
            server_timeout=args.vllm_server_timeout, tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=(args.vllm_max_model_length
                              or hrpo_setting(args, "max_prompt_length") + args.max_completion_length),
            max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation,
            enable_sleep_mode=args.vllm_enable_sleep_mode, model_impl=args.vllm_model_impl,
            trust_remote_code=args.trust_remote_code, repetition_penalty=self.repetition_penalty,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            max_completion_length=self.max_completion_length, logprobs=0, generation_kwargs=args.generation_kwargs,
            engine_folder=write_engine_folder(model, self.processing_class, self._engine_folder.name),
            dtype=engine_dtype(args, model), hybrid=self.hybrid_rollouts, latent_temperature=self.temperature,
            on_rollouts=self._add_engine_rollouts if self.hybrid_rollouts else None)
        self._last_loaded_step = -1  # TRL's tag: the first generation syncs every weight into the engine

    def close_engine(self) -> None:
        """After the run (``--use_vllm``): every process past a barrier, then the engine shut down
        (``EngineRollouts.close``). A no-op without vLLM."""
        engine = getattr(self, "vllm_generation", None)
        if not isinstance(engine, EngineRollouts):
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and self.accelerator.num_processes > 1:
            dist.barrier()
        engine.close()

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if self.step_skipper is not None and self.model.training:
            self.step_skipper.saw(inputs["advantages"])
        return inputs

    def _generate_and_score_completions(self, inputs):
        if not getattr(self.args, "compile_rollouts", False):
            return super()._generate_and_score_completions(inputs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        with fixed_length_prompts(self.accelerator.unwrap_model(self.model), self.args.max_prompt_length,
                                  tokenizer.pad_token_id):
            return super()._generate_and_score_completions(inputs)

    def create_optimizer(self, model=None):
        """The six parameter groups (``hrpo.optimizer``, the thinking modules at their own rates from
        ``args``) whenever the trainer creates its optimizer: also when DeepSpeed's init drops one
        made before (it sets ``trainer.optimizer = None``, and its default groups gave the thinking
        modules the main rate and decayed Lambda)."""
        if self.optimizer is None:
            patch_trainer_optimizer(self, model=model)
        return super().create_optimizer(model)

    def _save_checkpoint(self, model, trial):
        save_complete_checkpoint(self, super()._save_checkpoint, model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with trained_adapter_only_under_zero3(self):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trained_adapter(self, resume_from_checkpoint, model)


class HybridThinkingTrainerMixin(RunTrainerMixin):
    """HRPO hybrid latent reasoning on a GRPOTrainer (see the module docstring), with the
    baseline's kill-safe checkpoints and a resume that restores the trained adapter and
    thinking modules."""

    hybrid_rollouts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "tools", None):
            raise ValueError("HRPOTrainer does not support tool calling (multi-turn rollouts)")
        self.thinking_base = find_thinking_base(self.model)
        verify_hybrid_forward(self.model, self.thinking_base)
        every = hrpo_setting(self.args, "thinking_monitor_every")
        self.thinking_monitor_every = default_monitor_every(self.args) if every is None else every
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

    def _add_engine_rollouts(self, prompt_ids, completion_ids, logprobs, recorded) -> None:
        """vLLM's rollouts (``--use_vllm``) into the replay index, with the inputs the plugin recorded."""
        mode = self._mode()
        thinking = completion_tokens = 0
        for tokens, mask, sampled, latents, prompt_len in replay_entries(
                prompt_ids, completion_ids, logprobs, recorded, self.replay_index.eos_token_ids):
            self.replay_index.add_rollout(tokens, mask, sampled, latents, group=mode)
            thinking += int(mask.sum())
            completion_tokens += len(tokens) - prompt_len
        self._metrics[mode]["thinking/positions_frac"].append(thinking / max(completion_tokens, 1))

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
            metrics[GATE_RATIO_METRIC].append(out.thinking_gate_ratio[:, prompt_len:][mask].mean().item())
            metrics[HIDDEN_RATIO_METRIC].append(out.thinking_hidden_ratio[:, prompt_len:][mask].mean().item())
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


def trainer_class(hybrid: bool, base: type) -> type:
    """The trainer of a run on the GRPOTrainer ``base`` that its backend chose
    (``hrpo.backend.grpo_trainer_base``: TRL's own, or unsloth's rewrite of it): ``HRPOTrainer``
    (``hybrid``) or the plain-GRPO baseline, ``GRPOTrainerWithCompleteCheckpoints``."""
    return _on_base(HybridThinkingTrainerMixin if hybrid else RunTrainerMixin, base)


@functools.cache
def _on_base(mixin: type, base: type) -> type:
    name = "HRPOTrainer" if mixin is HybridThinkingTrainerMixin else "GRPOTrainerWithCompleteCheckpoints"
    return type(name, (mixin, base), {"__module__": __name__, "__doc__": mixin.__doc__})


# On trl.GRPOTrainer as this module finds it, for building a trainer directly; a run builds its
# trainer on the base its backend chooses (trainer_class).
GRPOTrainerWithCompleteCheckpoints = trainer_class(False, trl.GRPOTrainer)
HRPOTrainer = trainer_class(True, trl.GRPOTrainer)
