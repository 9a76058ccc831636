"""HRPO thinking modules under PEFT (added by the HRPO fork of unsloth).

The transformers fork adds up to four modules to Qwen2Model / LlamaModel when the model
config asks for hybrid thinking (``thinking_latent_source`` set): thinking_residual_gate_r,
thinking_residual_gate_i, thinking_residual_Lambda, and thinking_projection for the
projection sources only. A model built without them is upstream's, and is left alone here.
They are trained in full through PEFT ``modules_to_save``.
get_peft_model accepts them, and their trainable copies get the treatment unsloth gives
embed_tokens / lm_head copies: on the model's own device, requires_grad on, the frozen
original left frozen (and in place: they are small). Unlike those, the copies are float32
for any model dtype, bfloat16 included (not only float16).

The fast forward paths (LlamaModel_fast_forward for training / replay / prefill, the
decode step of LlamaModel_fast_forward_inference, and CausalLM_fast_forward around them)
take the same HRPO inputs as the transformers fork's forward: ``thinking_mask`` with
``thinking_latents`` / ``thinking_hidden``, and ``return_last_hidden_state``. The helpers
below keep those hunks to a line or two each. The mixing itself is the transformers
fork's ``mix_thinking_inputs``, so both backends compute the same formula by construction.
"""
import torch
from peft.utils.other import ModulesToSaveWrapper
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # present with the HRPO fork of transformers, which names the modules and inputs
    from transformers.hybrid_thinking.modeling import (
        THINKING_INPUTS,
        THINKING_MODULES,
        HybridCausalLMOutputWithPast,
        HybridModelOutputWithPast,
    )
except ImportError:  # upstream transformers: no thinking modules, plain outputs
    HybridCausalLMOutputWithPast = CausalLMOutputWithPast
    HybridModelOutputWithPast = BaseModelOutputWithPast
    THINKING_INPUTS = ("thinking_mask", "thinking_latents", "thinking_hidden")
    THINKING_MODULES = ()


def is_thinking_module(name) -> bool:
    return isinstance(name, str) and name.rsplit(".", 1)[-1] in THINKING_MODULES


def prepare_thinking_modules_for_training(model, adapter_name: str = "default") -> list:
    """Make each thinking module's trainable copy train in float32 (any model dtype); return their names."""
    prepared = []
    for name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or not is_thinking_module(name):
            continue
        if adapter_name not in module.modules_to_save:
            continue
        trainable = module.modules_to_save[adapter_name]
        params = list(module.original_module.parameters()) or list(trainable.parameters())
        device = params[0].device if params else None
        # float32 whatever the model dtype: Lambda (~7-9) moves by ~1e-3 per AdamW step, under
        # bfloat16's spacing there (0.03-0.06), so in bf16 it would never move.
        trainable.to(device = device, dtype = torch.float32, non_blocking = True)
        trainable.requires_grad_(True)
        module.original_module.requires_grad_(False)
        prepared.append(name)
    return prepared


def pop_thinking_inputs(kwargs: dict) -> dict:
    """Take the HRPO inputs out of a forward's kwargs: they must not reach the decoder layers."""
    return {name: kwargs.pop(name, None) for name in THINKING_INPUTS}


def has_thinking_inputs(kwargs: dict) -> bool:
    return any(kwargs.get(name) is not None for name in THINKING_INPUTS)


def _clip_to_length(tensor, length: int):
    # LlamaModel_fast_forward cuts inputs longer than max_seq_length; per-position inputs follow.
    if tensor is not None and tensor.dim() >= 2 and tensor.shape[1] > length:
        return tensor[:, :length]
    return tensor


def mix_thinking_inputs(base_model, inputs_embeds: torch.Tensor, thinking: dict):
    """The fork's mixing of flagged positions; returns (inputs_embeds, ratio pair or None)."""
    if thinking["thinking_mask"] is None:
        return inputs_embeds, None
    mix = getattr(base_model, "mix_thinking_inputs", None)
    if mix is None:
        raise TypeError(
            f"thinking_mask was given, but {type(base_model).__name__} has no thinking modules: "
            "HRPO needs the model class of the HRPO transformers fork (LlamaModel or Qwen2Model)"
        )
    if thinking["thinking_mask"].dim() == 2:
        length = inputs_embeds.shape[1]
        thinking = {name: _clip_to_length(value, length) for name, value in thinking.items()}
    return mix(inputs_embeds, **thinking)


def _ratio_fields(thinking_ratio_pair) -> dict:
    if thinking_ratio_pair is None or HybridModelOutputWithPast is BaseModelOutputWithPast:
        return {}
    gate, hidden = thinking_ratio_pair
    return {"thinking_gate_ratio": gate, "thinking_hidden_ratio": hidden}


def model_output(thinking_ratio_pair, **fields) -> BaseModelOutputWithPast:
    """A base model's output, with the per-position gate ratios when anything was mixed."""
    return HybridModelOutputWithPast(**fields, **_ratio_fields(thinking_ratio_pair))


def causal_lm_fields(backbone_outputs, hidden_states: torch.Tensor, return_last_hidden_state: bool) -> dict:
    """The HRPO fields of a causal LM output: the backbone's gate ratios, and on request the
    last position's final hidden state (a 1-row copy), which the thinking projection reads."""
    if HybridCausalLMOutputWithPast is CausalLMOutputWithPast:
        return {}
    fields = {
        "thinking_gate_ratio": getattr(backbone_outputs, "thinking_gate_ratio", None),
        "thinking_hidden_ratio": getattr(backbone_outputs, "thinking_hidden_ratio", None),
    }
    if return_last_hidden_state:
        fields["last_hidden_state"] = hidden_states[:, -1:, :].clone()
    return fields
