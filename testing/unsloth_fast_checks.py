"""Subprocess entry: the unsloth fast paths against the transformers fork, on one set of weights.

    python -m testing.unsloth_fast_checks <arch> <out.json>

For each latent source (and two with the peers' options: top-k with Gumbel or Gaussian
noise) it first computes the reference with the transformers fork's own
forward and generate (before anything of unsloth's is imported), then puts unsloth's fast
paths in place (`unsloth_cpu.install`) on the same model objects and measures the same
things again. It writes the differences as JSON; test_unsloth_fast_path.py judges them.
Run in its own process: unsloth patches model classes for the whole process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from testing.rollouts import hybrid_rollout, replay_logprobs, replay_rollout
from testing.tiny import QUESTIONS, encode_prompts, tiny_model, tiny_tokenizer
from testing.variants import latent_variant

SOURCES = ("embedding", "projection", "embedding_plus_projection")
# each source, and two with the options of HRPO's peers (testing/variants.py)
VARIANTS = {name: latent_variant(name) for name in (*SOURCES, "embedding+top5+gumbel",
                                                      "embedding_plus_projection+top5+gaussian")}


def variant_source(variant: str) -> str:
    return VARIANTS[variant]["thinking_latent_source"]
TEMPERATURE = 0.5


def rollout(model, tokenizer, enc):
    return hybrid_rollout(model, tokenizer, enc, seed=3, temperature=TEMPERATURE, max_new_tokens=24, output_scores=True)


def thinking_grads(model, tokenizer, enc, out):
    """Gradients of the replayed completion log-likelihood w.r.t. every thinking parameter."""
    model.zero_grad(set_to_none=True)
    model.train()
    logprobs, mask, _ = replay_rollout(model, tokenizer, enc, out, TEMPERATURE, grad=True)
    (logprobs * mask).sum().backward()
    model.eval()
    grads = {}
    for name, module in model.model.thinking_modules.items():  # the source's modules only
        for pname, param in module.named_parameters():
            grads[f"{name}.{pname}"] = None if param.grad is None else param.grad.detach().clone()
    return grads


def measure(model, tokenizer, enc, out):
    prompt_len = enc.input_ids.shape[1]
    with torch.no_grad():
        plain_logits = model(**enc).logits
    logprobs, mask, outputs = replay_rollout(model, tokenizer, enc, out, TEMPERATURE)
    with torch.no_grad():
        discrete, _, _ = replay_logprobs(model, out.sequences.clone(), enc.attention_mask, None,
                                         tokenizer.eos_token_id, temperature=TEMPERATURE)
    return {
        "discrete_replay_logprobs": discrete,
        "plain_logits": plain_logits,
        "replay_logprobs": logprobs,
        "completion_mask": mask,
        "gate_ratio": outputs.thinking_gate_ratio,
        "rollout": out,
        "sampling_logprobs": out.sampled_token_logprobs[:, prompt_len:],
        "grads": thinking_grads(model, tokenizer, enc, out),
    }


def max_diff(a, b, where=None):
    d = (a.float() - b.float()).abs()
    if where is not None:
        d = d[where]
    return d.max().item() if d.numel() else 0.0


def compare(ref, fast, enc):
    prompt_len = enc.input_ids.shape[1]
    attended = enc.attention_mask.bool()
    mask = ref["completion_mask"].bool()
    ref_out, fast_out = ref["rollout"], fast["rollout"]
    # unsloth's generate pads finished rows with EOS where transformers uses pad: compare up to EOS.
    ref_mask = ref_out.thinking_mask[:, prompt_len:]
    fast_mask = fast_out.thinking_mask[:, prompt_len:]
    same_tokens = torch.equal(ref_out.sequences[:, prompt_len:][mask], fast_out.sequences[:, prompt_len:][mask])
    thinking = ref_mask & fast_mask
    result = {
        "plain_logits": max_diff(ref["plain_logits"], fast["plain_logits"], attended),
        "replay_logprobs": max_diff(ref["replay_logprobs"], fast["replay_logprobs"], mask),
        "gate_ratio": max_diff(ref["gate_ratio"], fast["gate_ratio"]),
        "thinking_positions": int(ref_mask.sum()),
        "same_tokens": same_tokens,
        "same_thinking_mask": torch.equal(ref_mask[mask], fast_mask[mask]),
        "sampling_logprobs": max_diff(ref["sampling_logprobs"], fast["sampling_logprobs"], mask),
        "fast_replay_vs_sampling": max_diff(fast["replay_logprobs"], fast["sampling_logprobs"],
                                            fast["completion_mask"].bool()),
        # negative control: the same replay on discrete tokens only
        "fast_discrete_replay_vs_sampling": max_diff(fast["discrete_replay_logprobs"], fast["sampling_logprobs"],
                                                     fast["completion_mask"].bool()),
        "fast_gate_ratio_recorded": max_diff(fast_out.thinking_gate_ratio[:, prompt_len:],
                                             fast["gate_ratio"][:, prompt_len:], mask),
        "grads": {},
    }
    for field in ("thinking_latents", "thinking_hidden", "thinking_noise"):
        a, b = getattr(ref_out, field), getattr(fast_out, field)
        if a is None or b is None:
            result[field] = None if a is None and b is None else "missing on one side"
        else:
            result[field] = max_diff(a[:, prompt_len:], b[:, prompt_len:], thinking)
    for name, ref_grad in ref["grads"].items():
        fast_grad = fast["grads"][name]
        if ref_grad is None or fast_grad is None:
            result["grads"][name] = {"ref_none": ref_grad is None, "fast_none": fast_grad is None}
            continue
        scale = ref_grad.abs().max().item()
        result["grads"][name] = {"norm": ref_grad.norm().item(), "fast_norm": fast_grad.norm().item(),
                                 "max_rel": max_diff(ref_grad, fast_grad) / scale if scale else 0.0}
    return result


def main(arch: str, out_path: str) -> None:
    tokenizer = tiny_tokenizer()
    enc = encode_prompts(tokenizer, QUESTIONS[:4])
    models, refs = {}, {}
    for source, config in VARIANTS.items():
        models[source] = tiny_model(arch, tokenizer, hidden_size=64, **config)
        refs[source] = measure(models[source], tokenizer, enc, rollout(models[source], tokenizer, enc))

    from testing import unsloth_cpu
    unsloth_cpu.install()
    results = {}
    for source, model in models.items():
        unsloth_cpu.prepare_like_from_pretrained(model)
        forwards = (type(model).forward.__name__, type(model.model).forward.__name__)
        fast = measure(model, tokenizer, enc, rollout(model, tokenizer, enc))
        results[source] = {"forwards": forwards, **compare(refs[source], fast, enc)}
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
