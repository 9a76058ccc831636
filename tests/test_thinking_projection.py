"""The seed's change: a thinking_projection that rollouts use and training trains."""
import itertools
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.hybrid_thinking.modeling import THINKING_MODULES

from testing.rollouts import generate_hybrid, replay_difference, replay_logprobs, thinking_inputs
from testing.tiny import QUESTIONS, tiny_model, tiny_tokenizer

ARCHS = ["llama", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_rollout_really_uses_the_projection(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection")
    enc, before = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8)
    assert before.thinking_latent_source == "projection" and before.thinking_hidden is not None
    with torch.no_grad():
        model.model.thinking_projection.weight.normal_(0, 1.0)
    _, after = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8)
    # Step 0 comes from the prompt alone; from step 1 on the fed input is mixed with P(h).
    assert torch.equal(before.scores[0], after.scores[0])
    assert not torch.allclose(before.scores[1], after.scores[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_fallback_to_embedding_method_without_hidden_state(arch, monkeypatch):
    """The seed's fallback branch: a forward that returns no hidden state."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection")
    real_forward = model.forward

    def forward_without_hidden(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.last_hidden_state = None
        return out

    monkeypatch.setattr(model, "forward", forward_without_hidden)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8)
    assert any("falling back to the embedding method" in str(w.message) for w in caught)
    assert out.thinking_latent_source == "embedding" and out.thinking_hidden is None
    assert out.thinking_latents is not None and out.thinking_mask.any()
    # the projection played no part: changing it changes nothing
    with torch.no_grad():
        model.model.thinking_projection.weight.normal_(0, 1.0)
    _, again = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8)
    assert torch.equal(out.sequences, again.sequences)
    max_diff, _, _ = replay_difference(model, tokenizer, enc, out)
    assert max_diff <= 1e-4


def surrogate_backward(model, tokenizer, enc, out):
    model.zero_grad(set_to_none=True)
    logprobs, mask, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking_inputs(out),
                                        tokenizer.eos_token_id, temperature=0.5)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[: logprobs.shape[0], None]
    loss = -(logprobs * mask * advantages).sum() / mask.sum()
    loss.backward()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [
    {"thinking_latent_source": "projection"},
    {"thinking_latent_source": "projection", "thinking_projection_layers": 2,
     "thinking_projection_layernorm": True, "thinking_projection_dropout": 0.1},
    {"thinking_latent_source": "embedding_plus_projection", "thinking_projection_layers": 2},
])
def test_gradient_reaches_the_projection_and_its_options(arch, options):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, **options)
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=10)
    model.train()
    surrogate_backward(model, tokenizer, enc, out)
    base = model.model
    if options["thinking_latent_source"] == "embedding_plus_projection":
        # The zero-initialised last layer blocks the first layer's gradient at step 0
        # (that is what makes step 0 identical to HRPO); it gets one after one step.
        assert base.thinking_projection.weight.grad.abs().sum() == 0
        assert base.thinking_projection.output_weight.grad.abs().sum() > 0
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        surrogate_backward(model, tokenizer, enc, out)
    named = dict(base.named_parameters())
    for name, param in named.items():
        if name.startswith(THINKING_MODULES):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    expected = {"thinking_projection.weight"}
    if options.get("thinking_projection_layers") == 2:
        expected.add("thinking_projection.output_weight")
    if options.get("thinking_projection_layernorm"):
        expected |= {"thinking_projection.norm.weight", "thinking_projection.norm.bias"}
    assert expected <= {n for n in named if n.startswith("thinking_projection")}


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_mode_has_no_projection(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer)
    assert not hasattr(model.model, "thinking_projection")  # built for the source: no projection
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=10)
    assert out.thinking_hidden is None
    surrogate_backward(model, tokenizer, enc, out)
    assert model.model.thinking_residual_gate_r.weight.grad.abs().sum() > 0
    assert model.model.thinking_residual_Lambda.Lambda.grad.abs().sum() > 0


MODES = [
    {"thinking_latent_source": s, "thinking_projection_layers": layers, "thinking_projection_layernorm": ln,
     "thinking_projection_dropout": dropout, "thinking_latent_scale": scale}
    for s, layers, ln, dropout, scale in itertools.product(
        ["projection", "embedding_plus_projection"], [1, 2], [False, True], [0.0, 0.2], ["unit", "embedding"])
    if not (s == "embedding_plus_projection" and (ln or scale == "embedding"))
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", MODES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_replay_consistency_in_every_mode(arch, options):
    """Dropout acts in training mode only; sampling and this check run in eval mode."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, **options)
    if options["thinking_latent_source"] == "embedding_plus_projection":
        with torch.no_grad():  # move off the zero init so that the projection term matters
            for p in model.model.thinking_projection.parameters():
                p.normal_(0, 0.05)
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:6])
    max_diff, mean_diff, _ = replay_difference(model, tokenizer, enc, out)
    assert out.thinking_mask.any()
    assert max_diff <= 1e-4, (max_diff, mean_diff)


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_plus_projection_is_identical_to_embedding_at_init(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="embedding_plus_projection",
                       thinking_projection_layers=2)
    enc, mixed = generate_hybrid(model, tokenizer, QUESTIONS[:6], seed=5)
    model.config.thinking_latent_source = "embedding"
    _, plain = generate_hybrid(model, tokenizer, QUESTIONS[:6], seed=5)
    assert torch.equal(mixed.sequences, plain.sequences)
    assert torch.equal(mixed.thinking_latents, plain.thinking_latents)
    assert all(torch.equal(a, b) for a, b in zip(mixed.scores, plain.scores))
    # and the latents that the forward mixes in are those latents exactly
    model.config.thinking_latent_source = "embedding_plus_projection"
    mask = mixed.thinking_mask
    latent = model.model.thinking_latent(mixed.thinking_latents[mask], mixed.thinking_hidden[mask])
    assert torch.equal(latent.to(mixed.thinking_latents.dtype), mixed.thinking_latents[mask])


@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_is_explicit_and_survives_loading(arch, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, hidden_size=256, thinking_latent_source="projection")
    std = model.model.thinking_projection.weight.std().item()
    assert 0.0009 <= std <= 0.0011, std

    # An upstream-style checkpoint: everything but the thinking modules.
    model.save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    upstream = {k: v for k, v in weights.items() if "thinking" not in k}
    assert len(upstream) < len(weights)
    (tmp_path / "upstream").mkdir()
    save_file(upstream, tmp_path / "upstream" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "upstream" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "upstream", dtype=torch.float32)
    std = loaded.model.thinking_projection.weight.std().item()
    assert 0.0009 <= std <= 0.0011, std
    rate = torch.exp(-8 * torch.nn.functional.softplus(-loaded.model.thinking_residual_Lambda.Lambda))
    assert rate.min() >= 0.99 - 1e-5 and rate.max() <= 0.999 + 1e-5
    # and a checkpoint that has them restores them exactly
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_reproduce_latents_and_logits(arch, tmp_path):
    tokenizer = tiny_tokenizer()
    options = {"thinking_latent_source": "projection", "thinking_projection_layers": 2,
               "thinking_projection_layernorm": True, "thinking_latent_scale": "embedding",
               "answer_marker": "##"}
    model = tiny_model(arch, tokenizer, **options)
    with torch.no_grad():
        model.model.thinking_projection.weight.normal_(0, 0.1)  # not the init: a trained state
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    # Loaded tensors can sit at addresses that are not 64-byte aligned, and CPU kernels then
    # take other SIMD paths (last-bit differences): the floats are compared with a tolerance.
    for key, value in options.items():
        assert getattr(reloaded.config, key) == value
    _, out2 = generate_hybrid(reloaded, tokenizer, QUESTIONS[:4])
    assert torch.equal(out.sequences, out2.sequences)
    torch.testing.assert_close(out.thinking_hidden, out2.thinking_hidden, rtol=0, atol=1e-6)
    mask = out.thinking_mask
    with torch.no_grad():
        torch.testing.assert_close(model.model.projection_latent(out.thinking_hidden[mask]),
                                   reloaded.model.projection_latent(out.thinking_hidden[mask]), rtol=0, atol=1e-6)
        replayed, _, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking_inputs(out),
                                         tokenizer.eos_token_id)
        replayed2, _, _ = replay_logprobs(reloaded, out.sequences, enc.attention_mask, thinking_inputs(out),
                                          tokenizer.eos_token_id)
    torch.testing.assert_close(replayed, replayed2, rtol=0, atol=1e-5)


def test_bad_thinking_config_is_named():
    with pytest.raises(ValueError, match="thinking_latent_source"):
        tiny_model("llama", thinking_latent_source="hidden")
    with pytest.raises(ValueError, match="thinking_projection_layers"):
        tiny_model("qwen2", thinking_projection_layers=3)
    with pytest.raises(ValueError, match="layernorm"):
        tiny_model("qwen2", thinking_latent_source="embedding_plus_projection", thinking_projection_layernorm=True)


def test_parameter_counts_of_each_variant():
    d = 64
    counts = {}
    for name, options in {"linear": {}, "linear+layernorm": {"thinking_projection_layernorm": True},
                          "mlp2": {"thinking_projection_layers": 2}}.items():
        model = tiny_model("llama", hidden_size=d, thinking_latent_source="projection", **options)
        counts[name] = sum(p.numel() for p in model.model.thinking_projection.parameters())
    assert counts == {"linear": d * d, "linear+layernorm": d * d + 2 * d, "mlp2": 2 * d * d}


@pytest.mark.parametrize("source", ["embedding", "projection"])
def test_float32_thinking_modules_inside_a_bfloat16_model(source):
    """How mixed precision trains them (unsloth's modules_to_save copies are float32)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, thinking_latent_source=source).to(torch.bfloat16)
    for module in model.model.thinking_modules.values():
        module.float()
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=6)
    assert out.thinking_mask.any()
    with torch.no_grad():
        logprobs, mask, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking_inputs(out),
                                            tokenizer.eos_token_id, temperature=0.5)
    assert torch.isfinite(logprobs).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_require_thinking_source_raises_instead_of_falling_back(arch, monkeypatch):
    """The trainer's strict mode: a projection source without a hidden state is an error."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection")
    # with the hidden state there, strict mode samples exactly as the default
    enc, plain = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8)
    _, strict = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8,
                                require_thinking_source=True)
    assert strict.thinking_latent_source == "projection"
    assert torch.equal(strict.sequences, plain.sequences)
    assert torch.equal(strict.thinking_hidden, plain.thinking_hidden)

    real_forward = model.forward

    def forward_without_hidden(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.last_hidden_state = None
        return out

    monkeypatch.setattr(model, "forward", forward_without_hidden)
    with pytest.raises(RuntimeError, match="needs the last hidden state.*require_thinking_source=True"):
        generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8,
                        require_thinking_source=True)
    # the default still falls back, with a warning
    with pytest.warns(UserWarning, match="falling back to the embedding method"):
        _, fallback = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=8,
                                      require_thinking_source=False)
    assert fallback.thinking_latent_source == "embedding"


@pytest.mark.parametrize("arch", ARCHS)
def test_reset_lambda_parameters_resets_a_loaded_lambda(arch, tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_model(arch, tokenizer, thinking_latent_source="projection").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    module = loaded.model.thinking_residual_Lambda
    before = module.Lambda.detach().clone()
    torch.manual_seed(123)
    module.reset_lambda_parameters(0.9, 0.95)
    assert not torch.equal(module.Lambda, before)
    rate = torch.exp(-8 * torch.nn.functional.softplus(-module.Lambda.double()))
    assert rate.min() >= 0.9 - 1e-6 and rate.max() <= 0.95 + 1e-6
    # the configured range again: a fresh draw, within it
    drawn = module.Lambda.detach().clone()
    module.reset_lambda_parameters()
    assert not torch.equal(module.Lambda, drawn)
    rate = torch.exp(-8 * torch.nn.functional.softplus(-module.Lambda.double()))
    assert rate.min() >= 0.99 - 1e-6 and rate.max() <= 0.999 + 1e-6
