"""The teacher-forced replay of sampled completions (what the GRPO loss scores).

Generation hands back, per position of prompt + completion, the thinking mask and the
latent sources; the replay forward mixes the same positions with the same latents (the
projection, gates and Lambda applied inside autograd) and scores the completion tokens.
"""
from __future__ import annotations

import torch


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    is_eos = completion_ids == eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate() numbers them: counting only attended tokens (left padding)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def thinking_inputs(generation_output) -> dict:
    """The replay kwargs for the model forward, from a hybrid generation output."""
    return {
        "thinking_mask": generation_output.thinking_mask,
        "thinking_latents": generation_output.thinking_latents,
        "thinking_hidden": generation_output.thinking_hidden,
    }


def replay_logprobs(model, sequences, prompt_attention_mask, thinking: dict | None,
                    eos_token_id: int | None, temperature: float = 1.0):
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
