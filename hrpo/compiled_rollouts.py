"""--compile_rollouts: rollouts through transformers' compiled decoding step.

generate() runs its decoding steps through a compiled forward (``torch.compile``; with
CUDA graphs on a GPU, upstream's default ``mode="reduce-overhead"``) when the KV cache is
static; the fork's hybrid sampling loop does the same under the same criteria. A static
cache is as long as the prompt plus ``max_new_tokens``, so a new prompt length is a new
graph: the prompts of every rollout batch are left-padded to ``--max_prompt_length`` (the
data is filtered to fit it) and the padding is cut from what generate() returns. Padding
is not attended, positions come from the attention mask and rollouts are found by their
attended tokens (``hrpo.replay.ReplayIndex``), so nothing downstream sees it.
"""
from __future__ import annotations

import contextlib

import torch

from .sampling import generate_replaced


def compile_rollouts(generation_config, on_cuda: bool) -> None:
    """Set TRL's generation config (which turns compilation off) to sample compiled."""
    from transformers import CompileConfig

    generation_config.cache_implementation = "static"
    generation_config.disable_compile = False
    compile_config = CompileConfig()  # upstream's defaults: inductor, reduce-overhead (CUDA graphs)
    if not on_cuda:
        compile_config._compile_all_devices = True  # upstream compiles on accelerators only; asked for, here too
    generation_config.compile_config = compile_config


def pad_prompts_left(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int,
                     pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts left-padded to ``length`` tokens: (input_ids, attention_mask, columns added)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask, 0
    pad = input_ids.new_full((input_ids.shape[0], extra), pad_token_id)
    return (torch.cat([pad, input_ids], dim=1),
            torch.cat([attention_mask.new_zeros((input_ids.shape[0], extra)), attention_mask], dim=1), extra)


def drop_left_columns(output, columns: int, total: int):
    """generate()'s result without its first ``columns`` positions: a tensor of sequences, or
    an output object whose per-position fields (length ``total``) are all cut alike."""
    if columns == 0:
        return output
    if isinstance(output, torch.Tensor):
        return output[:, columns:]
    for name, value in vars(output).items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == total:
            setattr(output, name, value[:, columns:])
    return output


@contextlib.contextmanager
def fixed_length_prompts(model, length: int, pad_token_id: int):
    """For the duration, ``model.generate`` left-pads its prompts to ``length`` and cuts the
    padding from its result."""
    original = model.generate

    def generate(*args, **kwargs):
        if args:  # generate(input_ids, ...)
            kwargs["input_ids"], args = args[0], args[1:]
        input_ids, attention_mask, extra = pad_prompts_left(kwargs["input_ids"], kwargs.get("attention_mask"),
                                                            length, pad_token_id)
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
        output = original(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return drop_left_columns(output, extra, sequences.shape[1])

    with generate_replaced(model, generate):
        yield
