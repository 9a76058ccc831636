"""Rollouts sampled by vLLM in TRL's colocate mode, for both arms (``--use_vllm``).

TRL's ``VLLMGeneration`` starts the engine on the model's folder with settings of its own. A run
here starts it through ``EngineRollouts``, TRL's class with the engine start replaced:

- the engine reads an engine folder written from the trainer's model: its config (with the
  thinking fields the run set, and the model's architecture), generation config and tokenizer.
  The weights start as vLLM's dummy ones and TRL's weight sync, which runs before the first
  generation (``_last_loaded_step = -1``) and after every optimizer step, loads them all: the
  merged adapter, and for hybrid thinking the gates, Lambda and projection
  (``hrpo.vllm_plugin``'s ``load_weights`` takes any subset);
- the engine computes in the trainer's dtype (TRL's engine would take the checkpoint's, bfloat16
  for SmolLM2, while a CPU run trains in float32): the trainer scores the rollouts as sampled;
- eager mode (the plugin's state update has no CUDA-graph support yet);
- a context of the longest prompt plus the longest completion unless ``--vllm_max_model_length`` says
  otherwise, and on the CPU a KV cache sized for the batch (``kv_cache_bytes``);
- for hybrid thinking, the plugin's engine settings (``hybrid_llm_kwargs``: its architecture,
  the latent temperature = the sampling temperature, no prefix caching, a scheduler that never
  preempts) and, around every generate call, the plugin's recorder: the replay inputs of each
  rollout come back with it (``hrpo.vllm_plugin.recorder``) and go to the trainer's
  ``ReplayIndex`` with vLLM's sampling log-probs (``replay_entries``).

The plain-GRPO arm uses the same class without the plugin (stock vLLM, the same dtype and
settings), so that the two arms still differ only in hybrid thinking.
"""
from __future__ import annotations

import functools
import gc
import os
import socket
from pathlib import Path

import torch
from trl.generation.vllm_generation import VLLMGeneration

from .errors import UsageError
from .replay import completion_mask
from .vllm_plugin.recorder import LATENT_FIELDS

# The engine start below mirrors trl 1.15's VLLMGeneration._init_vllm (colocate branch).
TRL_ENGINE_KWARGS = {"distributed_executor_backend": "external_launcher", "max_num_batched_tokens": 4096,
                     "logprobs_mode": "processed_logprobs"}


def set_rendezvous_port() -> None:
    """MASTER_ADDR and MASTER_PORT for the engine's process group, as trl's ``ensure_master_addr_port``
    sets them (a port already set is kept: a launcher's, shared by every rank), except that an unset,
    "0" or "auto" port becomes one the OS assigns. trl tries 29500 first, so runs started together
    on one machine (a sweep of single-device runs) all took 29500, and all but one failed with
    EADDRINUSE when the engine started."""
    from trl.trainer.utils import ensure_master_addr_port

    if os.environ.get("MASTER_PORT", "").strip().lower() in {"", "0", "auto"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    ensure_master_addr_port()


def write_engine_folder(model, tokenizer, folder: str | Path) -> Path:
    """The config (thinking fields included, ``architectures`` = the model's class), generation config and
    tokenizer of the trainer's model, for vLLM to build its model from (weights come by TRL's sync)."""
    folder = Path(folder)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    getattr(tokenizer, "tokenizer", tokenizer).save_pretrained(folder)
    return folder


def engine_dtype(args, model) -> str:
    """The dtype the engine computes in: the trainer's (bf16/fp16 flags, else the weights')."""
    if getattr(args, "bf16", False):
        return "bfloat16"
    if getattr(args, "fp16", False):
        return "float16"
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def check_engine_settings(args, hybrid: bool, sharded: bool = False) -> None:
    """What vLLM rollouts cannot do here, refused before training (see docs/scaling.md). ``sharded``:
    DeepSpeed or FSDP wraps the model."""
    if args.vllm_mode != "colocate":
        raise UsageError(f"--vllm_mode {args.vllm_mode}: HRPO samples with vLLM in colocate mode only (the "
                         f"engine's recorded replay inputs stay in the process; `trl vllm-serve` returns tokens "
                         f"and log-probs only); use --vllm_mode colocate")
    if hybrid and args.vllm_tensor_parallel_size != 1:
        raise UsageError(f"--vllm_tensor_parallel_size {args.vllm_tensor_parallel_size}: hybrid thinking in vLLM "
                         f"is tested with one engine per process only; use 1")
    if hybrid and sharded:
        raise UsageError("--use_vllm with hybrid thinking under DeepSpeed or FSDP: the vLLM rollouts of hybrid "
                         "thinking are tested in one process and under DDP only; use DDP, or sample with the "
                         "fork's generate (leave --use_vllm out)")


def kv_cache_bytes(config, sequences: int, tokens: int, dtype: str) -> int:
    """A KV cache that holds ``sequences`` whole sequences of ``tokens`` (the plugin's scheduler never
    preempts, so every running sequence must fit), with a quarter to spare: for vLLM's CPU build, whose
    default reserves a fraction of the machine's memory (``gpu_memory_utilization``, 0.9 in TRL) and
    refuses to start when the trainer and other processes already use that much."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(getattr(torch, dtype)).bits // 8
    from .vllm_plugin.state import state_bytes

    state = state_bytes(config.hidden_size, getattr(config, "thinking_latent_topk", None) or 0)
    return int(1.25 * sequences * (tokens * per_token + state)) + (64 << 20)


class EngineRollouts(VLLMGeneration):
    """TRL's colocated vLLM generation on an engine folder, in the trainer's dtype, eager, and for
    hybrid thinking with the plugin and its recorder (see the module docstring).

    ``on_rollouts(prompt_ids, completion_ids, logprobs, recorded)`` is called after every generate
    call of a hybrid engine, with vLLM's outputs (as TRL's ``generate`` returns them) and the plugin's
    recorded rollouts."""

    def __init__(self, *args, engine_folder: Path, dtype: str, hybrid: bool, latent_temperature: float = 1.0,
                 on_rollouts=None, **kwargs):
        self.engine_folder, self.engine_dtype, self.hybrid = engine_folder, dtype, hybrid
        self.latent_temperature, self.on_rollouts = latent_temperature, on_rollouts
        super().__init__(*args, **kwargs)

    def engine_kwargs(self) -> dict:
        """``LLM(...)``'s arguments: TRL's colocate ones with the changes of the module docstring."""
        kwargs = dict(TRL_ENGINE_KWARGS, tensor_parallel_size=self.tensor_parallel_size,
                      gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_length,
                      max_num_seqs=self.max_num_seqs, enable_sleep_mode=self.enable_sleep_mode,
                      model_impl=self.model_impl, seed=self.accelerator.process_index // self.tensor_parallel_size,
                      trust_remote_code=self.trust_remote_code, load_format="dummy", enforce_eager=True)
        if self.accelerator.device.type == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(base.config, self.max_num_seqs, self.max_model_length,
                                                             self.engine_dtype)
        if not self.hybrid:
            return dict(kwargs, model=str(self.engine_folder), dtype=self.engine_dtype)
        from .vllm_plugin.engine_args import hybrid_llm_kwargs

        return hybrid_llm_kwargs(self.engine_folder, latent_temperature=self.latent_temperature, sample_noise=True,
                                 dtype=self.engine_dtype, **kwargs)

    def _init_vllm(self):
        """trl 1.15's colocate start (the process-group environment, tensor-parallel groups), with our
        engine arguments and ``set_rendezvous_port``; server mode is refused by ``check_engine_settings``
        before this."""
        from vllm import LLM

        if self.mode != "colocate":
            raise UsageError(f"vLLM mode {self.mode!r}: only colocate is supported (hrpo.vllm_rollouts)")
        accelerator = self.accelerator
        if accelerator.num_processes % self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) must divide world size "
                             f"({accelerator.num_processes}) evenly.")
        if self.tensor_parallel_size > 1:
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i * self.tensor_parallel_size, (i + 1) * self.tensor_parallel_size))
                 for i in range(accelerator.num_processes // self.tensor_parallel_size)])
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        set_rendezvous_port()
        self.llm = LLM(**self.engine_kwargs())
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        accelerator.wait_for_everyone()

    def close(self) -> None:
        """Shut the engine down and release vLLM's process groups, before the run tears its own down:
        vLLM's exit hook would otherwise destroy groups that are gone (a traceback at every exit)."""
        from vllm.distributed import cleanup_dist_env_and_memory

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()

    def sync_weights(self):
        """TRL's colocate sync loads each weight into the engine's live parameters, which vLLM's CPU
        build has already repacked (and removed); vLLM's in-place reload (``reload_weights``) takes
        the weights in checkpoint format, loads them through the model's ``load_weights`` and
        processes them again, on every platform. The weights are TRL's (``_iter_named_params``: the
        merged adapter, and the thinking modules)."""
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params(),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def _iter_named_params(self):
        """TRL's (the policy's weights under vLLM's names), without another adapter's copies of the
        modules PEFT saves whole (the thinking modules of TRL's frozen "ref" adapter: TRL renames only
        the active adapter's ``modules_to_save.default.``), and with a tied LM head's weight after the
        embedding's: ``named_parameters`` lists a tied weight once, and vLLM's in-place reload otherwise
        leaves the LM head at its previous (at the first sync: dummy) values."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        embedding = next(name for name, module in base.named_modules() if module is base.get_input_embeddings())
        tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))
        for name, param in super()._iter_named_params():
            if ".modules_to_save." in name:
                continue
            yield name, param
            if tied and name == f"{embedding}.weight":
                yield "lm_head.weight", param

    def why_not_greedy(self, longest_prompt: int, max_tokens: int) -> str | None:
        """Why this engine would not decode held-out rows as the fork's greedy generate does (None: it would)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.hybrid and (getattr(base.config, "thinking_latent_noise", None) or "none") != "none":
            return ("the plugin draws the latent's exploration noise on every request of an engine that samples "
                    "it, and greedy decoding leaves it out")
        if self.tensor_parallel_size > 1:
            return "the engine spans several processes (--vllm_tensor_parallel_size > 1)"
        if self.enable_sleep_mode:
            return "the engine sleeps between generations (--vllm_enable_sleep_mode)"
        if longest_prompt + max_tokens > self.max_model_length:
            return (f"a prompt of {longest_prompt} tokens and {max_tokens} new ones exceed the engine's context of "
                    f"{self.max_model_length} tokens")
        return None

    def greedy_completions(self, prompt_ids: list[list[int]], max_tokens: int,
                           stop_token_ids: list[int]) -> list[list[int]]:
        """Each prompt's greedy completion (token ids up to and including a stop id), hybrid thinking as the
        engine samples it: held-out evaluation (``hrpo.held_out``). The caller syncs the weights first."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop_token_ids)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def generate(self, prompts, images, num_generations, profiler=None):
        if not self.hybrid:
            return super().generate(prompts, images, num_generations, profiler)
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # as the fork's generate: one noise seed per call
        self.llm.apply_model(functools.partial(_start_recording, seed=seed))
        try:
            out = super().generate(prompts, images, num_generations, profiler)
        finally:
            recorded = self.llm.apply_model(_take_recording)[0]  # one engine worker (no tensor parallelism)
        prompt_ids, completion_ids, logprobs, _ = out
        if self.on_rollouts is not None:
            self.on_rollouts(prompt_ids, completion_ids, logprobs, recorded)
        return out


def _start_recording(model, seed: int) -> None:
    model.set_noise_seed(seed)
    model.start_recording()


def _take_recording(model) -> list:
    return model.take_recording()


class EngineRolloutMiss(LookupError):
    """vLLM returned a completion that the plugin did not record."""


def replay_entries(prompt_ids, completion_ids, logprobs, recorded, eos_token_ids):
    """Per completion, what ``ReplayIndex.add_rollout`` takes: the attended tokens (prompt, completion up to
    and including its first stop token), the thinking mask over them, the sampling log-probs (0 on the
    prompt) and the latent inputs of the flagged positions. A completion's last token was sampled and
    never fed, so it is never flagged (its mix would only change logits past the completion). Also yields
    the prompt's length."""
    by_tokens = {tuple(rollout.tokens): rollout for rollout in recorded}
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        prompt, completion = list(prompt), list(completion)
        rollout = by_tokens.get(tuple(prompt + completion[:-1]))
        if rollout is None:
            raise EngineRolloutMiss(f"completion {row} of this vLLM batch ({len(prompt)} prompt and {len(completion)} "
                                    f"completion tokens) is not among the {len(recorded)} rollouts the hybrid-thinking "
                                    f"plugin recorded")
        kept = int(completion_mask(torch.tensor([completion]), eos_token_ids).sum()) if completion else 0
        length = len(prompt) + kept
        mask = torch.zeros(len(prompt) + len(completion), dtype=torch.bool)
        mask[len(prompt):len(prompt) + rollout.thinking.numel()] = rollout.thinking
        mask = mask[:length]
        flagged = int(mask.sum())
        sampled = torch.zeros(length, dtype=torch.float32)
        if logprobs is not None:
            values = [float("nan") if lp is None or lp[0] is None else lp[0] for lp in logprobs[row][:kept]]
            sampled[len(prompt):] = torch.tensor(values, dtype=torch.float32)
        latents = {key: None if getattr(rollout, key) is None else getattr(rollout, key)[:flagged]
                   for key in LATENT_FIELDS}
        yield torch.tensor(prompt + completion[:kept]), mask, sampled, latents, len(prompt)

