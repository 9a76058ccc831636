"""Hybrid sampling: the decoding loop of HRPO, with the latent sources of the seed.

``generate(..., processing_class=tokenizer)`` on a model with thinking modules routes
``_sample`` here. Each row is in its thinking phase until the answer marker has appeared
in its completion; while thinking, the token fed at the next step is mixed with the
latent of the step that sampled it. With ``return_thinking_embeds=True`` the output also
carries what the replay pass needs, aligned position by position with ``sequences``.

Sampling always applies the deterministic projection: while it runs, ``thinking_projection``
is in eval mode (its Dropout off), whatever the model's mode (TRL samples in train mode),
and its mode is restored afterwards. The training replay applies the dropout.

With ``use_cache=False`` every step feeds the whole sequence so far, with the thinking
inputs of every completion position (the same tokens as the cached loop, at quadratic cost).

Top-k latents and exploration noise (``exploration``) follow the model's config. Noise is
drawn only while sampling (not in greedy decoding), from keys that fold a per-call seed with
each row's tokens; what was fed is recorded (``thinking_noise``, ``thinking_latents``).

A projection source needs the last hidden state of each step, which the causal-LM forward
hands over on request. If a forward returns none, generation warns and falls back to the
embedding method (``thinking_latent_source`` of the output says so). With
``require_thinking_source=True`` it raises instead: what a trainer that must sample with the
configured source passes.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..generation.configuration_utils import GenerationMode
from ..generation.utils import GenerateDecoderOnlyOutput
from .exploration import advance_keys, gaussian_draws, initial_keys
from .marker import AnswerMarkerAutomaton
from .modeling import PROJECTION_MODULE, THINKING_INPUTS, HybridThinkingMixin

# generate() kwargs that belong to hybrid sampling; generate() pops them before it
# validates the model kwargs and hands them to _sample.
HYBRID_GENERATE_KWARGS = ("processing_class", "return_thinking_embeds", "is_inference", "answer_marker",
                          "thinking_monitor", "require_thinking_source")


def pop_hybrid_generate_kwargs(kwargs: dict) -> dict:
    """Take every hybrid option out of generate()'s kwargs; one given as None means its default."""
    popped = {key: kwargs.pop(key) for key in HYBRID_GENERATE_KWARGS if key in kwargs}
    return {key: value for key, value in popped.items() if value is not None}


# The generation modes hybrid sampling implements (it replaces _sample); every other mode
# (beam search, assisted decoding and prompt lookup, contrastive search, DoLa, ...) would
# return plain sequences, so hybrid options there are an error.
HYBRID_GENERATION_MODES = (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)


def _given_hybrid_options(kwargs: dict) -> list[str]:
    """The hybrid options that would change the result: given, not None and not False."""
    return sorted(key for key in HYBRID_GENERATE_KWARGS
                  if key in kwargs and kwargs[key] is not None and kwargs[key] is not False)


def check_hybrid_generate_route(custom_generate, kwargs: dict) -> None:
    """generate() before it dispatches: a custom_generate (a Hub recipe or a callable) and
    continuous batching (cache_implementation="paged") do not do hybrid sampling."""
    options = _given_hybrid_options(kwargs)
    if not options:
        return
    if custom_generate is not None:
        raise ValueError(f"hybrid sampling options ({', '.join(options)}) cannot be combined with custom_generate: "
                         f"only generate()'s own sampling and greedy decoding do hybrid sampling")
    if kwargs.get("cache_implementation") == "paged":
        raise ValueError(f"hybrid sampling options ({', '.join(options)}) cannot be combined with continuous "
                         f"batching (cache_implementation='paged')")


def check_hybrid_generation_mode(model, generation_mode, generation_mode_kwargs: dict) -> None:
    """generate() once the mode is known: hybrid options only in sampling / greedy decoding,
    only with a processing_class (which turns hybrid sampling on), only on a model built
    with hybrid thinking. Each is a ValueError, never a silently plain result."""
    options = _given_hybrid_options(generation_mode_kwargs)
    if not options:
        return
    if generation_mode not in HYBRID_GENERATION_MODES:
        raise ValueError(f"hybrid sampling options ({', '.join(options)}) were given, but the generation mode is "
                         f"{generation_mode.value}: hybrid sampling is implemented for sampling and greedy decoding "
                         f"only (num_beams=1; no assistant_model, prompt_lookup_num_tokens, penalty_alpha, "
                         f"dola_layers or constraints), and this mode would return plain sequences")
    if "processing_class" not in options:
        raise ValueError(f"{', '.join(options)} only apply to hybrid sampling, which needs "
                         f"processing_class=<tokenizer> (to find the answer marker); without it generate() "
                         f"would return plain sequences")
    thinking_base_model(model)


def strip_hybrid_generate_kwargs(model_kwargs: dict) -> None:
    """Without a processing_class there is no hybrid sampling: drop its other options."""
    for key in HYBRID_GENERATE_KWARGS:
        model_kwargs.pop(key, None)


@dataclass
class HybridGenerateOutput(GenerateDecoderOnlyOutput):
    """Generation output plus the replay data (all shaped like ``sequences`` + (d,)).

    thinking_mask:        bool (batch, length), True where the fed input was mixed.
    thinking_latents:     the embedding-method latent used there (model dtype), or None
                          when the source did not need it.
    thinking_hidden:      the final hidden state that the projection was applied to
                          (model dtype), or None.
    thinking_noise:       float32, the Gaussian noise added to the latent there, or None
                          (no Gaussian noise configured, or greedy decoding).
    thinking_latent_left_out_mass: float32 (batch, length), the sampling probability mass
                          that a top-k latent left out (0 with the whole vocabulary), or None
                          when no embedding-method latent was formed.
    thinking_gate_ratio:  float32 (batch, length), mean over d of the gate a where mixed;
    thinking_hidden_ratio: the same for sqrt(1 - a^2).
    sampled_token_logprobs: float32 (batch, length), the log-prob of each sampled token
                          under the sampling distribution (after the logits processors),
                          0 on prompt positions: what a replay should reproduce.
    thinking_latent_source: the source used ("embedding" when a projection source had to
                          fall back because the forward returned no hidden state).
    """

    thinking_mask: torch.Tensor | None = None
    thinking_latents: torch.Tensor | None = None
    thinking_hidden: torch.Tensor | None = None
    thinking_noise: torch.Tensor | None = None
    thinking_latent_left_out_mass: torch.Tensor | None = None
    thinking_gate_ratio: torch.Tensor | None = None
    thinking_hidden_ratio: torch.Tensor | None = None
    sampled_token_logprobs: torch.Tensor | None = None
    thinking_latent_source: str | None = None


def thinking_base_model(model: nn.Module) -> HybridThinkingMixin:
    base = getattr(model, "model", None)
    if not isinstance(base, HybridThinkingMixin):
        raise ValueError(f"hybrid generation (processing_class=...) needs a model whose base model has the "
                         f"thinking modules of the HRPO fork (Qwen2Model or LlamaModel); "
                         f"{type(model).__name__}.model is {type(base).__name__}")
    base._require_thinking_modules("hybrid generation (processing_class=...)")
    return base


@contextlib.contextmanager
def deterministic_projection(base: HybridThinkingMixin):
    """``thinking_projection`` (with its PEFT copies) in eval mode; each module's mode restored after.
    A model built for the embedding source has no projection: nothing to do."""
    projection = base._modules.get(PROJECTION_MODULE)
    if projection is None:
        yield
        return
    modes = [(module, module.training) for module in projection.modules()]
    projection.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _kept_past_the_step(value):
    """A copy of what the loop keeps from a step's outputs past that step (a tensor, or nested
    tuples of them). The compiled forward of the decoding steps may hand every step its outputs in
    the same storage (CUDA-graph replay under mode="reduce-overhead" does): a view kept across
    steps would hold a later step's values. Upstream's ``_sample`` copies its logits for the same reason."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_kept_past_the_step(item) for item in value)
    return value.clone()


class HybridRecorder:
    """What the hybrid loop keeps of each completion position, and the output fields it makes of it.

    Position p of the completion holds the p-th token sampled. At the step that samples it the
    loop hands over the token's log-prob under the sampling distribution (``sampled``) and, for
    every token but the last (which is never fed), the thinking inputs the next forward feeds with
    it and the probability mass its top-k latent left out (``to_be_fed``); at that forward, the
    gate and hidden ratios of its position (``forwarded``). ``padded`` stacks a field's values
    along the positions and pads them with zeros to (batch, length, ...), prompt and last positions
    included: what ``finish`` sets on the output and, without a cache (``every_position``), what
    each forward feeds (``forward_inputs``).

    ``fields``: the output fields of this run, each with its dtype (None: that of the first
    value, the embedding dtype without one) and its shape per position after the batch.
    """

    def __init__(self, batch: int, prompt_len: int, device, embed_dtype, fields: dict, *,
                 keep: bool, every_position: bool):
        self.batch, self.prompt_len, self.device, self.embed_dtype = batch, prompt_len, device, embed_dtype
        self.fields = fields
        self.keep = keep  # return_thinking_embeds: every field is returned
        self.keep_inputs = keep or every_position
        self.every_position = every_position
        self.values: dict[str, list[torch.Tensor]] = {key: [] for key in fields}
        self.pending: dict | None = None  # the thinking inputs of the token sampled last, not yet fed

    @classmethod
    def for_run(cls, batch: int, prompt_len: int, device, hidden_size: int, embed_dtype, *, latents: bool,
                hidden: bool, noise: bool, keep: bool, every_position: bool) -> "HybridRecorder":
        """The fields of a run: the mask, ratios and log-probs always; the embedding-method latent
        (and its left-out mass), the hidden state and the noise when the run forms them."""
        f32, d = torch.float32, (hidden_size,)
        fields = {"thinking_mask": (torch.bool, ()), "thinking_gate_ratio": (f32, ()),
                  "thinking_hidden_ratio": (f32, ()), "sampled_token_logprobs": (f32, ())}
        if latents:
            fields.update(thinking_latents=(embed_dtype, d), thinking_latent_left_out_mass=(f32, ()))
        if hidden:
            fields["thinking_hidden"] = (None, d)
        if noise:
            fields["thinking_noise"] = (f32, d)
        return cls(batch, prompt_len, device, embed_dtype, fields, keep=keep, every_position=every_position)

    def sampled(self, scores: torch.Tensor, tokens: torch.Tensor) -> None:
        """A step's tokens, with ``scores`` the logits after the logits processors."""
        if self.keep:
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
            self.values["sampled_token_logprobs"].append(logprobs)

    def to_be_fed(self, inputs: dict, left_out_mass: torch.Tensor | None) -> None:
        """The thinking inputs (``THINKING_INPUTS``, None where not formed) that the next forward
        feeds with the token just sampled, and the mass its top-k latent left out."""
        self.pending = inputs
        if self.keep_inputs:
            for key, value in inputs.items():
                if key in self.values:
                    self.values[key].append(value)
        if self.keep and "thinking_latent_left_out_mass" in self.fields:
            self.values["thinking_latent_left_out_mass"].append(left_out_mass)

    def forward_inputs(self, length: int) -> dict:
        """The thinking inputs of the next forward: with a cache those of the token it feeds (none
        when there is none: a finished peer keeps stepping), without one those of every completion
        position so far, as ``length`` positions."""
        if not self.every_position:
            return self.pending or {}
        if not self.values["thinking_mask"]:
            return {}
        return {key: self.padded(key, length) if key in self.fields else None for key in THINKING_INPUTS}

    def forwarded(self, outputs) -> None:
        """The forward that fed the pending inputs: the gate and hidden ratios of their position
        (copied: see ``_kept_past_the_step``)."""
        if self.pending is not None and self.keep:
            self.values["thinking_gate_ratio"].append(_kept_past_the_step(outputs.thinking_gate_ratio[:, -1]))
            self.values["thinking_hidden_ratio"].append(_kept_past_the_step(outputs.thinking_hidden_ratio[:, -1]))
        self.pending = None

    def padded(self, key: str, length: int) -> torch.Tensor:
        """The values of ``key``, position by position from the prompt's end, as (batch, length, ...)."""
        values = self.values[key]
        dtype, tail = self.fields[key]
        if dtype is None:
            dtype = values[0].dtype if values else self.embed_dtype
        out = torch.zeros((self.batch, length, *tail), dtype=dtype, device=self.device)
        if values:
            out[:, self.prompt_len:self.prompt_len + len(values)] = torch.stack(values, dim=1).to(dtype)
        return out

    def finish(self, result: HybridGenerateOutput) -> HybridGenerateOutput:
        """Every field of the run, as long as the output's sequences."""
        for key in self.fields:
            setattr(result, key, self.padded(key, result.sequences.shape[1]))
        return result


def _thinking_source(model, base: HybridThinkingMixin, outputs, thinking_monitor: bool,
                     require_thinking_source: bool) -> tuple[bool, bool, str]:
    """(whether the latent uses the forward's last hidden state, whether the embedding-method
    latent is formed, the source used). A projection source whose forward (here the prefill's
    ``outputs``) returned no hidden state falls back to the embedding method, with a warning, or
    raises with ``require_thinking_source``."""
    source = base.config.thinking_latent_source
    wants_hidden = source != "embedding"
    use_hidden = wants_hidden and getattr(outputs, "last_hidden_state", None) is not None
    if wants_hidden and not use_hidden and require_thinking_source:
        raise RuntimeError(f"thinking_latent_source={source!r} needs the last hidden state, but "
                           f"{type(model).__name__}'s forward returned none (require_thinking_source=True: "
                           f"no fallback to the embedding method). The forward must accept "
                           f"return_last_hidden_state=True and return last_hidden_state")
    if wants_hidden and not use_hidden:
        warnings.warn(f"thinking_latent_source={source!r} needs the last hidden state, but "
                      f"{type(model).__name__}'s forward returned none: falling back to the embedding "
                      f"method for this generation", stacklevel=4)
    use_latents = source != "projection" or not use_hidden or thinking_monitor
    return use_hidden, use_latents, source if use_hidden else "embedding"


def hybrid_sample(model, *args, **kwargs):
    """See ``_hybrid_sample``; the projection runs deterministically (eval mode) throughout."""
    with deterministic_projection(thinking_base_model(model)):
        return _hybrid_sample(model, *args, **kwargs)


def _hybrid_sample(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    *,
    processing_class,
    return_thinking_embeds: bool = False,
    is_inference: bool = False,
    answer_marker: str | None = None,
    thinking_monitor: bool = False,
    require_thinking_source: bool = False,
    **model_kwargs,
):
    """The hybrid sampling loop. ``thinking_monitor``: also record the embedding-method latent
    when the source does not need it (to compare the two methods on the same steps; costs one
    V x d product). ``require_thinking_source``: raise instead of falling back to the embedding
    method when a projection source gets no hidden state from the forward.

    Maintenance: this mirrors ``GenerationMixin._sample`` of transformers 5.17.0
    (``generation/utils.py``). On an upgrade, diff ``_sample`` between the old and the new
    release and carry what changed into this function.

    Kept as upstream has it: ``_prefill``, the ``_has_unfinished_sequences`` loop (with
    ``synced_gpus`` a finished peer keeps stepping), ``prepare_inputs_for_generation`` with
    ``next_sequence_length``, ``_update_model_kwargs_for_generation``, float32 logits through
    the logits processors, multinomial or argmax, padding after EOS, the stopping criteria,
    the streamer, and the output scores, logits, attentions and hidden states per step.

    Differs: each step's forward also gets the thinking inputs of the token sampled last (and
    ``return_last_hidden_state`` when the source uses the projection); the softmax is computed
    for greedy decoding too (the embedding latent needs it) and ``is_inference`` forces greedy;
    the answer-marker automaton (``marker``) ends a row's thinking phase at the marker; without a
    cache each step feeds the whole sequence; the per-position thinking data, the noise fed
    and the sampled tokens' log-probs are recorded (``HybridRecorder``) and returned in a
    ``HybridGenerateOutput``.

    Also kept: the compiled forward of the decoding steps (``get_compiled_call``) under upstream's
    criteria (``_valid_auto_compile_criteria``: a compileable cache on an accelerator); the
    thinking inputs then have a fixed shape at every step, the forward mixes with ``torch.where``
    (``_mix_every_row``) and the marker automaton runs on the device, so one graph serves every
    step and a step waits for the host only at upstream's stopping check. Everything the loop keeps
    from a step's outputs past that step (the hidden state the projection is applied to, the gate
    and hidden ratios, and the attentions and hidden states when asked for, which upstream keeps
    as they are) is copied (``_kept_past_the_step``): a CUDA-graph replay (mode="reduce-overhead")
    returns every step's outputs in the same storage.

    Left out: ``_optimize_model_for_decode``, ``DeferredStopCheck`` and
    ``_undo_generation_steps`` (the stop is checked at every step), encoder-decoder models and
    assistant models.
    """
    base = thinking_base_model(model)
    marker = answer_marker if answer_marker is not None else base.answer_marker
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample and not is_inference
    return_dict = generation_config.return_dict_in_generate
    # as upstream's _sample: what the model returns per step, kept when asked for
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    attentions = () if return_dict and generation_config.output_attentions else None
    hidden_states = () if return_dict and generation_config.output_hidden_states else None
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    batch, prompt_len = input_ids.shape
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    this_peer_finished = False

    use_cache = model_kwargs.get("use_cache", True) is not False
    # as upstream's _sample: the decoding steps (not the prefill) through the compiled forward when the
    # cache is compileable (a static cache) on an accelerator, or anywhere with _compile_all_devices
    model_forward = model.__call__
    if model._valid_auto_compile_criteria(model_kwargs, generation_config):
        base.embedding_latent_scale()  # computed here, read as a constant inside the compiled forward
        model_forward = model.get_compiled_call(generation_config.compile_config)
    model_kwargs["return_last_hidden_state"] = base.config.thinking_latent_source != "embedding"
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    automaton = AnswerMarkerAutomaton.cached(processing_class, marker, outputs.logits.shape[-1], input_ids.device)
    marker_state = automaton.start(batch, input_ids.device)
    use_hidden, use_latents, used_source = _thinking_source(model, base, outputs, thinking_monitor,
                                                            require_thinking_source)
    noise_kind = base.config.thinking_latent_noise if do_sample else "none"
    noise_keys = None
    if noise_kind != "none":  # one seed per call from torch's RNG; then a function of each row's tokens
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        noise_keys = initial_keys(seed, input_ids, model_kwargs.get("attention_mask"))
    noise_std = base.latent_noise_std(used_source) if noise_kind == "gaussian" else None
    d = base.config.hidden_size
    recorder = HybridRecorder.for_run(batch, prompt_len, input_ids.device, d, base.get_input_embeddings().weight.dtype,
                                  latents=use_latents, hidden=use_hidden, noise=noise_std is not None,
                                  keep=return_thinking_embeds, every_position=not use_cache)
    # Shaped like upstream's loop: with synced_gpus every peer calls _has_unfinished_sequences
    # (a collective) and runs a forward each iteration until all peers are done.
    while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=input_ids.device):
        if outputs is None:
            model_inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1 if use_cache else None, **model_kwargs)
            model_inputs.update(recorder.forward_inputs(input_ids.shape[1]))
            outputs = model_forward(**model_inputs, return_dict=True)
            recorder.forwarded(outputs)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        if synced_gpus and this_peer_finished:
            outputs = None  # keep stepping for the other peers; nothing is recorded
            continue

        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_scores = logits_processor(input_ids, logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (logits,)
        if attentions is not None:
            attentions += (_kept_past_the_step(outputs.attentions),)
        if hidden_states is not None:
            hidden_states += (_kept_past_the_step(outputs.hidden_states),)
        probs = nn.functional.softmax(next_scores, dim=-1)
        if do_sample:
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        recorder.sampled(next_scores, next_tokens)

        marker_state = automaton.step(marker_state, next_tokens, unfinished.bool())
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        this_peer_finished = bool(unfinished.max() == 0)
        if not this_peer_finished:
            # The token just sampled is fed next; it is mixed while its row is still thinking.
            if noise_keys is not None:
                noise_keys = advance_keys(noise_keys, next_tokens)
            latent, left_out = base.embedding_method_latent(probs, noise_keys) if use_latents else (None, None)
            recorder.to_be_fed({
                "thinking_mask": unfinished.bool() & ~automaton.found(marker_state),
                "thinking_latents": latent,
                "thinking_hidden": _kept_past_the_step(outputs.last_hidden_state[:, -1]) if use_hidden else None,
                "thinking_noise": gaussian_draws(noise_keys, d) * noise_std if noise_std is not None else None,
            }, left_out)
        outputs = None

    if streamer is not None:
        streamer.end()
    if not (return_thinking_embeds or return_dict):
        return input_ids
    result = HybridGenerateOutput(sequences=input_ids, scores=scores, logits=raw_logits, attentions=attentions,
                                  hidden_states=hidden_states, thinking_latent_source=used_source)
    if return_dict:
        result.past_key_values = model_kwargs.get("past_key_values")
    return recorder.finish(result) if return_thinking_embeds else result
