"""Per-step traces of a GRPO / HRPO training run, to see how a run stops answering
(``bench/collapse.py``).

``attach(trainer)`` hooks a trainer built by ``hrpo.run.build_trainer`` and records, for each
optimizer step (the step whose rollouts were sampled after ``step - 1`` updates):

- ``logs``: what the trainer logged for the step (reward, ``frac_reward_zero_std``, TRL's
  ``completions/clipped_ratio`` and lengths, ``entropy``, ``clip_ratio/*``, ``grad_norm`` before
  clipping, ``thinking/*``, ``thinking_projection/*``);
- ``completions``: each rollout's text, reward, token count, whether it was cut at
  ``max_completion_length`` (no stop token), whether it holds the answer marker, whether an
  answer could be read, and the share of its token 4-grams that are distinct (low: repetition);
- ``thinking`` (hybrid runs): over the positions that were mixed, the gate ``a``, the norm of the
  latent fed (h~) against the norm of the sampled token's embedding e, and how far the mixed
  input moved from e (||mixed - e|| / ||e||), recomputed from the rollout's own replay data; and
  Lambda (its mean and the gate it gives at r = 1, the smallest ``a`` it allows);
- ``optimizer``: per parameter group (``hrpo.optimizer``: main_decay is LoRA, projection, gate,
  lambda), the gradient norm the optimizer stepped on (after clipping), whether any gradient
  was None, the norms of AdamW's first and second moments after the step, the norm of the update
  applied, split into AdamW's moment step and the decoupled weight decay (lr * wd * ||p||), and
  the distance of the group's weights from where they started.

Nothing here draws random numbers or writes to a tensor the run uses: a traced run samples and
trains exactly as the same run untraced (checked against kept runs' rewards, bench/README.md).
The hooks are on the trainer instance (its reward function, its thinking-metrics call) and a
callback; no library file changes.
"""
from __future__ import annotations

import functools
import math

import torch
from transformers import TrainerCallback

from .rewards import ANSWER_MARKER, completion_text, extract_answer

TRACED_GROUPS = ("main_decay", "main_no_decay", "gate", "lambda", "projection", "projection_no_decay")


def distinct_ngram_share(ids: list[int], n: int = 4) -> float | None:
    """Distinct n-grams over all n-grams of a token sequence (1.0: no n-gram repeats), None if shorter than n."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _norm(tensors) -> float:
    total = 0.0
    for t in tensors:
        total += float(t.detach().float().pow(2).sum())
    return math.sqrt(total)


def _question(prompt) -> str:
    if isinstance(prompt, list):  # chat messages: the last user turn
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else completion_text(prompt)
    return str(prompt)


class CollapseTrace(TrainerCallback):
    """The per-step record of one run (see the module docstring); ``to_json()`` returns it."""

    def __init__(self, trainer, marker: str = ANSWER_MARKER, keep_texts: bool = True):
        from .replay import stop_token_ids

        self.trainer = trainer
        self.marker = marker
        self.keep_texts = keep_texts
        self.max_completion_length = int(trainer.args.max_completion_length)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        self.stop_ids = set(stop_token_ids(getattr(trainer, "eos_token_ids", None) or tokenizer.eos_token_id))
        self.steps: dict[int, dict] = {}
        self.groups = self._optimizer_groups()
        self.initial = {name: [p.detach().clone() for p in params] for name, params in self.groups.items()}
        self._before: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------ where things go

    def _step(self) -> dict:
        """The record of the step being taken now (rollouts, loss and update happen before the
        trainer's global_step moves on)."""
        step = self.trainer.state.global_step + 1
        return self.steps.setdefault(step, {"step": step})

    def _optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        optimizer = self.trainer.optimizer
        if optimizer is None:
            raise ValueError("attach the trace after the trainer's optimizer exists (build_trainer creates it)")
        groups = {}
        for index, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"group{index}")
            if group["params"]:
                groups[name] = list(group["params"])
        return groups

    def _param_group(self, name: str) -> dict:
        optimizer = self.trainer.optimizer
        return next(g for i, g in enumerate(optimizer.param_groups) if g.get("name", f"group{i}") == name)

    # ------------------------------------------------------------ rollouts and rewards

    def wrap_reward(self, function):
        @functools.wraps(function)
        def traced(*args, **kwargs):
            rewards = function(*args, **kwargs)
            if self.trainer.model.training:
                self._record_completions(kwargs, rewards)
            return rewards

        return traced

    def _record_completions(self, kwargs: dict, rewards) -> None:
        completions = kwargs.get("completions") or []
        ids = kwargs.get("completion_ids") or [[] for _ in completions]
        prompts = kwargs.get("prompts") or [None] * len(completions)
        rows = self._step().setdefault("completions", [])
        for prompt, completion, token_ids, reward in zip(prompts, completions, ids, rewards):
            text = completion_text(completion)
            token_ids = [int(t) for t in token_ids]
            ended = bool(token_ids) and token_ids[-1] in self.stop_ids
            row = {"reward": None if reward is None else float(reward), "tokens": len(token_ids),
                   "cut": not ended and len(token_ids) >= self.max_completion_length,
                   "marker": self.marker in text, "answered": extract_answer(text, self.marker) is not None,
                   "distinct_4gram": distinct_ngram_share(token_ids)}
            if self.keep_texts:
                row["question"] = _question(prompt)
                row["text"] = text
            rows.append(row)

    # ------------------------------------------------------------ hybrid mixing

    def wrap_thinking_metrics(self, function):
        @functools.wraps(function)
        def traced(out, prompt_len: int, mode: str):
            function(out, prompt_len, mode)
            if mode == "train":
                self._record_thinking(out, prompt_len)

        return traced

    @torch.no_grad()
    def _record_thinking(self, out, prompt_len: int) -> None:
        from transformers.hybrid_thinking.generation import deterministic_projection

        from .replay import completion_mask

        base = self.trainer.thinking_base
        tokens = out.sequences[:, prompt_len:]
        completion = completion_mask(tokens, sorted(self.stop_ids)).bool()
        mask = out.thinking_mask[:, prompt_len:] & completion
        record = {"positions": int(completion.sum()), "thinking_positions": int(mask.sum())}
        record["positions_frac"] = record["thinking_positions"] / max(record["positions"], 1)
        if mask.any():
            embeds = base.get_input_embeddings()(tokens)[mask].float()

            def picked(t):
                return None if t is None else t[:, prompt_len:][mask]

            with deterministic_projection(base):
                latent = base.thinking_latent(picked(out.thinking_latents), picked(out.thinking_hidden),
                                              picked(out.thinking_noise)).float()
                mixed, a = base.thinking_residual(embeds, latent)
            e_norm, h_norm = embeds.norm(dim=-1), latent.norm(dim=-1)
            record.update(
                gate_a_mean=float(a.mean()), gate_a_min=float(a.min()),
                embedding_norm=float(e_norm.mean()), latent_norm=float(h_norm.mean()),
                latent_over_embedding=float((h_norm / e_norm.clamp(min=1e-12)).mean()),
                input_change=float(((mixed.float() - embeds).norm(dim=-1) / e_norm.clamp(min=1e-12)).mean()))
        lam = base.thinking_residual_Lambda
        values = lam.Lambda.detach().float()
        record.update(lambda_mean=float(values.mean()), lambda_min=float(values.min()),
                      gate_a_at_r1=float(torch.exp(-lam.c * torch.nn.functional.softplus(-values)).mean()))
        self._step()["thinking"] = record

    # ------------------------------------------------------------ the optimizer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = {}
        for name, params in self.groups.items():
            present = [p.grad for p in params if p.grad is not None]
            grads[name] = {"grad_norm": _norm(present), "grads_none": len(params) - len(present)}
            self._before[name] = [p.detach().clone() for p in params]
        self._step()["optimizer"] = grads

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        record = self._step()["optimizer"]
        for name, params in self.groups.items():
            group, before = self._param_group(name), self._before.pop(name)
            lr, decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
            delta = [p.detach().float() - b.float() for p, b in zip(params, before)]
            decay_part = lr * decay * _norm(before)
            adam_step = [d + lr * decay * b.float() for d, b in zip(delta, before)]
            states = [inner.state.get(p, {}) for p in params]
            first = [s["exp_avg"] for s in states if "exp_avg" in s]
            second = [s["exp_avg_sq"] for s in states if "exp_avg_sq" in s]
            record[name].update(
                lr=lr, weight_decay=decay, update_norm=_norm(delta), adam_step_norm=_norm(adam_step),
                weight_decay_step_norm=decay_part, exp_avg_norm=_norm(first) if first else None,
                exp_avg_sq_norm=_norm(second) if second else None,
                exp_avg_sq_sqrt_norm=_norm(s.sqrt() for s in second) if second else None,
                param_norm=_norm(params),
                drift_from_start=_norm(p.detach().float() - p0.float() for p, p0 in zip(params, self.initial[name])))

    # ------------------------------------------------------------ the trainer's own metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # a training step's log (evaluation logs other keys)
            self.steps.setdefault(state.global_step, {"step": state.global_step})["logs"] = dict(logs)

    def to_json(self) -> list[dict]:
        return [self.steps[step] for step in sorted(self.steps)]


def attach(trainer, keep_texts: bool = True) -> CollapseTrace:
    """Trace ``trainer`` (built, optimizer created, not yet trained): its first reward function,
    its thinking metrics (hybrid runs) and a callback."""
    trace = CollapseTrace(trainer, keep_texts=keep_texts)
    functions = list(trainer.reward_funcs)
    first = next((i for i, f in enumerate(functions) if callable(f) and not isinstance(f, torch.nn.Module)), None)
    if first is None:
        raise ValueError("the trace reads completions through a reward function; this trainer has none (only models)")
    functions[first] = trace.wrap_reward(functions[first])  # one of them: each completion recorded once
    trainer.reward_funcs = functions
    if hasattr(trainer, "_log_thinking_metrics"):
        trainer._log_thinking_metrics = trace.wrap_thinking_metrics(trainer._log_thinking_metrics)
    trainer.add_callback(trace)
    return trace
