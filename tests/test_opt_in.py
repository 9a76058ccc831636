"""Hybrid thinking is opt-in by configuration (config.thinking_latent_source).

A config without it builds upstream's model (parity with unpatched transformers is in
test_hybrid_thinking.py and test_upstream_parity.py); one with it builds only the modules
its latent source uses; every trainable thinking parameter takes part in every
differentiated forward that got thinking inputs; generation modes that cannot do hybrid
sampling refuse hybrid options.
"""
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.hybrid_thinking.config import ThinkingConfig
from transformers.hybrid_thinking.modeling import thinking_module_names

from hrpo.optimizer import parameter_groups
from testing import module_env
from testing.processes import run_child
from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer

ARCHS = ["llama", "qwen2"]
SOURCES = ["embedding", "projection", "embedding_plus_projection"]


def thinking_names(model) -> set[str]:
    return {name.split(".")[1] for name, _ in model.named_parameters() if "thinking" in name}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_config_without_thinking_builds_the_plain_model(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, hybrid=False)
    assert not thinking_names(model) and not model.model.has_thinking_modules
    fields = model.config.to_dict()
    assert not [k for k in fields if k.startswith("thinking_") or k == "answer_marker"]
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    assert type(model(**enc)).__name__ == "CausalLMOutputWithPast"
    with pytest.raises(ValueError, match="built with hybrid thinking"):
        model(**enc, thinking_mask=torch.ones_like(enc.input_ids, dtype=torch.bool),
              thinking_latents=torch.zeros(*enc.input_ids.shape, 32))
    with pytest.raises(ValueError, match="built with hybrid thinking"):
        model.generate(**enc, processing_class=tokenizer, max_new_tokens=2)
    with pytest.raises(ValueError, match="thinking_latent_source is not set"):
        from transformers.hybrid_thinking.modeling import ensure_thinking_config

        ensure_thinking_config(model.config)


@pytest.mark.parametrize("source", SOURCES)
def test_only_the_modules_of_the_source_are_built(source):
    model = tiny_model("qwen2", thinking_latent_source=source)
    expected = set(thinking_module_names(source))
    assert thinking_names(model) == expected
    assert ("thinking_projection" in expected) == (source != "embedding")
    assert set(model.model.thinking_modules) == expected
    for key, default in ThinkingConfig().to_dict().items():  # filled in, so saved with the model
        assert getattr(model.config, key) == (source if key == "thinking_latent_source" else default)
    # the optimizer's groups cope with absent modules: all six, the projection's empty in embedding mode
    for name, p in model.named_parameters():
        p.requires_grad_("thinking" in name)
    groups = {g["name"]: len(g["params"]) for g in parameter_groups(model, 1e-5, 0.1, 1e-4, 1e-3, 1e-4)}
    assert len(groups) == 6 and groups["gate"] == 4 and groups["lambda"] == 1
    assert (groups["projection"] == 0) == (source == "embedding")
    torch.optim.AdamW(parameter_groups(model, 1e-5, 0.1, 1e-4, 1e-3, 1e-4))  # empty groups are fine


@pytest.mark.parametrize("source", ["embedding", "projection"])
def test_a_saved_hybrid_checkpoint_loads_with_its_modules(source, tmp_path):
    model = tiny_model("llama", thinking_latent_source=source, thinking_projection_layers=2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["thinking_latent_source"] == source and saved["answer_marker"] == "####"
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert thinking_names(loaded) == set(thinking_module_names(source))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("source", SOURCES)
def test_every_thinking_parameter_takes_part_without_thinking_positions(source):
    """A forward that got thinking inputs but flags no position still runs the thinking
    modules (zero rows): each thinking parameter gets a gradient (zero), as DDP with
    find_unused_parameters=False needs, and every module is called, also without gradients
    (ZeRO-3 gathers a module's parameters when it is called: every rank must call the same
    modules); the outputs are the plain forward's."""
    model = tiny_model("llama", thinking_latent_source=source).train()
    input_ids = torch.tensor([[3, 4, 5, 6, 7]])
    none_flagged = {"thinking_mask": torch.zeros(1, 5, dtype=torch.bool)}
    if source != "projection":
        none_flagged["thinking_latents"] = torch.randn(1, 5, 32)
    plain = model(input_ids=input_ids).logits
    out = model(input_ids=input_ids, **none_flagged)
    assert torch.equal(out.logits, plain)
    assert torch.equal(out.thinking_gate_ratio, torch.zeros(1, 5))
    out.logits.sum().backward()
    grads = {n: p.grad for n, p in model.model.named_parameters() if "thinking" in n}
    assert grads and all(g is not None and not g.any() for g in grads.values()), grads
    called = []
    for name, module in model.model.thinking_modules.items():
        module.register_forward_hook(lambda *args, name=name: called.append(name))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, **none_flagged).logits, plain)
    assert set(called) == set(thinking_module_names(source))


HYBRID_ERROR_CASES = {
    "beam search": {"num_beams": 2},
    "beam sample": {"num_beams": 2, "do_sample": True},
    "prompt lookup": {"prompt_lookup_num_tokens": 2},
    "contrastive search": {"penalty_alpha": 0.6, "top_k": 4},
    "dola": {"dola_layers": "low"},
    "custom_generate": {"custom_generate": lambda *args, **kwargs: None},
    "continuous batching": {"cache_implementation": "paged"},
}


@pytest.mark.parametrize("case", sorted(HYBRID_ERROR_CASES) + ["assisted decoding", "no processing_class"])
def test_hybrid_options_outside_hybrid_sampling_are_an_error(case):
    """Modes that do not go through hybrid sampling raise a ValueError with hybrid options,
    before any forward, instead of returning plain sequences."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    enc = encode_prompts(tokenizer, QUESTIONS[:2])
    hybrid = {"processing_class": tokenizer, "return_thinking_embeds": True}
    if case == "assisted decoding":
        kwargs = {"assistant_model": tiny_model("llama", tokenizer, seed=1)}
    elif case == "no processing_class":
        hybrid, kwargs = {"return_thinking_embeds": True, "answer_marker": "##"}, {}
    else:
        kwargs = HYBRID_ERROR_CASES[case]
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="hybrid sampling|processing_class"):
        model.generate(**enc, max_new_tokens=3, **hybrid, **kwargs)
    assert not calls


def test_those_modes_without_hybrid_options_are_upstreams():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    enc = encode_prompts(tokenizer, QUESTIONS[:1])  # assisted decoding takes one row
    with torch.no_grad():
        beams = model.generate(**enc, num_beams=2, max_new_tokens=3, do_sample=False, return_thinking_embeds=False,
                               processing_class=None)
        lookup = model.generate(**enc, prompt_lookup_num_tokens=2, max_new_tokens=3, do_sample=False)
    assert beams.shape[1] == lookup.shape[1] == enc.input_ids.shape[1] + 3


@pytest.mark.slow  # two processes: about 40 s on an idle 2-core CPU
def test_ddp_with_default_settings(tmp_path):
    """Plain Llama and hybrid Llama in every latent source (gradient checkpointing on, a rank
    with no thinking position in one step) train under 2-process DDP at its defaults."""
    out = tmp_path / "ddp.json"
    run_child([sys.executable, "-m", "testing.ddp_checks", str(out)], timeout=900, what="2-process DDP checks",
              env=module_env(OMP_NUM_THREADS="1"))
    results = json.loads(out.read_text())
    assert results == {name: "ok" for name in ["plain"] + [f"hybrid-{s}" for s in SOURCES]}, results


@pytest.mark.parametrize("arch", ARCHS)
def test_the_load_report_does_not_list_the_new_thinking_modules_as_missing(arch, tmp_path):
    """A base checkpoint never holds them (they are new by design); a weight it does lack is
    still reported."""
    from safetensors.torch import load_file, save_file

    tiny_model(arch, tiny_tokenizer(), hybrid=False).save_pretrained(tmp_path / "base")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    assert not [key for key in weights if "thinking" in key]
    weights.pop("model.norm.weight")
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    config = ThinkingConfig(thinking_latent_source="projection")
    base_config = AutoModelForCausalLM.from_pretrained(tmp_path / "base").config
    config.apply_to(base_config)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", config=base_config,
                                                       output_loading_info=True)
    assert set(model.model.thinking_modules) == set(thinking_module_names("projection"))
    assert info["missing_keys"] == {"model.norm.weight"}
