"""A CPU stand-in for CUDA-graph replay of the compiled decoding step.

Under ``torch.compile(mode="reduce-overhead")`` a decoding step is a CUDA graph replay: every
call writes its outputs into the same device memory and returns tensors over it, so an output
of step n that is still referenced at step n + 1 now holds step n + 1's values. Upstream's
``_sample`` copies its logits for that reason. ``static_output_forward`` gives a model's forward
that behavior on any device, without compiling anything: each call runs the eager forward, copies
every output tensor into buffers allocated at the first call, and returns those buffers.
"""
from __future__ import annotations

import contextlib

import torch


def _into(buffers: dict, key, value):
    """``value`` copied into the buffer kept under ``key`` (tuples element-wise); other values as they are."""
    if isinstance(value, torch.Tensor):
        buffer = buffers.get(key)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = buffers[key] = torch.empty_like(value)
        buffer.copy_(value)
        return buffer
    if isinstance(value, tuple):
        return tuple(_into(buffers, (key, i), v) for i, v in enumerate(value))
    return value


def static_output_forward(forward):
    """``forward`` whose every call returns its tensors in the same storage (see the module docstring)."""
    buffers: dict = {}

    def replay(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        for key in list(outputs.keys()):
            outputs[key] = _into(buffers, key, outputs[key])
        return outputs

    replay.buffers = buffers
    return replay


@contextlib.contextmanager
def decoding_steps_replayed_from_static_outputs(model):
    """While active, ``model.get_compiled_call`` (what generate() uses for the decoding steps when
    its compile criteria hold) returns the eager forward with static outputs. The prefill stays
    eager, as upstream's is. Yields the buffers (filled once a decoding step has run)."""
    forward = static_output_forward(model.__call__)
    model.get_compiled_call = lambda compile_config=None: forward
    try:
        yield forward.buffers
    finally:
        del model.get_compiled_call
