"""The distribution rollouts are sampled from: the model's softmax at temperature T, nothing else.

The GRPO loss scores each completion token under softmax(logits / T). Rollouts must be
sampled from exactly that, or training is off-policy without saying so. generate() fills
every setting its caller leaves unset (None) from the model's own ``generation_config``, so
a checkpoint that ships ``min_p``, ``no_repeat_ngram_size``, a repetition penalty, top-k or
top-p (Qwen2.5 ships the last three) would reshape the sampling distribution. Training and
evaluation therefore set every logits processor that has a neutral value to it
(``NEUTRAL_SAMPLING``), and the trainers refuse to start when any other setting would
reshape sampling (``check_sampling_distribution``).
"""
from __future__ import annotations

import contextlib

# generate()'s logits processors that are off at one value, set to it
NEUTRAL_SAMPLING = {
    "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_new_tokens": 0, "guidance_scale": 1.0,
}
# off at this value too, but not set: min_new_tokens (set above) takes precedence over it
CHECKED_ONLY = {"min_length": 0}
# the processors that any value turns on: off only while unset
UNSET_ONLY = ("top_h", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
              "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "watermarking_config")


def _is_neutral(name: str, value) -> bool:
    if value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return True
    neutral = {**NEUTRAL_SAMPLING, **CHECKED_ONLY}
    return name in neutral and value == neutral[name]


def distribution_changes(generation_config, model_generation_config=None) -> dict[str, object]:
    """The settings that would make generate() sample from something other than the
    temperature softmax, as generate() resolves them: ``generation_config``'s value, else
    (unset) the model's."""
    def resolved(name):
        value = getattr(generation_config, name, None)
        return getattr(model_generation_config, name, None) if value is None else value

    names = [*NEUTRAL_SAMPLING, *CHECKED_ONLY, *UNSET_ONLY]
    if resolved("min_new_tokens") is not None:
        names.remove("min_length")  # generate() ignores it then
    return {name: resolved(name) for name in names if not _is_neutral(name, resolved(name))}


def check_sampling_distribution(generation_config, model_generation_config, what: str) -> None:
    """Refuse to sample rollouts from a distribution the loss does not score (a ValueError
    naming each setting and where it comes from)."""
    changes = distribution_changes(generation_config, model_generation_config)
    if changes:
        settings = ", ".join(f"{name}={value!r}" for name, value in changes.items())
        raise ValueError(f"{what}: the rollouts would be sampled with {settings} (from the training generation "
                         f"config or, where that leaves a setting unset, the model's generation_config.json), but "
                         f"the GRPO loss scores the plain temperature softmax: training would be off-policy. Remove "
                         f"the setting from the model's generation_config.json (or from generation_kwargs)")


@contextlib.contextmanager
def generate_replaced(model, generate):
    """``model.generate`` is ``generate`` for the duration (the trainers wrap the model's own for
    their generation calls), then what it was before."""
    before = vars(model).get("generate")
    model.generate = generate
    try:
        yield
    finally:
        if before is not None:
            model.generate = before
        else:
            del model.generate  # back to the class's method
