"""The unsloth fork: PEFT with the four thinking modules (seed change 6)."""
import ast
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo import LORA_TARGETS
from testing.rollouts import generate_hybrid, replay_difference
from testing.tiny import QUESTIONS, tiny_model, tiny_tokenizer
from testing.unsloth_cpu import load_hybrid_thinking_helpers

REPO = Path(__file__).resolve().parent.parent
UNSLOTH_MODELS = REPO / "unsloth" / "tree" / "unsloth" / "models"


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_thinking_module_names_are_recognised():
    helpers = load_hybrid_thinking_helpers()
    assert all(helpers.is_thinking_module(n) for n in list(THINKING_MODULES))
    assert helpers.is_thinking_module("model.model.thinking_projection")
    assert not helpers.is_thinking_module("q_proj") and not helpers.is_thinking_module(None)


def test_prepare_copies_for_mixed_precision_training():
    helpers = load_hybrid_thinking_helpers()
    model = tiny_model("llama", thinking_latent_source="projection").half()  # all four modules
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=list(THINKING_MODULES)))
    for p in peft_model.parameters():  # what kbit preparation does: freeze everything
        p.requires_grad_(False)
    prepared = helpers.prepare_thinking_modules_for_training(peft_model)
    assert sorted(n.rsplit(".", 1)[-1] for n in prepared) == sorted(list(THINKING_MODULES))
    for name in prepared:
        wrapper = peft_model.get_submodule(name)
        copy = wrapper.modules_to_save["default"]
        assert all(p.dtype == torch.float32 and p.requires_grad for p in copy.parameters())
        assert all(p.dtype == torch.float16 and not p.requires_grad for p in wrapper.original_module.parameters())
        assert {p.device for p in copy.parameters()} == {p.device for p in wrapper.original_module.parameters()}
    trainable = trainable_names(peft_model)
    assert trainable and all(".modules_to_save.default." in n for n in trainable)


def test_patched_get_peft_model_accepts_and_prepares_thinking_modules():
    """FastLlamaModel.get_peft_model needs Triton to import; check what the series put in it."""
    tree = ast.parse((UNSLOTH_MODELS / "llama.py").read_text())
    fn = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "get_peft_model")
    called = {node.func.id for node in ast.walk(fn) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert {"is_thinking_module", "prepare_thinking_modules_for_training"} <= called


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cpu_fast_language_model_trains_exactly_the_thinking_copies(arch, tmp_path):
    import unsloth  # noqa: F401  (CPU-fallback mode here)
    from unsloth import FastLanguageModel

    if torch.cuda.is_available():
        pytest.skip("this checks unsloth's CPU mode")
    tokenizer = tiny_tokenizer()
    tiny_model(arch, tokenizer, thinking_latent_source="projection").save_pretrained(tmp_path)  # all four modules
    tokenizer.save_pretrained(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=256, load_in_4bit=False,
                                                 dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                             modules_to_save=list(THINKING_MODULES))
    trainable = trainable_names(model)
    non_lora = {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" not in n}
    assert non_lora == set(list(THINKING_MODULES))
    assert all(".modules_to_save.default." in n for n in trainable if "lora_" not in n)
    # the CPU fallback runs the transformers fork's forward: hybrid sampling and replay work
    model.eval()
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4])
    max_diff, _, _ = replay_difference(model, tokenizer, enc, out)
    assert out.thinking_mask.any() and max_diff <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_get_peft_model_trains_thinking_copies_in_fp32(tmp_path, dtype):
    from unsloth import FastLanguageModel

    tokenizer = tiny_tokenizer()
    tiny_model("llama", tokenizer, hidden_size=128, thinking_latent_source="projection").to(dtype).save_pretrained(
        tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=256, load_in_4bit=False,
                                                 dtype=dtype)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=LORA_TARGETS, modules_to_save=list(THINKING_MODULES))
    for name in list(THINKING_MODULES):
        wrapper = next(m for n, m in model.named_modules() if n.endswith(name) and hasattr(m, "modules_to_save"))
        copy = wrapper.modules_to_save["default"]
        assert all(p.dtype == torch.float32 and p.requires_grad and p.is_cuda for p in copy.parameters())
