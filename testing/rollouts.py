"""Hybrid rollouts of a model and their teacher-forced replay: the reference computation the
tests and benches compare sampling, the trainer and unsloth's fast paths against."""
from __future__ import annotations

import torch
from transformers.hybrid_thinking.modeling import THINKING_INPUTS

from hrpo.replay import completion_mask, position_ids_from_mask
from testing.tiny import encode_prompts


def thinking_inputs(generation_output) -> dict:
    """The replay kwargs for the model forward, from a hybrid generation output."""
    return {key: getattr(generation_output, key) for key in THINKING_INPUTS}


def replay_logprobs(model, sequences, prompt_attention_mask, thinking: dict | None,
                    eos_token_id, temperature: float = 1.0):
    """Per-token log-probs of the completion under ``model`` (with grad if enabled).

    Returns (logprobs (batch, completion_len) float32, completion mask, model outputs).
    """
    prompt_len = prompt_attention_mask.shape[1]
    completion = sequences[:, prompt_len:]
    mask = completion_mask(completion, eos_token_id)
    attention_mask = torch.cat([prompt_attention_mask.to(mask.dtype), mask], dim=1)
    outputs = model(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), **(thinking or {}))
    logits = outputs.logits[:, prompt_len - 1:-1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None]).squeeze(-1)
    return logprobs, mask, outputs


def sampling_logprobs(generation_output, prompt_len: int) -> torch.Tensor:
    """Log-probs of the sampled tokens under the processed sampling distribution."""
    completion = generation_output.sequences[:, prompt_len:]
    scores = torch.stack(generation_output.scores, dim=1).float()
    return torch.log_softmax(scores, dim=-1).gather(-1, completion[..., None]).squeeze(-1)


def hybrid_rollout(model, tokenizer, enc, seed: int, temperature: float, max_new_tokens: int, marker: str = "##",
                   **generate_kwargs):
    """One seeded hybrid-sampling generate() over the encoded prompts."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, answer_marker=marker,
                              do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, return_dict_in_generate=True, **generate_kwargs)


def generate_hybrid(model, tokenizer, questions, seed=1, max_new_tokens=40, marker="##", **kw):
    """Encode ``questions`` and sample them in hybrid mode at temperature 0.5, with the scores."""
    enc = encode_prompts(tokenizer, questions)
    out = hybrid_rollout(model, tokenizer, enc, seed, 0.5, max_new_tokens, marker, output_scores=True, **kw)
    return enc, out


def replay_rollout(model, tokenizer, enc, out, temperature: float, grad: bool = False):
    """replay_logprobs of a rollout, on copies of its tensors (unsloth generates under
    inference_mode, whose tensors cannot be saved for backward)."""
    thinking = {k: (v.clone() if v is not None else None) for k, v in thinking_inputs(out).items()}
    with torch.set_grad_enabled(grad):
        return replay_logprobs(model, out.sequences.clone(), enc.attention_mask, thinking, tokenizer.eos_token_id,
                               temperature=temperature)


def replay_difference(model, tokenizer, enc, out):
    """(max, mean) |replay - sampling| log-prob over the completion tokens, and their mask."""
    prompt_len = enc.input_ids.shape[1]
    with torch.no_grad():
        replayed, mask, _ = replay_logprobs(model, out.sequences, enc.attention_mask, thinking_inputs(out),
                                            tokenizer.eos_token_id, temperature=0.5)
    sampled = sampling_logprobs(out, prompt_len)
    recorded = out.sampled_token_logprobs[:, prompt_len:]
    assert torch.equal(recorded * mask, sampled * mask)
    diff = (replayed - sampled).abs() * mask
    return diff.max().item(), (diff.sum() / mask.sum()).item(), mask
