"""vLLM models that decode like the fork's hybrid sampling: Llama and Qwen2, subclassed.

Each is the stock vLLM model plus ``HybridThinkingMixin``: the thinking modules (loaded from the
fork checkpoint's ``model.thinking_*`` weights), a weightless state layer whose per-request slot
holds the last final hidden state and the answer-marker automaton state, and a forward that,
for each row that really decodes (``backend``), advances the marker automaton with the fed token
and, while the marker has not been found, replaces the token's embedding by the gated mix with
the latent of the previous step. Prompt tokens are never mixed, as in the fork.

With a top-k embedding latent, ``compute_logits`` (what vLLM's runner calls on each request's last
hidden state to sample) also keeps the top-k of those logits in the request's slot, so the next step
forms its latent without a second LM head. Only logits computed on exactly the hidden states the
forward left are kept (checked by value), and a slot's top-k is used once: a row without one has its
logits computed again from the kept hidden state (``row_stats["latents_recomputed"]``).

Declaring ``IsHybrid`` is what makes vLLM allocate the per-request state (and treat the model's
KV cache as attention + "mamba"). ``ModelConfig.is_hybrid`` is also false when the config's
``layer_types`` are all full attention (Qwen2's): ``engine_args`` renames them, and the model
checks at start-up that vLLM did treat it as hybrid.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from transformers.hybrid_thinking.exploration import advance_keys
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.interfaces import IsHybrid
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .backend import HybridThinkingStateError, HybridThinkingStateMetadata
from .engine_args import SCHEDULER
from .recorder import RolloutRecorder
from .scheduler import HybridThinkingScheduler
from .state import (KEPT_READY_SLOT, MARKER_SLOT, NOISE_KEY_SLOT, STATE_COPY_FUNCS, STATE_DTYPES, HybridThinkingState,
                    state_layer_name, state_shapes)
from .thinking import CHECKPOINT_PREFIX, HybridThinkingModules

LATENT_TEMPERATURE_KEY = "hrpo_latent_temperature"
SAMPLE_NOISE_KEY = "hrpo_sample_noise"


def _answer_marker_automaton(vllm_config: VllmConfig, config):
    """The fork's answer-marker automaton for this model's tokenizer and marker (a CPU table)."""
    from transformers import AutoTokenizer
    from transformers.hybrid_thinking.config import DEFAULT_ANSWER_MARKER
    from transformers.hybrid_thinking.marker import AnswerMarkerAutomaton

    model_config = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                              trust_remote_code=model_config.trust_remote_code)
    marker = getattr(config, "answer_marker", None) or DEFAULT_ANSWER_MARKER
    return AnswerMarkerAutomaton(tokenizer, marker, config.vocab_size, device="cpu")


def _kept_topk(config) -> int:
    """k of the top-k the state keeps per request: the embedding latent's top-k, else 0 (also when k is
    not below the vocabulary: the fork's ``latent_weights`` then reads the whole distribution)."""
    topk = getattr(config, "thinking_latent_topk", None)
    if not topk or topk >= config.vocab_size or getattr(config, "thinking_latent_source", None) == "projection":
        return 0
    return int(topk)


class HybridThinkingMixin:
    """The hybrid-thinking part of a vLLM causal LM (placed before the vLLM class in the bases)."""

    is_hybrid = True

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        config = vllm_config.model_config.hf_config
        return state_shapes(config.hidden_size, _kept_topk(config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return STATE_DTYPES

    @classmethod
    def get_mamba_state_copy_func(cls):
        return STATE_COPY_FUNCS

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self._check_engine(vllm_config)
        self.hybrid = HybridThinkingModules(config)
        self.kept_topk = _kept_topk(config)
        self.thinking_state = HybridThinkingState(config.hidden_size, state_layer_name(config.num_hidden_layers),
                                                  self.kept_topk)
        # (slots, their last hidden states) of this step's rows, for compute_logits to keep their top-k
        self._pending_kept: tuple[torch.Tensor, torch.Tensor] | None = None
        automaton = _answer_marker_automaton(vllm_config, config)
        self.register_buffer("marker_table", automaton.table, persistent=False)
        self.marker_start, self.marker_final = automaton.start_state, automaton.final
        self.vocab_size = config.vocab_size
        self.latent_temperature = float(getattr(config, LATENT_TEMPERATURE_KEY, 1.0) or 1.0)
        # exploration noise is drawn while the engine samples (as the fork's do_sample), keyed by a seed per call
        self.sample_noise = self.hybrid.noise != "none" and bool(getattr(config, SAMPLE_NOISE_KEY, False))
        self.noise_seed = 0
        # Rows seen, for tests and diagnostics: decode rows, of which mixed and past the marker;
        # prompt chunks, of which one-token chunks (after a first chunk, the stock Mamba builder
        # would call them decodes; a one-token prompt counts here too).
        self.row_stats = dict.fromkeys(("decode_rows", "mixed", "marker_found", "prompt_chunks",
                                        "one_token_prompt_chunks", "latents_recomputed"), 0)
        # What the trainer's replay needs, while a trainer asks for it (start_recording): off otherwise.
        self.recorder: RolloutRecorder | None = None

    def start_recording(self) -> None:
        """Record the replay inputs of every request decoded from now on (``hrpo.vllm_plugin.recorder``)."""
        self.recorder = RolloutRecorder()

    def set_noise_seed(self, seed: int) -> None:
        """The seed the noise keys of the requests started from now on begin with (the fork draws one per
        generate call); the keys then follow each request's tokens."""
        self.noise_seed = int(seed)

    def take_recording(self) -> list:
        """The rollouts recorded since ``start_recording`` (CPU), and recording off."""
        recorder, self.recorder = self.recorder, None
        return [] if recorder is None else recorder.assemble()

    @staticmethod
    def _check_engine(vllm_config: VllmConfig) -> None:
        """Refuse engine settings under which the decoded tokens would silently differ from the fork's."""
        if not vllm_config.model_config.is_hybrid:
            raise ValueError("vLLM does not treat the hybrid-thinking model as hybrid (ModelConfig.is_hybrid is "
                             "False), so it would keep no per-request state: a config whose layer_types are all "
                             "full attention needs them renamed (hrpo.vllm_plugin.engine_args.hybrid_llm_kwargs "
                             "does it through hf_overrides)")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("hybrid thinking needs enable_prefix_caching=False: a cached prefix would skip the "
                             "step-by-step mixing of completion tokens")
        scheduler = vllm_config.scheduler_config.get_scheduler_cls()
        if not (isinstance(scheduler, type) and issubclass(scheduler, HybridThinkingScheduler)):
            raise ValueError(f"hybrid thinking needs scheduler_cls={SCHEDULER!r} (got {scheduler!r}): vLLM's own "
                             f"scheduler preempts when the KV cache runs out and recomputes the request unmixed")
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise NotImplementedError("hybrid thinking in vLLM supports no pipeline parallelism")
        if vllm_config.speculative_config is not None:
            raise NotImplementedError("hybrid thinking in vLLM supports no speculative decoding")

    # --- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The stock loader for the stock weights; the fork's ``model.thinking_*`` to ``hybrid``."""
        thinking: dict[str, torch.Tensor] = {}

        def stock():
            for name, tensor in weights:
                if name.startswith(CHECKPOINT_PREFIX + "thinking_"):
                    thinking[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(stock()))
        return loaded | self.hybrid.load(thinking)

    # --- the forward

    def _state_metadata(self) -> HybridThinkingStateMetadata | None:
        """This step's metadata of the state layer; None in vLLM's profiling and dummy runs."""
        attn_metadata = get_forward_context().attn_metadata
        if attn_metadata is None:
            return None
        if not isinstance(attn_metadata, dict):
            raise HybridThinkingStateError(f"unexpected attention metadata {type(attn_metadata).__name__} "
                                           f"(micro-batching is not supported)")
        metadata = attn_metadata.get(self.thinking_state.prefix)
        if metadata is None and attn_metadata:  # a real step without our state: it would decode unmixed
            raise HybridThinkingStateError(f"vLLM built no metadata for the state layer "
                                           f"{self.thinking_state.prefix!r} (layers with metadata: "
                                           f"{sorted(attn_metadata)[:4]}...)")
        if metadata is not None and not isinstance(metadata, HybridThinkingStateMetadata):
            raise HybridThinkingStateError(f"the state layer got {type(metadata).__name__}, not "
                                           f"HybridThinkingStateMetadata: is the hrpo plugin's backend registered?")
        return metadata

    def _latent_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits over the vocabulary, as vLLM's sampler sees them."""
        return super().compute_logits(hidden)[:, :self.vocab_size].float()

    def compute_logits(self, hidden_states: torch.Tensor):
        """vLLM's logits; with a top-k latent, their top-k kept in the slots of the rows they belong to."""
        logits = super().compute_logits(hidden_states)
        pending, self._pending_kept = self._pending_kept, None
        if pending is not None and logits is not None:
            slots, last_hidden = pending
            if last_hidden.shape == hidden_states.shape and torch.equal(last_hidden, hidden_states):
                weights, token_ids = self.hybrid.kept_weights(logits[:, :self.vocab_size], self.latent_temperature)
                self.thinking_state.kept_probs[slots] = weights.float()
                self.thinking_state.kept_ids[slots] = token_ids
                self.thinking_state.ints[slots, KEPT_READY_SLOT] = 1
        return logits

    def _embedding_matrix(self) -> torch.Tensor:
        return self.model.embed_tokens.weight[:self.vocab_size]

    def _mix_decode_inputs(self, input_ids: torch.Tensor | None, positions: torch.Tensor, embeds: torch.Tensor,
                           metadata: HybridThinkingStateMetadata) -> torch.Tensor:
        """Reset the marker of prompt rows; advance it for decode rows and mix their (single) token
        with the latent of the hidden state their previous step left in the slot."""
        ints = self.thinking_state.ints
        prompt_slots = metadata.row_slots[metadata.row_prefilling]
        if prompt_slots.numel():
            ints[prompt_slots, MARKER_SLOT] = self.marker_start
            ints[prompt_slots, KEPT_READY_SLOT] = 0
            query_lens = torch.diff(metadata.row_query_start_loc)[metadata.row_prefilling]
            self.row_stats["prompt_chunks"] += prompt_slots.numel()
            self.row_stats["one_token_prompt_chunks"] += int((query_lens == 1).sum())
            if self.sample_noise:
                self._fold_prompt_keys(input_ids, positions, metadata)
        rows = metadata.row_decoding.nonzero().squeeze(1)
        self.row_stats["decode_rows"] += rows.numel()
        inputs = None
        thinking = torch.zeros(0, dtype=torch.bool, device=embeds.device)
        if rows.numel():
            if input_ids is None:
                raise HybridThinkingStateError("decode steps need token ids (prompt embeddings are not supported)")
            tokens = metadata.row_query_start_loc[rows]
            slots = metadata.row_slots[rows]
            fed = input_ids[tokens].long()
            marker = self.marker_table[ints[slots, MARKER_SLOT], fed]
            ints[slots, MARKER_SLOT] = marker
            if self.sample_noise:  # the fork advances every running row's key by the token it feeds
                ints[slots, NOISE_KEY_SLOT] = advance_keys(ints[slots, NOISE_KEY_SLOT], fed)
            thinking = marker != self.marker_final
            mixed = int(thinking.sum())
            self.row_stats["mixed"] += mixed
            self.row_stats["marker_found"] += rows.numel() - mixed
            if mixed:
                tokens, slots = tokens[thinking], slots[thinking]
                embedding = self._embedding_matrix()
                keys = ints[slots, NOISE_KEY_SLOT] if self.sample_noise else None
                inputs = self.hybrid.latent_inputs(self.thinking_state.hidden[slots], self._latent_logits,
                                                   embedding, self.latent_temperature, keys, self._kept(slots))
                embeds = embeds.clone()
                embeds[tokens] = self.hybrid.mix(embeds[tokens], self.hybrid.latent(inputs, embedding))
        if self.recorder is not None:
            self.recorder.add_step(input_ids, positions, metadata, rows, thinking, inputs)
        return embeds

    def _kept(self, slots: torch.Tensor):
        """The slots' kept top-k (``compute_logits``), when every one has its own; else None (recomputed)."""
        if not self.kept_topk:
            return None
        ready = self.thinking_state.ints[slots, KEPT_READY_SLOT] == 1
        if not bool(ready.all()):
            self.row_stats["latents_recomputed"] += int((~ready).sum())
            return None
        return self.thinking_state.kept_probs[slots], self.thinking_state.kept_ids[slots]

    def _fold_prompt_keys(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                          metadata: HybridThinkingStateMetadata) -> None:
        """Each prompt chunk's tokens folded into its row's noise key (from the seed at position 0), as the
        fork's ``initial_keys`` folds a prompt; chunks of one prompt continue one another."""
        if input_ids is None:
            raise HybridThinkingStateError("latent noise needs token ids (prompt embeddings are not supported)")
        ints = self.thinking_state.ints
        rows = metadata.row_prefilling.nonzero().squeeze(1).tolist()
        starts = metadata.row_query_start_loc.tolist()
        for row in rows:
            slot, begin, end = int(metadata.row_slots[row]), starts[row], starts[row + 1]
            key = (torch.tensor([self.noise_seed], dtype=torch.int64) if int(positions[begin]) == 0
                   else ints[slot, NOISE_KEY_SLOT].reshape(1).cpu())
            for token in input_ids[begin:end].cpu():  # small integer ops: cheaper on the host
                key = advance_keys(key, token.reshape(1))
            ints[slot, NOISE_KEY_SLOT] = key.to(ints.device)[0]

    def _keep_last_hidden(self, hidden: torch.Tensor, metadata: HybridThinkingStateMetadata) -> None:
        """Each row's last final hidden state into its slot (a prompt chunk's is overwritten by the
        next chunk's; the last chunk's feeds the first decode step)."""
        rows = (metadata.row_decoding | metadata.row_prefilling).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        last = metadata.row_query_start_loc[rows + 1] - 1
        slots = metadata.row_slots[rows]
        self.thinking_state.hidden[slots] = hidden[last].float()
        if self.kept_topk:  # this step's top-k, once compute_logits has it
            self.thinking_state.ints[slots, KEPT_READY_SLOT] = 0
            self._pending_kept = (slots, hidden[last])

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        self._pending_kept = None
        metadata = self._state_metadata()
        if metadata is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        inputs_embeds = self._mix_decode_inputs(input_ids, positions, inputs_embeds, metadata)
        hidden = super().forward(None, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not isinstance(hidden, torch.Tensor):
            raise HybridThinkingStateError(f"the base model returned {type(hidden).__name__}, expected the final "
                                           f"hidden states (no pipeline parallelism, no auxiliary hidden states)")
        self._keep_last_hidden(hidden, metadata)
        return hidden


class HybridThinkingLlamaForCausalLM(HybridThinkingMixin, LlamaForCausalLM, IsHybrid):
    """vLLM's Llama with hybrid thinking (a fork checkpoint with ``thinking_latent_source``)."""


class HybridThinkingQwen2ForCausalLM(HybridThinkingMixin, Qwen2ForCausalLM, IsHybrid):
    """vLLM's Qwen2 with hybrid thinking (a fork checkpoint with ``thinking_latent_source``)."""
