"""Hybrid rollouts through transformers' compiled decoding step (a static cache): one graph
for every step and call (no graph break, no recompilation), the same tokens as eager
decoding, an exact replay in every source x top-k x noise, no host sync per step beyond
upstream's stopping check, and the trainer's --compile_rollouts."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import BatchEncoding, CompileConfig

from hrpo.compiled_rollouts import drop_left_columns, pad_prompts_left
from testing.graph_replay import decoding_steps_replayed_from_static_outputs
from testing.host_syncs import counted_host_syncs
from testing.latent_options import option_combinations, options_model
from testing.rollouts import hybrid_rollout, replay_difference
from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer


def compile_config(backend: str = "eager") -> CompileConfig:
    """fullgraph: a graph break is an error. The eager backend traces as torch.compile does
    (graph breaks and guards are dynamo's, whatever the backend) without inductor's codegen."""
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    config._compile_all_devices = True  # upstream compiles on accelerators only
    return config


def rollout(model, tokenizer, enc, seed, compiled=None, greedy=False, max_new_tokens=20):
    kwargs = dict(output_scores=True)
    if compiled is not None:
        kwargs.update(cache_implementation="static", compile_config=compiled)
    if greedy:
        kwargs.update(is_inference=True)
    return hybrid_rollout(model, tokenizer, enc, seed, 0.5, max_new_tokens, **kwargs)


def fixed_length(tokenizer, questions, length: int = 48) -> BatchEncoding:
    enc = encode_prompts(tokenizer, questions)
    input_ids, attention_mask, _ = pad_prompts_left(enc["input_ids"], enc["attention_mask"], length,
                                                    tokenizer.pad_token_id)
    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("source, topk, noise", list(option_combinations()))
def test_compiled_hybrid_decoding_is_one_graph_and_replays_exactly(fresh_dynamo, source, topk, noise):
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, source, topk, noise)
    enc, other_prompts = fixed_length(tokenizer, QUESTIONS[:4]), fixed_length(tokenizer, QUESTIONS[4:8])
    config = compile_config()
    compiled = rollout(model, tokenizer, enc, seed=1, compiled=config)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # other prompts of the same padded length, other tokens, noise and answered rows: the same
    # graph (the trainer pads every batch's prompts to one length)
    torch._dynamo.config.error_on_recompile = True
    other = rollout(model, tokenizer, other_prompts, seed=2, compiled=config)
    assert counters["stats"]["unique_graphs"] == 1
    # greedy decoding drops the Gaussian noise (a graph without that input), then keeps its graph
    torch._dynamo.config.error_on_recompile = False
    greedy_compiled = rollout(model, tokenizer, enc, seed=3, compiled=config, greedy=True)
    assert counters["stats"]["unique_graphs"] == (2 if noise == "gaussian" else 1)
    torch._dynamo.config.error_on_recompile = True
    rollout(model, tokenizer, other_prompts, seed=4, compiled=config, greedy=True)
    torch._dynamo.config.error_on_recompile = False
    assert not counters["graph_break"]

    for out, prompts in ((compiled, enc), (other, other_prompts)):
        assert out.thinking_mask.any()
        max_diff, _, _ = replay_difference(model, tokenizer, prompts, out)
        assert max_diff <= 1e-4, (source, topk, noise, max_diff)
    eager = rollout(model, tokenizer, enc, seed=1)
    assert torch.equal(compiled.sequences, eager.sequences)  # fp32, the same seed: the same draws
    assert torch.equal(compiled.thinking_mask, eager.thinking_mask)
    greedy_eager = rollout(model, tokenizer, enc, seed=3, greedy=True)
    assert torch.equal(greedy_compiled.sequences, greedy_eager.sequences)


def test_inductor_compiled_hybrid_decoding_matches_eager(fresh_dynamo):
    """The real compiler (inductor, C++ on the CPU), once: its kernels round differently."""
    tokenizer = tiny_tokenizer()
    model = options_model("llama", tokenizer, "projection", None, "gaussian")
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    config = compile_config("inductor")
    greedy_compiled = rollout(model, tokenizer, enc, seed=1, compiled=config, greedy=True)
    assert torch.equal(greedy_compiled.sequences, rollout(model, tokenizer, enc, seed=1, greedy=True).sequences)
    sampled = rollout(model, tokenizer, enc, seed=2, compiled=config)
    assert sampled.thinking_mask.any()
    assert replay_difference(model, tokenizer, enc, sampled)[0] <= 1e-4
    assert not counters["graph_break"]


# ---------------------------------------------------------------- outputs overwritten by the next step

RECORDED = ("thinking_mask", "thinking_latents", "thinking_hidden", "thinking_noise", "thinking_gate_ratio",
            "thinking_hidden_ratio", "thinking_latent_left_out_mass", "sampled_token_logprobs")


def recorded_differences(first, second) -> dict:
    """max |first - second| of each recorded per-position field and of each step's hidden states and attentions."""
    out = {}
    for key in RECORDED:
        a, b = getattr(first, key), getattr(second, key)
        assert (a is None) == (b is None), key
        if a is not None:
            out[key] = (a.float() - b.float()).abs().max().item()
    for key in ("hidden_states", "attentions"):
        a, b = getattr(first, key), getattr(second, key)
        assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)), key
        out[key] = max((x - y).abs().max().item() for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))
    return out


@pytest.mark.parametrize("source, noise", [("projection", "gaussian"), ("embedding_plus_projection", "none"),
                                           ("embedding", "gumbel")])
def test_what_the_loop_keeps_from_a_step_survives_the_next_step_overwriting_its_outputs(source, noise):
    """CUDA-graph replay (reduce-overhead) hands every decoding step its outputs in the same
    storage. Stand-in on the CPU (testing/graph_replay.py): the eager forward, its outputs copied
    into buffers allocated once. The recorded thinking data, the per-step hidden states and the
    replay must be those of the same rollout decoded without the stand-in."""
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, source, None, noise)
    model.set_attn_implementation("eager")  # which returns the attentions
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    kwargs = dict(output_scores=True, output_hidden_states=True, output_attentions=True, cache_implementation="static")
    eager = hybrid_rollout(model, tokenizer, enc, 1, 0.5, 20, **kwargs)
    with decoding_steps_replayed_from_static_outputs(model) as buffers:
        replayed = hybrid_rollout(model, tokenizer, enc, 1, 0.5, 20, compile_config=compile_config(), **kwargs)
    assert buffers  # the decoding steps went through the stand-in
    assert torch.equal(replayed.sequences, eager.sequences)
    assert torch.equal(replayed.thinking_mask, eager.thinking_mask) and eager.thinking_mask.any()
    differences = recorded_differences(replayed, eager)
    assert max(differences.values()) <= 1e-5, differences
    gap = replay_difference(model, tokenizer, enc, replayed)[0]
    assert gap <= 1e-4, gap


# ---------------------------------------------------------------- host syncs

def syncs_per_step(model, tokenizer, enc, hybrid: bool, config) -> float:
    def run(steps):
        kwargs = dict(do_sample=True, temperature=0.5, top_k=0, top_p=1.0, max_new_tokens=steps, min_new_tokens=steps)
        if hybrid:
            kwargs.update(processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##",
                          return_dict_in_generate=True)
        if config is not None:
            kwargs.update(cache_implementation="static", compile_config=config)
        torch.manual_seed(0)
        with torch.no_grad(), counted_host_syncs() as counts:
            model.generate(**enc, **kwargs)
        return sum(counts.values())

    run(8), run(24)  # compiled (one graph per cache length) before counting
    return (run(24) - run(8)) / 16  # what one more step costs, prefill and output assembly cancelled out


def test_a_compiled_hybrid_step_syncs_with_the_host_no_more_than_plain_sampling(fresh_dynamo):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, thinking_latent_source="projection")
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    config = compile_config()
    plain = syncs_per_step(model, tokenizer, enc, hybrid=False, config=config)
    hybrid = syncs_per_step(model, tokenizer, enc, hybrid=True, config=config)
    assert plain == 1.0  # upstream's stopping check
    assert hybrid == plain


# ---------------------------------------------------------------- the trainer's fixed-length prompts

def test_prompts_padded_to_a_fixed_length_and_the_padding_cut_again():
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    padded, padded_mask, extra = pad_prompts_left(ids, mask, 5, pad_token_id=0)
    assert extra == 2
    assert padded.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 8, 9]]
    assert padded_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    sequences = torch.cat([padded, torch.tensor([[1], [2]])], dim=1)
    assert drop_left_columns(sequences, extra, 6).tolist() == [[5, 6, 7, 1], [0, 8, 9, 2]]
    assert pad_prompts_left(ids, mask, 3, 0)[2] == 0


def test_left_padding_changes_neither_the_tokens_nor_the_replay():
    """What --compile_rollouts does to every prompt batch, on the eager path: greedy decoding
    gives the same completions, and a sampled rollout replays exactly unpadded."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, thinking_latent_source="projection")
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    input_ids, attention_mask, extra = pad_prompts_left(enc["input_ids"], enc["attention_mask"],
                                                        enc["input_ids"].shape[1] + 7, tokenizer.pad_token_id)
    padded = BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})
    plain_greedy = rollout(model, tokenizer, enc, seed=1, greedy=True)
    padded_greedy = rollout(model, tokenizer, padded, seed=1, greedy=True)
    assert torch.equal(padded_greedy.sequences[:, extra:], plain_greedy.sequences)
    sampled = rollout(model, tokenizer, padded, seed=2)
    cut = drop_left_columns(sampled, extra, sampled.sequences.shape[1])
    assert replay_difference(model, tokenizer, enc, cut)[0] <= 1e-4


@pytest.mark.parametrize("hybrid", ["on", "off"])
def test_training_with_compile_rollouts_samples_compiled_and_replays_exactly(fresh_dynamo, tmp_path, hybrid):
    from hrpo import run as hrpo_run
    from hrpo.config import marked_fields
    from hrpo.settings_parser import parse_settings
    from testing.training import length_reward, save_training_workspace, tiny_training_argv

    workspace = save_training_workspace(tmp_path / "ws")
    argv = tiny_training_argv(workspace, tmp_path / "out", "--backend", "transformers", "--compile_rollouts",
                              "--hybrid_thinking", hybrid)
    if hybrid == "off":  # plain GRPO: without the thinking modules' rates
        drop = {i for i, flag in enumerate(argv) if flag.lstrip("-") in marked_fields("hybrid_only")}
        argv = [flag for i, flag in enumerate(argv) if i not in drop and i - 1 not in drop]
    args = parse_settings(argv)
    trainer = hrpo_run.build_trainer(args, reward_funcs=[length_reward])
    config = trainer.generation_config
    assert config.cache_implementation == "static" and not config.disable_compile
    assert config.compile_config._compile_all_devices  # on this CPU: compiled because asked for
    config.compile_config.backend, config.compile_config.mode = "eager", None  # dynamo's tracing, no codegen
    trainer.train()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # both micro-batches, one graph
    if hybrid == "on":
        assert len(trainer.replay_logprob_diffs) == 2 and max(trainer.replay_logprob_diffs) <= 1e-4
    assert trainer.state.global_step == 1


@pytest.mark.gpu
def test_cuda_graph_hybrid_step_syncs_like_plain_sampling(fresh_dynamo):
    """On a GPU, upstream's default compile (inductor, CUDA graphs): the device's own count of
    synchronizing calls per step (torch.cuda.set_sync_debug_mode) is plain sampling's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import warnings

    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, thinking_latent_source="projection").cuda()
    enc = encode_prompts(tokenizer, QUESTIONS[:4]).to("cuda")
    config = CompileConfig()

    def syncs(steps, hybrid):
        kwargs = dict(do_sample=True, temperature=0.5, top_k=0, max_new_tokens=steps, min_new_tokens=steps,
                      cache_implementation="static", compile_config=config)
        if hybrid:
            kwargs.update(processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##")
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.generate(**enc, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    per_step = {}
    for hybrid in (False, True):
        syncs(8, hybrid), syncs(24, hybrid)  # compiled before counting
        per_step[hybrid] = (syncs(24, hybrid) - syncs(8, hybrid)) / 16
    assert per_step[True] <= per_step[False], per_step


@pytest.mark.gpu
def test_cuda_graph_hybrid_rollouts_record_each_steps_own_data(fresh_dynamo):
    """On a GPU, upstream's default compile (inductor, mode="reduce-overhead": CUDA graphs, whose
    replays return every step's outputs in the same storage): greedy decoding records the thinking
    data eager decoding records, and a sampled rollout replays to its sampling log-probs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: CUDA graphs (mode='reduce-overhead') replay on a GPU only")
    tokenizer = tiny_tokenizer()
    model = options_model("qwen2", tokenizer, "projection", None, "gaussian").cuda()
    enc = fixed_length(tokenizer, QUESTIONS[:4]).to("cuda")
    config = CompileConfig()
    assert config.mode == "reduce-overhead"
    kwargs = dict(output_scores=True, cache_implementation="static")
    greedy_eager = hybrid_rollout(model, tokenizer, enc, 1, 0.5, 24, is_inference=True, **kwargs)
    greedy_graphs = hybrid_rollout(model, tokenizer, enc, 1, 0.5, 24, is_inference=True, compile_config=config,
                                   **kwargs)
    assert torch.equal(greedy_graphs.sequences, greedy_eager.sequences)
    assert torch.equal(greedy_graphs.thinking_mask, greedy_eager.thinking_mask) and greedy_eager.thinking_mask.any()
    for key in ("thinking_hidden", "thinking_gate_ratio", "thinking_hidden_ratio", "sampled_token_logprobs"):
        difference = (getattr(greedy_graphs, key) - getattr(greedy_eager, key)).abs().max().item()
        assert difference <= 1e-3, (key, difference)  # inductor's kernels round differently; the bug is O(1)
    sampled = hybrid_rollout(model, tokenizer, enc, 2, 0.5, 24, compile_config=config, **kwargs)
    assert sampled.thinking_mask.any()
    gap = replay_difference(model, tokenizer, enc, sampled)[0]
    assert gap <= 1e-3, gap
