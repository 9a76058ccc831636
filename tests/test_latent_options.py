"""Top-k latents and exploration noise (thinking_latent_topk, thinking_latent_noise): the
formulas against hand computations, exact replay in every source x top-k x noise, the
gradient path, the draws, the config checks."""
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.hybrid_thinking import generation as hybrid_generation
from transformers.hybrid_thinking.exploration import (
    advance_keys,
    gaussian_draws,
    gumbel_draws,
    initial_keys,
    mix64,
    uniform_from_bits,
)

from testing.latent_options import option_combinations, options_model
from testing.rollouts import generate_hybrid, hybrid_rollout, replay_difference, replay_logprobs, sampling_logprobs, thinking_inputs
from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer

ARCHS = ["llama", "qwen2"]


# ---------------------------------------------------------------- formulas

def test_topk_latent_against_hand_computation():
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, "embedding", topk=3)
    base = model.model
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, len(tokenizer)) * 3, dim=-1)
    latent, left_out = base.embedding_method_latent(probs)
    embeddings = base.get_input_embeddings().weight
    for row in range(2):
        order = sorted(range(probs.shape[1]), key=lambda v: -probs[row, v].item())[:3]
        kept = probs[row, order]
        expected = sum(kept[i] * embeddings[v] for i, v in enumerate(order)) / kept.norm()
        assert torch.allclose(latent[row], expected, atol=1e-6)
        assert left_out[row].item() == pytest.approx(1.0 - kept.sum().item(), abs=1e-6)


def test_full_vocabulary_latent_is_hrpos_and_leaves_nothing_out():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(3, len(tokenizer)), dim=-1)
    for topk in (None, len(tokenizer), len(tokenizer) + 7):
        base = options_model("llama", tokenizer, "embedding", topk=topk).model
        latent, left_out = base.embedding_method_latent(probs)
        weight = base.get_input_embeddings().weight
        torch.testing.assert_close(latent, (probs @ weight) / probs.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)
        assert torch.equal(left_out, torch.zeros(3))


def test_gumbel_weights_against_hand_computation():
    tokenizer = tiny_tokenizer()
    base = options_model("llama", tokenizer, "embedding", topk=4, noise="gumbel", scale=0.1).model
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(2, len(tokenizer)) * 2, dim=-1)
    keys = torch.tensor([11, -5], dtype=torch.int64)
    latent, _ = base.embedding_method_latent(probs, keys)
    embeddings = base.get_input_embeddings().weight
    kept, ids = torch.topk(probs, 4, dim=-1)
    gumbel = gumbel_draws(keys, ids)
    for row in range(2):
        weights = torch.softmax((torch.log(kept[row]) + gumbel[row]) / 0.1, dim=-1)
        expected = (weights[:, None] * embeddings[ids[row]]).sum(0) / weights.norm()
        assert torch.allclose(latent[row], expected, atol=1e-5)
    # without keys (greedy decoding) the noise is dropped and its temperature kept: softmax(log p / 0.1)
    greedy, _ = base.embedding_method_latent(probs)
    for row in range(2):
        weights = torch.softmax(torch.log(kept[row]) / 0.1, dim=-1)
        expected = (weights[:, None] * embeddings[ids[row]]).sum(0) / weights.norm()
        assert torch.allclose(greedy[row], expected, atol=1e-5)
    assert not torch.allclose(greedy, latent, atol=1e-3)


def test_gaussian_noise_std_against_hand_computation():
    tokenizer = tiny_tokenizer()
    for source, scale_mode in (("embedding", "unit"), ("projection", "unit"), ("projection", "embedding")):
        base = options_model("llama", tokenizer, source, noise="gaussian", scale=0.3,
                             thinking_latent_scale=scale_mode).model
        d = base.config.hidden_size
        typical = 1.0 if (source, scale_mode) == ("projection", "unit") else \
            base.get_input_embeddings().weight.norm(dim=-1).mean().item()
        assert base.latent_noise_std() == pytest.approx(0.3 * typical / math.sqrt(d), rel=1e-6)


# ---------------------------------------------------------------- the draws

def test_mix64_is_splitmix64_finaliser():
    mask = (1 << 64) - 1

    def reference(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    values = [0, 1, 12345, (1 << 63) - 1, 1 << 63, mask]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    out = mix64(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [o & mask for o in out] == [reference(v) for v in values]


def test_draws_have_their_distributions():
    keys = torch.arange(4000, dtype=torch.int64)
    normal = gaussian_draws(keys, 64)
    assert abs(normal.mean().item()) < 0.01 and abs(normal.std().item() - 1.0) < 0.01
    gumbel = gumbel_draws(keys, torch.arange(64)[None, :])
    assert abs(gumbel.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(gumbel.var().item() - math.pi ** 2 / 6) < 0.03
    # rows and coordinates are decorrelated
    assert abs(torch.corrcoef(normal[:, :2].T)[0, 1].item()) < 0.05


def test_uniform_draws_are_strictly_inside_zero_one():
    extremes = uniform_from_bits(torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)], dtype=torch.int64))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()  # a Gumbel draw at either end


def test_keys_follow_the_tokens_not_the_padding():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [0, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    keys = initial_keys(3, ids, mask)
    assert keys[0] != keys[1]
    # the first row's prompt, padded once more, is the third row's prefix
    assert initial_keys(3, ids[:1, 1:], mask[:1, 1:]) == keys[0]
    assert advance_keys(keys[:1], torch.tensor([8]))[0] == keys[2]
    assert initial_keys(4, ids, mask)[0] != keys[0]


# ---------------------------------------------------------------- sampling and replay

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source, topk, noise", list(option_combinations()))
def test_replay_reproduces_sampling_in_every_combination(arch, source, topk, noise):
    tokenizer = tiny_tokenizer()
    model = options_model(arch, tokenizer, source, topk, noise)
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:6], max_new_tokens=24)
    max_diff, _, mask = replay_difference(model, tokenizer, enc, out)
    assert out.thinking_mask.any()
    assert max_diff <= 1e-4, (source, topk, noise, max_diff)
    assert (out.thinking_noise is not None) == (noise == "gaussian")
    left_out = out.thinking_latent_left_out_mass
    if source == "projection":
        assert left_out is None
    else:
        flagged = left_out[out.thinking_mask]
        assert (flagged > 0.01).all() if topk else (flagged == 0).all()
    if noise == "none":
        return
    # the negative control: the replay without the noise that was fed does not reproduce sampling
    prompt_len = enc.input_ids.shape[1]
    with torch.no_grad():
        noise_free = options_model(arch, tokenizer, source, topk, "none")
        noise_free.load_state_dict(model.state_dict())
        thinking = thinking_inputs(out)
        if noise == "gaussian":
            thinking["thinking_noise"] = None
        else:  # the Gumbel-perturbed weights formed the latents: recompute them without noise
            thinking["thinking_latents"] = recompute_latents(noise_free, out, prompt_len)
        replayed, _, _ = replay_logprobs(noise_free, out.sequences, enc.attention_mask, thinking,
                                         tokenizer.eos_token_id, 0.5)
    assert ((replayed - sampling_logprobs(out, prompt_len)).abs() * mask).max() > 1e-3


def recompute_latents(model, out, prompt_len):
    """The embedding-method latents of a rollout from its recorded scores, without noise."""
    latents = torch.zeros_like(out.thinking_latents)
    for step, scores in enumerate(out.scores):  # the token sampled at a step is fed at prompt_len + step
        latent, _ = model.model.embedding_method_latent(torch.softmax(scores.float(), dim=-1))
        latents[:, prompt_len + step] = latent
    return latents


@pytest.mark.parametrize("arch", ARCHS)
def test_default_options_are_hrpos_latent_without_noise(arch, monkeypatch):
    """No top-k and no noise: the latent fed is sum_v p_v E_v / ||p||_2 over the whole
    vocabulary of the sampling distribution (hand computation from the recorded scores), and
    generation draws no noise seed, so runs without the options repeat as before."""
    def no_draw(*args, **kwargs):
        raise AssertionError("a noise seed was drawn with the noise off")

    monkeypatch.setattr(hybrid_generation.torch, "randint", no_draw)
    tokenizer = tiny_tokenizer()
    model = options_model(arch, tokenizer, "embedding")
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4])
    prompt_len = enc.input_ids.shape[1]
    weight = model.model.get_input_embeddings().weight
    for step, scores in enumerate(out.scores):  # the token sampled at a step is fed at prompt_len + step
        probs = torch.softmax(scores.float(), dim=-1)
        position = prompt_len + step
        flagged = out.thinking_mask[:, position]
        expected = (probs @ weight) / probs.norm(dim=-1, keepdim=True)
        assert torch.allclose(out.thinking_latents[flagged, position], expected[flagged], atol=1e-6)
    assert out.thinking_noise is None
    with pytest.raises(AssertionError, match="seed was drawn"):  # the patch is in the path noise takes
        generate_hybrid(options_model(arch, tokenizer, "embedding", noise="gaussian"), tokenizer, QUESTIONS[:2])


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_greedy_decoding_has_no_noise(noise):
    tokenizer = tiny_tokenizer()
    noisy = options_model("qwen2", tokenizer, "embedding", 5, noise)
    quiet = options_model("qwen2", tokenizer, "embedding", 5, "none")
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    outs = [m.generate(**enc, processing_class=tokenizer, do_sample=False, max_new_tokens=12,
                       return_thinking_embeds=True, answer_marker="##") for m in (noisy, quiet)]
    assert outs[0].thinking_noise is None
    if noise == "gaussian":  # Gumbel keeps its temperature in greedy decoding (the next test)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        torch.testing.assert_close(outs[0].thinking_latents, outs[1].thinking_latents, rtol=0, atol=1e-6)


def gumbel_weights_latents(model, out, prompt_len, temperature):
    """The latents a top-5 Gumbel run feeds without the noise: softmax(log p / T) over the top 5
    of each step's sampling distribution (hand computation from the recorded scores)."""
    embeddings = model.model.get_input_embeddings().weight
    latents = torch.zeros_like(out.thinking_latents)
    for step, scores in enumerate(out.scores):
        kept, ids = torch.topk(torch.softmax(scores.float(), dim=-1), 5, dim=-1)
        weights = torch.softmax(torch.log(kept) / temperature, dim=-1)
        latents[:, prompt_len + step] = (weights[..., None] * embeddings[ids]).sum(1) / weights.norm(dim=-1,
                                                                                                    keepdim=True)
    return latents


def test_greedy_gumbel_run_feeds_what_sampling_fed_minus_the_noise(monkeypatch):
    """Training mixes w = softmax((log p + g) / T); greedy evaluation (hrpo.held_out's
    is_inference) drops g and keeps T, as sampling does when every draw is 0."""
    from transformers.hybrid_thinking import exploration

    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, "embedding", 5, "gumbel", scale=0.1)
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    prompt_len = enc.input_ids.shape[1]
    greedy = hybrid_rollout(model, tokenizer, enc, 0, 0.5, 12, is_inference=True, output_scores=True)
    monkeypatch.setattr(exploration, "gumbel_draws", lambda keys, ids: torch.zeros(keys.shape[0], ids.shape[-1]))
    sampled = hybrid_rollout(model, tokenizer, enc, 0, 0.5, 12, output_scores=True)
    for out in (greedy, sampled):
        flagged = out.thinking_mask
        assert flagged.any()
        expected = gumbel_weights_latents(model, out, prompt_len, 0.1)
        torch.testing.assert_close(out.thinking_latents[flagged], expected[flagged], rtol=0, atol=1e-5)


def sample_recording_keys(model, tokenizer, enc, seed, monkeypatch):
    """A noisy hybrid rollout and, per decoding step, the rows' noise keys (int64) that drew
    the noise fed with the token sampled at that step."""
    keys = []

    def recording_advance(previous, tokens):
        keys.append(advance_keys(previous, tokens))
        return keys[-1]

    monkeypatch.setattr(hybrid_generation, "advance_keys", recording_advance)
    torch.manual_seed(seed)
    with torch.no_grad():  # a low temperature: rows of a prompt share prefixes for a while
        out = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##",
                             do_sample=True, temperature=0.05, top_k=0, max_new_tokens=12,
                             return_dict_in_generate=True)
    return out, keys


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_rollouts_with_the_same_tokens_were_fed_the_same_noise(noise, monkeypatch):
    """What lets the replay find a rollout's inputs by its tokens: the noise is a function of
    the row's tokens so far (and one seed per call), so rows with the same prefix were fed the
    same inputs, and rows whose prefixes differ draw independently. The keys are integers and
    compared exactly; the floats fed are compared with a tolerance far below the noise's size
    (they cross batch rows, which no BLAS promises to treat bit for bit alike)."""
    tokenizer = tiny_tokenizer()
    model = options_model("llama", tokenizer, "embedding_plus_projection", 5, noise)
    enc = encode_prompts(tokenizer, ["a+b?"] * 4 + ["hello"] * 2)
    out, keys = sample_recording_keys(model, tokenizer, enc, 0, monkeypatch)
    recorded = out.thinking_noise if noise == "gaussian" else out.thinking_latents
    prompt_len = enc.input_ids.shape[1]
    attended = torch.cat([enc.attention_mask.bool(), torch.ones_like(out.sequences[:, prompt_len:]).bool()], dim=1)

    def prefix(row, position):
        return out.sequences[row, :position + 1][attended[row, :position + 1]].tolist()

    def draws(key):
        key = key[None]
        return gaussian_draws(key, 64) if noise == "gaussian" else gumbel_draws(key, torch.arange(64)[None, :])

    shared = differing = 0
    for step, step_keys in enumerate(keys):  # the token sampled at a step is fed, with its noise, at prompt_len + step
        p = prompt_len + step
        for i, j in itertools.combinations(range(6), 2):
            if not (out.thinking_mask[i, p] and out.thinking_mask[j, p]):
                continue
            same_prefix = prefix(i, p) == prefix(j, p)
            assert bool(step_keys[i] == step_keys[j]) == same_prefix, (i, j, p)
            if same_prefix:
                torch.testing.assert_close(recorded[i, p], recorded[j, p], rtol=0, atol=1e-6)
                shared += 1
            else:  # independent draws: 64 standard normals (or Gumbels) apart, not a rounding apart
                assert (draws(step_keys[i]) - draws(step_keys[j])).abs().max() > 0.5, (i, j, p)
                differing += 1
    assert shared and differing
    # another call draws another seed: every row's first key changes
    again, again_keys = sample_recording_keys(model, tokenizer, enc, 1, monkeypatch)
    assert not (again_keys[0] == keys[0]).any()


@pytest.mark.parametrize("source, topk, noise", list(option_combinations()))
def test_generate_without_cache_feeds_the_same_inputs_and_replays(source, topk, noise):
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, source, topk, noise)
    enc, cached = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=16)
    _, uncached = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=16, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for key in ("thinking_mask", "thinking_noise", "thinking_latent_left_out_mass"):
        a, b = getattr(cached, key), getattr(uncached, key)
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6), key
    assert replay_difference(model, tokenizer, enc, uncached)[0] <= 1e-4


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("source, topk, noise", list(option_combinations()))
def test_gradients_reach_every_thinking_module_through_the_noisy_latent(source, topk, noise):
    """The replay's gradient reaches the gates, Lambda and (projection sources) the projection,
    and with noise it is the gradient at the noisy latent: it differs from the gradient of the
    same replay fed without the noise."""
    tokenizer = tiny_tokenizer()
    model = options_model("llama", tokenizer, source, topk, noise, scale={"none": 0.0, "gaussian": 1.0,
                                                                        "gumbel": 0.1}[noise],
                          thinking_projection_init_std=0.05)
    model.train()
    enc, out = generate_hybrid(model, tokenizer, QUESTIONS[:4], max_new_tokens=16)
    prompt_len = enc.input_ids.shape[1]

    def gradients(thinking):
        model.zero_grad()
        logprobs, mask, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking,
                                            tokenizer.eos_token_id, 0.5)
        (logprobs * mask).sum().backward()
        return {name: p.grad.clone() for name, p in model.model.named_parameters()
                if name.split(".")[0] in model.model.thinking_modules}

    fed = thinking_inputs(out)
    grads = gradients(fed)
    assert set(grads) and all(g.abs().sum() > 0 for g in grads.values()), grads.keys()
    assert ("thinking_projection.weight" in grads) == (source != "embedding")
    assert not any(t is not None and t.requires_grad for t in fed.values())  # no gradient into what was fed
    if noise == "none":
        return
    without = dict(fed)
    if noise == "gaussian":
        without["thinking_noise"] = None
    else:
        quiet = options_model("llama", tokenizer, source, topk, "none")
        quiet.load_state_dict(model.state_dict())
        without["thinking_latents"] = recompute_latents(quiet, out, prompt_len)
    other = gradients(without)
    assert any(not torch.allclose(grads[name], other[name]) for name in grads)


def test_recorded_noise_is_a_constant_input():
    tokenizer = tiny_tokenizer()
    model = options_model("llama", tokenizer, "embedding", None, "gaussian")
    _, out = generate_hybrid(model, tokenizer, QUESTIONS[:2], max_new_tokens=8)
    assert not out.thinking_noise.requires_grad
    assert not out.thinking_latents.requires_grad


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("fields, message", [
    ({"thinking_latent_source": "projection", "thinking_latent_topk": 5}, "does not use"),
    ({"thinking_latent_source": "projection", "thinking_latent_noise": "gumbel",
      "thinking_latent_noise_scale": 0.1}, "does not use"),
    ({"thinking_latent_topk": 0}, "integer >= 1"),
    ({"thinking_latent_topk": 2.5}, "integer >= 1"),
    ({"thinking_latent_noise": "uniform"}, "one of"),
    ({"thinking_latent_noise": "gaussian"}, "thinking_latent_noise_scale > 0"),
    ({"thinking_latent_noise": "gumbel", "thinking_latent_noise_scale": -1.0}, "thinking_latent_noise_scale > 0"),
    ({"thinking_latent_noise_scale": 0.5}, "thinking_latent_noise is 'none'"),
    ({"thinking_latent_noise": "gaussian", "thinking_latent_noise_scale": True}, "must be a number"),
])
def test_bad_options_are_errors_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_model("llama", tiny_tokenizer(), **fields)


def test_options_are_saved_with_the_model(tmp_path):
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, "embedding_plus_projection", 7, "gumbel", scale=0.2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.thinking_latent_topk == 7
    assert loaded.config.thinking_latent_noise == "gumbel"
    assert loaded.config.thinking_latent_noise_scale == 0.2
    # a config saved before the options existed loads with the defaults (HRPO's latent, no noise)
    plain = tiny_model("qwen2", tokenizer, thinking_latent_source="embedding").config
    for key in ("thinking_latent_topk", "thinking_latent_noise", "thinking_latent_noise_scale"):
        delattr(plain, key)
    rebuilt = type(loaded)(plain)
    assert rebuilt.config.thinking_latent_topk is None and rebuilt.config.thinking_latent_noise == "none"


# ---------------------------------------------------------------- the training script

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from testing.training import save_training_workspace

    return save_training_workspace(tmp_path_factory.mktemp("options"))


@pytest.mark.parametrize("source, flags", [
    ("embedding", ["--thinking_latent_topk", "3", "--thinking_latent_noise", "gumbel",
                   "--thinking_latent_noise_scale", "0.1"]),
    ("projection", ["--thinking_latent_noise", "gaussian", "--thinking_latent_noise_scale", "0.33"]),
])
def test_training_step_with_the_options_replays_exactly_and_saves_them(workspace, tmp_path, source, flags):
    import json

    from hrpo import run as hrpo_run
    from testing.training import length_reward, tiny_training_args

    args = tiny_training_args(workspace, tmp_path / "out", "--thinking_latent_source", source, *flags)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    trainer.train()
    assert len(trainer.replay_logprob_diffs) == 2 and max(trainer.replay_logprob_diffs) <= 1e-4
    logged = trainer.state.log_history[0]
    assert ("thinking/latent_left_out_mass" in logged) == ("--thinking_latent_topk" in flags)
    saved = json.loads((tmp_path / "out" / "checkpoint-1" / "config.json").read_text())
    given = dict(zip(flags[::2], flags[1::2]))
    assert saved["thinking_latent_noise"] == given["--thinking_latent_noise"]
    assert saved["thinking_latent_noise_scale"] == float(given["--thinking_latent_noise_scale"])
    assert saved["thinking_latent_topk"] == (int(given["--thinking_latent_topk"]) if "--thinking_latent_topk" in given
                                             else None)


@pytest.mark.parametrize("flags, named", [
    (["--thinking_latent_noise", "gaussian"], "thinking_latent_noise_scale"),
    (["--thinking_latent_source", "projection", "--thinking_latent_topk", "5"], "thinking_latent_topk"),
])
def test_bad_option_flags_are_named_before_training(workspace, tmp_path, capsys, flags, named):
    from hrpo import train

    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(tmp_path / "out"), *flags]
    assert train.main(argv) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trainer_refuses_a_forward_that_drops_the_noise(monkeypatch):
    from hrpo.model_checks import verify_hybrid_forward

    tokenizer = tiny_tokenizer()
    model = options_model("llama", tokenizer, "projection", None, "gaussian")
    verify_hybrid_forward(model, model.model)  # the fork's forward applies it
    original = type(model.model).mix_thinking_inputs
    monkeypatch.setattr(type(model.model), "mix_thinking_inputs",
                        lambda self, embeds, mask=None, latents=None, hidden=None, noise=None:
                        original(self, embeds, mask, latents, hidden))
    with pytest.raises(RuntimeError, match="ignores thinking_noise"):
        verify_hybrid_forward(model, model.model)


def test_resuming_a_checkpoint_from_before_the_options_keeps_their_defaults(workspace, tmp_path, monkeypatch, capsys):
    """Its config.json lacks the fields: they count as the defaults it was trained with, so a
    flag that sets them conflicts with the checkpoint instead of changing the run midway."""
    import json

    from hrpo import run as hrpo_run, train
    from hrpo.checkpoint import RUN_SETTINGS, mark_complete, write_run_settings
    from testing.training import tiny_training_args

    out = tmp_path / "out"
    args = tiny_training_args(workspace, out, "--thinking_latent_source", "embedding")
    model = tiny_model("qwen2", hidden_size=32, **args.thinking.to_dict())
    write_run_settings(model, hrpo_run.run_settings_record(args), out / "checkpoint-1")
    options = ("thinking_latent_topk", "thinking_latent_noise", "thinking_latent_noise_scale")
    path = out / "checkpoint-1" / "config.json"  # as written before the options existed
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in options}))
    path = out / "checkpoint-1" / RUN_SETTINGS
    saved = json.loads(path.read_text())
    saved["settings"] = {k: v for k, v in saved["settings"].items() if k not in options}
    saved["given"] = [k for k in saved["given"] if k not in options]
    path.write_text(json.dumps(saved))
    mark_complete(out / "checkpoint-1")
    monkeypatch.setattr(hrpo_run, "train", lambda settings: None)
    argv = ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--resume"]
    assert train.main(argv) == 0
    assert train.main(argv + ["--thinking_latent_topk", "5"]) == 2
    assert "--thinking_latent_topk" in capsys.readouterr().err
