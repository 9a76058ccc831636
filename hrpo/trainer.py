"""The HRPO trainer: TRL 1.15's GRPOTrainer with hybrid rollouts and a hybrid replay.

- Rollouts: TRL's own generation path, with the model's ``generate`` wrapped for the call
  so that it samples in hybrid mode (``processing_class``, ``return_thinking_embeds``) and
  hands back plain sequences to TRL; the per-position replay data is kept aside.
- The batch: the replay data is aligned to TRL's re-padded prompt + completion columns
  and added to the batch dict as tensors, so TRL's shuffling and splitting carry it with
  its row.
- The loss: every policy forward TRL makes (old-policy and current log-probs) gets the
  thinking mask, the latent sources and generate()'s position ids through a forward
  pre-hook on the base model, so the gates, Lambda and the projection are recomputed
  inside autograd. The reference pass (adapter disabled, or a separate ref_model) stays on
  the discrete tokens, as in HRPO.
- Metrics: TRL's, plus ``embeds_ratio``, ``hidden_ratio``, ``thinking/*`` and
  ``thinking_projection/*`` (weight norm, drift from the initial weights, cosine between
  the embedding-method and projection-method latents on the same rollouts).
"""
from __future__ import annotations

import contextlib

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.hybrid_thinking.modeling import HybridThinkingMixin
from trl import GRPOTrainer

from .replay import position_ids_from_mask

THINKING_KEYS = ("thinking_mask", "thinking_latents", "thinking_hidden")
STASH_KEYS = THINKING_KEYS + ("thinking_gate_ratio", "thinking_hidden_ratio", "sampled_token_logprobs")


def find_thinking_base(model) -> HybridThinkingMixin:
    for module in model.modules():
        if isinstance(module, HybridThinkingMixin):
            return module
    raise ValueError(f"{type(model).__name__} has no HRPO thinking modules: load the model with the "
                     f"transformers fork (Qwen2 or Llama)")


@contextlib.contextmanager
def replay_inputs(base: torch.nn.Module, thinking: dict | None):
    """Add the thinking inputs (and generate()'s position ids) to the base model's forward."""

    def hook(module, args, kwargs):
        if thinking:
            for key, value in thinking.items():
                if value is not None and kwargs.get(key) is None:
                    kwargs[key] = value
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["position_ids"] = position_ids_from_mask(mask)
        return args, kwargs

    handle = base.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def verify_hybrid_forward(model, base) -> None:
    """Refuse a model whose forward ignores the thinking inputs (for instance a forward
    replaced by a fast path that does not know them): it would train plain GRPO while
    logging HRPO."""
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
    finally:
        model.train(was_training)
    if torch.equal(plain[:, 2:], mixed[:, 2:]):
        raise RuntimeError(f"{type(model).__name__}'s forward does not apply the HRPO thinking inputs (is a fast "
                           f"path that bypasses the transformers fork's forward active? On CUDA use "
                           f"hrpo_gsm8k.py --backend transformers)")


def align_to_batch(stash: dict, prompt_width: int, completion_width: int) -> dict:
    """Completion-region tensors from generation -> full prompt + completion width."""
    aligned = {}
    for key, value in stash.items():
        if value is None:
            aligned[key] = None
            continue
        width = min(completion_width, value.shape[1])
        full = value.new_zeros((value.shape[0], prompt_width + completion_width, *value.shape[2:]))
        full[:, prompt_width:prompt_width + width] = value[:, :width]
        aligned[key] = full
    return aligned


class HRPOTrainer(GRPOTrainer):
    """GRPOTrainer with HRPO hybrid latent reasoning (see the module docstring)."""

    def __init__(self, *args, thinking_monitor_every: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            raise ValueError("HRPOTrainer samples with the fork's hybrid generate(); use_vllm is not supported")
        if getattr(self, "tools", None):
            raise ValueError("HRPOTrainer does not support tool calling (multi-turn rollouts)")
        self.thinking_base = find_thinking_base(self.model)
        verify_hybrid_forward(self.model, self.thinking_base)
        self.thinking_monitor_every = thinking_monitor_every or self.args.logging_steps or 1
        self._generation_stash: list[dict] = []
        self._loss_batch: dict | None = None
        self.replay_logprob_diffs: list[float] = []  # on-policy checks, for tests and logging
        self._initial_projection = {name: p.detach().clone() for name, p in self._projection_parameters()}
        self._initial_projection_norm = torch.sqrt(
            sum((p.float() ** 2).sum() for p in self._initial_projection.values())) if self._initial_projection else None

    # ------------------------------------------------------------ rollouts

    def _projection_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if "thinking_projection" in n and p.requires_grad]

    @contextlib.contextmanager
    def _hybrid_generate(self):
        """Make the model's generate() sample in hybrid mode for TRL's generation call."""
        model = self.accelerator.unwrap_model(self.model)
        original = model.generate
        had_instance_generate = "generate" in vars(model)
        monitor = self.state.global_step % self.thinking_monitor_every == 0
        tokenizer = getattr(self, "_tokenizer", None) or self.processing_class

        def generate(*args, **kwargs):
            out = original(*args, processing_class=tokenizer, return_thinking_embeds=True,
                           thinking_monitor=monitor, **kwargs)
            prompt_len = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            stash = {key: getattr(out, key) for key in STASH_KEYS}
            self._generation_stash.append({k: (v[:, prompt_len:] if v is not None else None) for k, v in stash.items()})
            self._generation_stash[-1]["source"] = out.thinking_latent_source
            return out.sequences

        model.generate = generate
        try:
            yield
        finally:
            if had_instance_generate:
                model.generate = original
            else:
                del model.generate  # back to the class's method

    def _generate_and_score_completions(self, inputs):
        self._generation_stash = []
        try:
            with self._hybrid_generate():
                batch = super()._generate_and_score_completions(inputs)
            if len(self._generation_stash) != 1:
                raise RuntimeError(f"expected one generate() call per batch, saw {len(self._generation_stash)}")
            stash = self._generation_stash[0]
            stash.pop("source")
            aligned = align_to_batch(stash, batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1])
        finally:
            self._generation_stash = []
        completion = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], dim=1).bool()
        aligned["thinking_mask"] = aligned["thinking_mask"] & completion
        self._log_thinking_metrics(aligned, completion)
        batch.update({k: aligned[k] for k in THINKING_KEYS})
        batch["sampled_token_logprobs"] = aligned["sampled_token_logprobs"][:, batch["prompt_ids"].shape[1]:]
        return batch

    # ------------------------------------------------------------ the replay

    def _is_reference_pass(self, model) -> bool:
        """TRL scores the reference with a separate ref_model, with the adapters disabled, or
        (a PEFT model given to it, as here) with a frozen copy of the adapter named "ref"."""
        if self.ref_model is not None and model is self.ref_model:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        if getattr(unwrapped, "active_adapter", None) == "ref":
            return True
        layer = next((m for m in unwrapped.modules() if isinstance(m, BaseTunerLayer)), None)
        return layer is not None and layer.disable_adapters

    def _thinking_for(self, input_ids, logits_to_keep) -> dict | None:
        if self._loss_batch is not None:
            return {k: self._loss_batch.get(k) for k in THINKING_KEYS}
        if self._generation_stash:  # old-policy log-probs, computed while scoring the rollouts
            stash = {k: self._generation_stash[0][k] for k in THINKING_KEYS}
            aligned = align_to_batch(stash, input_ids.shape[1] - logits_to_keep, logits_to_keep)
            return aligned
        return None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, **kwargs):
        if any(v is not None for k, v in kwargs.items() if k not in ("compute_entropy", "compute_aux_loss")):
            raise ValueError("HRPOTrainer is text-only: no multimodal inputs")
        thinking = None if self._is_reference_pass(model) else self._thinking_for(input_ids, logits_to_keep)
        batch_size = batch_size or input_ids.shape[0]
        parts = []
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            chunk = {k: (v[rows] if v is not None else None) for k, v in (thinking or {}).items()}
            with replay_inputs(self.thinking_base, chunk):
                parts.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[rows], attention_mask[rows], logits_to_keep, batch_size=None, **kwargs))
        logps = torch.cat([p[0] for p in parts], dim=0)
        entropies = torch.cat([p[1] for p in parts], dim=0) if parts[0][1] is not None else None
        aux = torch.stack([p[2] for p in parts]).mean() if parts[0][2] is not None else None
        self._check_on_policy(logps)
        return logps, entropies, aux

    def _check_on_policy(self, logps) -> None:
        batch = self._loss_batch
        if batch is None or batch.get("sampled_token_logprobs") is None or not self.model.training:
            return
        mask = batch["completion_mask"].bool()
        diff = (logps.detach().float() - batch["sampled_token_logprobs"]).abs()[mask]
        if diff.numel():
            self.replay_logprob_diffs.append(diff.max().item())
            self._metrics["train"]["thinking/replay_logprob_max_abs_diff"].append(diff.max().item())

    def _compute_loss(self, model, inputs):
        self._loss_batch = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_batch = None

    # ------------------------------------------------------------ metrics

    @torch.no_grad()
    def _log_thinking_metrics(self, aligned: dict, completion: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        mask = aligned["thinking_mask"]
        count = mask.sum()
        metrics["thinking/positions_frac"].append((count / completion.sum().clamp(min=1)).item())
        if count > 0:
            metrics["embeds_ratio"].append(aligned["thinking_gate_ratio"][mask].mean().item())
            metrics["hidden_ratio"].append(aligned["thinking_hidden_ratio"][mask].mean().item())
        projection = self._projection_parameters()
        if projection:
            norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for _, p in projection))
            drift = torch.sqrt(sum(((p.detach().float() - self._initial_projection[n].float()) ** 2).sum()
                                   for n, p in projection))
            metrics["thinking_projection/weight_norm"].append(norm.item())
            metrics["thinking_projection/drift"].append((drift / self._initial_projection_norm.clamp(min=1e-12)).item())
        latents, hidden = aligned.get("thinking_latents"), aligned.get("thinking_hidden")
        if count > 0 and latents is not None and hidden is not None:
            projected = self.thinking_base.projection_latent(hidden[mask])
            cosine = torch.nn.functional.cosine_similarity(latents[mask].float(), projected.float(), dim=-1)
            metrics["thinking_projection/cosine_to_embedding_latent"].append(cosine.mean().item())
