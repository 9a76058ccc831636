"""One rank of the FSDP2 check (tests/test_multiprocess.py), run by torch.distributed.run:

    python -m torch.distributed.run --nproc_per_node 2 -m testing.fsdp2_step OUT_DIR SOURCE [SCALE]

The hybrid model sharded with ``fully_shard`` (each decoder layer, then the root, where the
embeddings, the head and the thinking modules live), over gloo on CPU. Each rank samples its
own prompts in hybrid mode with ``synced_gpus``, replays its rollouts with the recorded
thinking inputs, takes a policy-gradient-shaped loss, a backward and an AdamW step. The same
model unsharded, in this one process, samples the same prompts with the same seed, and takes
the same loss over every rank's rollouts (gathered), the same backward and step. Each rank
writes what the test compares: the rollout tokens, the replay gap, the gradients and updated
parameters against the unsharded ones, and the thinking modules as a full state dict gathers
them for saving.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MAX_NEW_TOKENS = 12
PROMPTS_PER_RANK = 2


def policy_loss(model, tokenizer, enc, rollout, advantages):
    """Mean over sequences of the mean over completion tokens of -advantage x log-prob."""
    from testing.rollouts import replay_logprobs, thinking_inputs

    logprobs, mask, _ = replay_logprobs(model, rollout.sequences, enc.attention_mask, thinking_inputs(rollout),
                                        tokenizer.eos_token_id, temperature=0.7)
    per_sequence = (logprobs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return -(advantages * per_sequence).mean(), logprobs, mask


def main(out: Path, source: str, scale: str = "unit") -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    from testing.rollouts import sampling_logprobs
    from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    thinking = {"thinking_latent_source": source}
    if source != "embedding":
        thinking["thinking_latent_scale"] = scale
    reference = tiny_model("qwen2", tokenizer, **thinking)  # the same weights on every rank
    model = tiny_model("qwen2", tokenizer, **thinking)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(rank * PROMPTS_PER_RANK, (rank + 1) * PROMPTS_PER_RANK)]
    enc = encode_prompts(tokenizer, questions)

    def sample(m, synced):
        torch.manual_seed(1000 + rank)
        with torch.no_grad():
            return m.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##",
                              do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
                              output_scores=True, return_dict_in_generate=True, synced_gpus=synced)

    rollout = sample(model, synced=True)
    alone = sample(reference, synced=False)
    advantages = torch.linspace(-1.0, 1.0, PROMPTS_PER_RANK)

    model.train()
    loss, logprobs, mask = policy_loss(model, tokenizer, enc, rollout, advantages)
    prompt_len = enc.input_ids.shape[1]
    replay_gap = ((logprobs - sampling_logprobs(rollout, prompt_len)).abs() * mask).max().item()
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    saved = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # the unsharded reference: every rank's rollouts and advantages, one loss over all of them
    everything = [None] * world
    dist.all_gather_object(everything, (questions, {k: v for k, v in vars(rollout).items()}, advantages))
    reference.train()
    total = 0.0
    for their_questions, fields, their_advantages in everything:
        their_enc = encode_prompts(tokenizer, their_questions)
        their_rollout = type(rollout)(**fields)
        total = total + policy_loss(reference, tokenizer, their_enc, their_rollout, their_advantages)[0] / world
    total.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    torch.optim.AdamW(reference.parameters(), lr=1e-2).step()
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}

    thinking_names = [n for n in ref_params if any(m in n for m in THINKING_MODULES)]
    result = {
        "rank": rank, "world": world, "source": source, "scale": scale,
        "tokens_equal_unsharded": torch.equal(rollout.sequences, alone.sequences),
        "thinking_positions": int(rollout.thinking_mask.sum()),
        "replay_gap": replay_gap,
        "grad_names_equal": sorted(grads) == sorted(ref_grads),
        "grad_max_rel_diff": max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                                 for n, g in ref_grads.items()),
        "param_max_abs_diff": max((params[n] - p).abs().max().item() for n, p in ref_params.items()),
        "thinking_parameters": thinking_names,
        "grad_norm": sum(g.float().norm() ** 2 for g in ref_grads.values()).item() ** 0.5,
        # a full state dict with cpu_offload is gathered on rank 0, the saving process
        "saved_whole": None if rank else all(tuple(saved[n].shape) == tuple(ref_params[n].shape)
                                             and saved[n].dtype == torch.float32 for n in thinking_names),
        "saved_equals_trained": None if rank else all(torch.equal(saved[n], params[n]) for n in thinking_names),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
