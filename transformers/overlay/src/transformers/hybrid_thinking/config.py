"""The hybrid-thinking fields of a model config: their one home (names, defaults, help, checks).

A model config asks for hybrid thinking when ``thinking_latent_source`` is set (not None). The
model then builds the thinking modules of that source, and every field below is written onto
its config, so that they are saved with each checkpoint (config.json) and restored with it. A
config without ``thinking_latent_source`` is left alone: upstream's model.

``ThinkingConfig`` is a dataclass, so that parsers built from dataclasses (``HfArgumentParser``,
TRL's ``TrlParser``) offer every field with its default and help, and a bad value is an error
naming the field when the dataclass is made. ``answer_marker`` (after which a completion is
answering, and thinking ends) belongs to the task, not to the command line: it is set with
``with_answer_marker``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .exploration import NOISE_KINDS, WEIGHT_NOISE_KINDS

LATENT_SOURCES = ("embedding", "projection", "embedding_plus_projection")
LATENT_SCALES = ("unit", "embedding")
DEFAULT_ANSWER_MARKER = "####"


@dataclass
class ThinkingConfig:
    thinking_latent_source: str = field(default="projection", metadata={
        "choices": list(LATENT_SOURCES),
        "help": "where the latent h~ comes from: embedding (HRPO: sum_v p_v E_v / ||p||); projection (a learnable "
                "projection of the last hidden state); embedding_plus_projection (HRPO's latent plus a "
                "zero-initialised projection: HRPO at step 0, learnable after)"})
    thinking_latent_scale: str = field(default="unit", metadata={
        "choices": list(LATENT_SCALES),
        "help": "norm of the projection latent: 1, or the mean token-embedding norm"})
    thinking_projection_layers: int = field(default=1, metadata={
        "choices": [1, 2], "help": "1: a linear projection; 2: an MLP"})
    thinking_projection_layernorm: bool = field(default=False, metadata={
        "help": "a LayerNorm after the projection"})
    thinking_projection_dropout: float = field(default=0.0, metadata={
        "help": "dropout after the projection, in training only (sampling applies the projection "
                "deterministically)"})
    thinking_projection_init_std: float = field(default=0.001, metadata={
        "help": "standard deviation of the projection's initial weights"})
    thinking_residual_r_min: float = field(default=0.99, metadata={
        "aliases": ["--residual_r_min"], "help": "Lambda initialisation: lower end of exp(-c softplus(-Lambda))"})
    thinking_residual_r_max: float = field(default=0.999, metadata={
        "aliases": ["--residual_r_max"], "help": "Lambda initialisation: upper end"})
    thinking_latent_topk: int | None = field(default=None, metadata={
        "help": "form the embedding-method latent from the k most probable tokens (SofT-GRPO uses 5, Soft "
                "Thinking up to 30); default: the whole vocabulary (HRPO). Not with the projection source"})
    thinking_latent_noise: str = field(default="none", metadata={
        "choices": list(NOISE_KINDS),
        "help": "exploration noise while sampling, recorded for the replay: gaussian on the latent (every "
                "source), gumbel on the weights of the embedding-method latent (SofT-GRPO); never drawn in "
                "greedy decoding"})
    thinking_latent_noise_scale: float = field(default=0.0, metadata={
        "help": "gaussian: the noise norm relative to the latent's typical norm; gumbel: the Gumbel-softmax "
                "temperature (SofT-GRPO: 0.1). Required (> 0) with a noise"})
    answer_marker: str = field(default=DEFAULT_ANSWER_MARKER, init=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Each value against its field and the others: a ValueError naming the field."""
        source = self.thinking_latent_source
        if source not in LATENT_SOURCES:
            raise ValueError(f"thinking_latent_source must be one of {LATENT_SOURCES}, got {source!r}")
        if self.thinking_latent_scale not in LATENT_SCALES:
            raise ValueError(f"thinking_latent_scale must be one of {LATENT_SCALES}, got {self.thinking_latent_scale!r}")
        if self.thinking_projection_layers not in (1, 2):
            raise ValueError(f"thinking_projection_layers must be 1 or 2, got {self.thinking_projection_layers!r}")
        if not _is_number(self.thinking_projection_dropout) or not 0.0 <= self.thinking_projection_dropout < 1.0:
            raise ValueError(f"thinking_projection_dropout must be in [0, 1), got {self.thinking_projection_dropout!r}")
        if not _is_number(self.thinking_projection_init_std) or not self.thinking_projection_init_std > 0:
            raise ValueError(f"thinking_projection_init_std must be > 0, got {self.thinking_projection_init_std!r}")
        if source == "embedding_plus_projection" and self.thinking_projection_layernorm:
            raise ValueError("thinking_projection_layernorm cannot be combined with "
                             "thinking_latent_source='embedding_plus_projection': a LayerNorm of the zero-initialised "
                             "projection is not zero (and its gradient at zero is unbounded), so the step-0 identity "
                             "with 'embedding' would not hold")
        r_min, r_max = self.thinking_residual_r_min, self.thinking_residual_r_max
        if not (_is_number(r_min) and _is_number(r_max) and 0.0 < r_min <= r_max < 1.0):
            raise ValueError(f"need 0 < thinking_residual_r_min <= thinking_residual_r_max < 1, got {r_min!r}, "
                             f"{r_max!r}")
        if not isinstance(self.answer_marker, str) or not self.answer_marker:
            raise ValueError(f"answer_marker must be a non-empty string, got {self.answer_marker!r}")
        self._validate_latent_options()

    def _validate_latent_options(self) -> None:
        source, topk = self.thinking_latent_source, self.thinking_latent_topk
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"thinking_latent_topk must be None (the whole vocabulary) or an integer >= 1, "
                             f"got {topk!r}")
        if topk is not None and source == "projection":
            raise ValueError("thinking_latent_topk shapes the embedding-method latent, which "
                             "thinking_latent_source='projection' does not use (leave it unset)")
        noise, scale = self.thinking_latent_noise, self.thinking_latent_noise_scale
        if noise not in NOISE_KINDS:
            raise ValueError(f"thinking_latent_noise must be one of {NOISE_KINDS}, got {noise!r}")
        if not _is_number(scale):
            raise ValueError(f"thinking_latent_noise_scale must be a number, got {scale!r}")
        if noise == "none" and scale != 0:
            raise ValueError(f"thinking_latent_noise_scale={scale!r} is set but thinking_latent_noise is 'none': "
                             f"choose a noise ('gaussian' or 'gumbel') or leave the scale at 0")
        if noise in WEIGHT_NOISE_KINDS and source == "projection":
            raise ValueError(f"thinking_latent_noise={noise!r} perturbs the weights of the embedding-method latent, "
                             f"which thinking_latent_source='projection' does not use (use 'gaussian')")
        if noise != "none" and not 0.0 < float(scale) < float("inf"):
            raise ValueError(f"thinking_latent_noise={noise!r} needs thinking_latent_noise_scale > 0 (Gaussian: the "
                             f"noise norm relative to the latent's typical norm; Gumbel: the Gumbel-softmax "
                             f"temperature), got {scale!r}")

    def with_answer_marker(self, marker: str) -> ThinkingConfig:
        """A copy whose thinking ends after ``marker`` (the task's)."""
        copy = ThinkingConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})
        copy.answer_marker = marker
        copy.validate()
        return copy

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> ThinkingConfig:
        """The thinking fields of a model config that asks for hybrid thinking; a field the
        config lacks (a checkpoint older than the field) takes its default."""
        if not thinking_enabled(config):
            raise ValueError("config.thinking_latent_source is not set: this config does not ask for hybrid thinking "
                             f"(set it to one of {LATENT_SOURCES})")
        values = {f.name: getattr(config, f.name) for f in fields(cls)
                  if f.init and getattr(config, f.name, None) is not None}
        try:
            thinking = cls(**values)
            marker = getattr(config, "answer_marker", None)
            return thinking if marker is None else thinking.with_answer_marker(marker)
        except ValueError as err:
            raise ValueError(f"config.{err}") from None

    def apply_to(self, config) -> None:
        """Write every field onto a model config (saved with it)."""
        for key, value in self.to_dict().items():
            setattr(config, key, value)


THINKING_FIELDS = tuple(f.name for f in fields(ThinkingConfig))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def thinking_enabled(config) -> bool:
    """Whether a config asks for hybrid thinking: ``thinking_latent_source`` is set (not None)."""
    return getattr(config, "thinking_latent_source", None) is not None


def ensure_thinking_config(config) -> None:
    """Fill a hybrid-thinking config's missing thinking fields with their defaults, and check them."""
    ThinkingConfig.from_config(config).apply_to(config)
