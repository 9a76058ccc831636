"""The thinking modules train, and are evaluated, in float32 whatever the model dtype.

Lambda sits at ~7-9, where bfloat16's spacing is 0.03-0.06, and AdamW moves it by ~1e-3 a
step: a bfloat16 Lambda never moves. Every path that builds the trainable thinking copies
is checked on a bfloat16 model: their dtype, and Lambda's change after 5 AdamW steps
(lr 1e-3) on a loss through the model. Run with -s for the figures.
"""
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from hrpo import loading
from hrpo.backend import import_unsloth
from hrpo.settings_parser import parse_settings
from hrpo import LORA_TARGETS
from testing import module_env
from testing.tiny import encode_prompts, tiny_model, tiny_tokenizer
from testing.unsloth_cpu import load_hybrid_thinking_helpers

STEPS, LR = 5, 1e-3


def thinking_copies(model):
    """leaf name -> (trainable copy, original) of each thinking module under PEFT."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "modules_to_save") and name.rsplit(".", 1)[-1] in THINKING_MODULES:
            found[name.rsplit(".", 1)[-1]] = (module.modules_to_save["default"], module.original_module)
    assert sorted(found) == sorted(THINKING_MODULES)
    return found


def replay_loss(model, tokenizer):
    """A loss through the whole model with every completion position mixed (projection latents)."""
    enc = encode_prompts(tokenizer, ["1+2=?", "abc def"])
    d = model.get_base_model().config.hidden_size
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*enc.input_ids.shape, d, generator=gen)
    mask = torch.zeros(enc.input_ids.shape, dtype=torch.bool)
    mask[:, -4:] = True
    out = model(**enc, thinking_mask=mask, thinking_hidden=hidden.to(model.dtype))
    return -out.logits.float().log_softmax(-1)[:, -5:, 3].mean()


def lambda_after_adamw(model, loss_fn):
    """(Lambda's dtype, max |change| of the trainable Lambda after STEPS AdamW steps)."""
    lam = thinking_copies(model)["thinking_residual_Lambda"][0].Lambda
    params = [p for n, p in model.named_parameters() if p.requires_grad and "thinking" in n]
    assert any(p is lam for p in params)
    before = lam.detach().clone()
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    return lam.dtype, (lam.detach().float() - before.float()).abs().max().item()


def assert_float32_copies(model, original_dtype):
    for leaf, (copy, original) in thinking_copies(model).items():
        assert all(p.dtype == torch.float32 and p.requires_grad for p in copy.parameters()), leaf
        assert all(p.dtype == original_dtype and not p.requires_grad for p in original.parameters()), leaf


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    tokenizer = tiny_tokenizer()
    tiny_model("qwen2", tokenizer, hidden_size=64, hybrid=False).to(torch.bfloat16).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def test_unsloth_helper_trains_bf16_model_copies_in_float32():
    helpers = load_hybrid_thinking_helpers()
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, thinking_latent_source="projection").to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=list(THINKING_MODULES)))
    for p in peft_model.parameters():  # what kbit preparation does: freeze everything
        p.requires_grad_(False)
    helpers.prepare_thinking_modules_for_training(peft_model)
    assert_float32_copies(peft_model, torch.bfloat16)
    dtype, change = lambda_after_adamw(peft_model, lambda: replay_loss(peft_model, tokenizer))
    print(f"[unsloth helper, bf16 model] Lambda {dtype}, max |change| after {STEPS} steps: {change:.2e}")
    assert dtype == torch.float32 and change > 2e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unsloth_fast_get_peft_model_gives_float32_copies_for_bf16(arch, tmp_path):
    out = tmp_path / "checks.json"
    proc = subprocess.run([sys.executable, "-m", "testing.unsloth_peft_checks", arch, str(out)],
                          cwd=tmp_path, env=module_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(f"[FastLlamaModel.get_peft_model, {arch} bf16] Lambda {r['lambda_dtype']}, "
          f"max |change| after {STEPS} steps: {r['lambda_change']:.2e}")
    assert all(dtypes == ["torch.float32"] for dtypes in r["copies"].values()), r["copies"]
    assert all(dtypes == ["torch.bfloat16"] for dtypes in r["originals"].values()), r["originals"]
    assert r["lambda_dtype"] == "torch.float32" and r["lambda_requires_grad"]
    assert r["lambda_change"] > 2e-3


@pytest.mark.parametrize("backend", ["unsloth", "transformers"])
def test_load_model_gives_float32_copies_for_a_bf16_checkpoint(backend, bf16_checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU loaders")
    if backend == "unsloth":
        import_unsloth(cuda=False)
    args = parse_settings([
        "--model_name", str(bf16_checkpoint), "--output_dir", str(tmp_path / "out"), "--backend", backend,
        "--lora_rank", "4", "--max_prompt_length", "64", "--max_completion_length", "16"])
    model, tokenizer = loading.load_model(args, cuda=False)
    copies = thinking_copies(model)
    assert_float32_copies(model, next(copies["thinking_projection"][1].parameters()).dtype)
    model.train()
    dtype, change = lambda_after_adamw(model, lambda: replay_loss(model, tokenizer))
    print(f"[load_model --backend {backend}, bf16 checkpoint, CPU; model dtype {model.dtype}] "
          f"Lambda {dtype}, max |change| after {STEPS} steps: {change:.2e}")
    assert dtype == torch.float32 and change > 2e-3


def test_bf16_evaluation_loads_the_thinking_modules_in_float32(bf16_checkpoint, tmp_path):
    """hrpo.checkpoint.load_checkpoint(dtype=bfloat16): the base model and LoRA in bf16, the
    thinking modules in float32 and exactly as saved (Lambda is not rounded to bf16)."""
    from peft.utils.other import ModulesToSaveWrapper

    from hrpo.checkpoint import load_checkpoint

    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, hidden_size=64, thinking_latent_source="projection")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=list(THINKING_MODULES)))
    peft_model.peft_config["default"].base_model_name_or_path = str(bf16_checkpoint)
    for copy, _ in thinking_copies(peft_model).values():
        copy.float()
    saved = {leaf: {n: p.detach().clone() for n, p in copy.named_parameters()}
             for leaf, (copy, _) in thinking_copies(peft_model).items()}
    folder = tmp_path / "checkpoint-1"
    peft_model.save_pretrained(folder)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    loaded, _ = load_checkpoint(folder, dtype=torch.bfloat16)
    assert loaded.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    for leaf, (copy, _) in thinking_copies(loaded).items():
        for name, param in copy.named_parameters():
            assert param.dtype == torch.float32, (leaf, name, param.dtype)
            assert torch.equal(param, saved[leaf][name]), (leaf, name)
    assert all(isinstance(m, ModulesToSaveWrapper) for m in (loaded.get_base_model().model.thinking_projection,))
    lam = thinking_copies(loaded)["thinking_residual_Lambda"][0].Lambda
    print(f"[load_checkpoint dtype=bf16] Lambda {lam.dtype}, max |loaded - saved| "
          f"{(lam - saved['thinking_residual_Lambda']['Lambda']).abs().max().item():.1e}")
    enc = encode_prompts(tokenizer, ["1+2=?", "abc"])
    with torch.no_grad():
        out = loaded.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##",
                              do_sample=False, max_new_tokens=6)
    assert out.thinking_mask.any() and out.thinking_latent_source == "projection"
