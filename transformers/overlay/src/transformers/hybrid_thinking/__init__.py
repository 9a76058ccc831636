"""HRPO hybrid latent reasoning with a learnable thinking projection (added by the fork).

config.py: the thinking fields of a model config (ThinkingConfig): names, defaults, checks.
modeling.py: the thinking modules and the mixing, wired into Qwen2Model and LlamaModel.
generation.py: the hybrid sampling loop that GenerationMixin._sample hands over to.
"""
