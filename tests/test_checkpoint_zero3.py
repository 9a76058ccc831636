"""Saving under DeepSpeed ZeRO-3, without DeepSpeed: the trainer saves a PEFT model from a
state dict that leaves out frozen parameters (transformers does so for PEFT under ZeRO-3),
from which TRL's frozen "ref" adapter cannot be saved. The trained adapter alone is saved."""
import types

import pytest
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo.checkpoint import trained_adapter_only_under_zero3
from testing.tiny import tiny_model


def peft_model_with_ref_adapter():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=list(THINKING_MODULES))
    model = get_peft_model(tiny_model("qwen2", thinking_latent_source="projection"), config)
    model.add_adapter("ref", config)  # what TRL's GRPOTrainer adds for its reference model
    model.set_adapter("default")
    for name, param in model.named_parameters():
        param.requires_grad = ".default." in name
    return model


def zero3_trainer(model, stage=3):
    engine = types.SimpleNamespace(config={"zero_optimization": {"stage": stage}})
    return types.SimpleNamespace(model=model, deepspeed=engine, is_deepspeed_enabled=True)


def trainable_state_dict(model):
    """DeepSpeed's consolidated state dict with exclude_frozen_parameters=True."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def test_the_frozen_ref_adapter_cannot_be_saved_from_a_trainable_state_dict(tmp_path):
    model = peft_model_with_ref_adapter()
    with pytest.raises(KeyError, match="modules_to_save.ref"):
        model.save_pretrained(tmp_path, state_dict=trainable_state_dict(model))


def test_under_zero3_the_trained_adapter_is_saved_alone_and_whole(tmp_path):
    model = peft_model_with_ref_adapter()
    with trained_adapter_only_under_zero3(zero3_trainer(model)):
        model.save_pretrained(tmp_path, state_dict=trainable_state_dict(model))
    assert "save_pretrained" not in vars(model)  # the class's method again
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not (tmp_path / "ref").exists()
    for module in THINKING_MODULES:
        assert any(module in key for key in saved), module
    assert any("lora_A" in key for key in saved)


def test_other_engines_save_every_adapter(tmp_path):
    model = peft_model_with_ref_adapter()
    with trained_adapter_only_under_zero3(zero3_trainer(model, stage=2)):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "ref" / "adapter_model.safetensors").exists()
