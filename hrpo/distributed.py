"""Helpers for several processes: a ZeRO-3 model's whole parameters for a forward outside the
engine, a parameter's whole value on every rank (FSDP2 DTensor or ZeRO-3 partition), and the
end of a multi-process run. (FSDP2's float32 thinking unit: ``hrpo.sharding``.)"""
from __future__ import annotations

import contextlib

import torch


def gathered_parameters(model):
    """A context in which a model sharded by DeepSpeed ZeRO-3 (built under ``zero.Init``, before
    the engine exists) holds its whole parameters, for a forward outside the engine; any other
    model as it is. A collective: every rank enters it at the same point."""
    parameters = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not parameters:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    parameters = [p for p in parameters if p.ds_status != ZeroParamStatus.AVAILABLE]

    return deepspeed.zero.GatheredParameters(parameters)


def full_tensor(param) -> torch.Tensor:
    """A parameter's whole value on every rank, for metrics: an FSDP2 shard is a DTensor, a
    DeepSpeed ZeRO-3 parameter a partition (gathered here: a collective, so every rank calls
    this for the same parameters in the same order, as the metrics do)."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach()
    if hasattr(param, "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if param.ds_status == ZeroParamStatus.AVAILABLE:  # already gathered (TRL's generation context)
            return param.detach().clone()
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def close_process_group() -> None:
    """After a multi-process run: every rank past a barrier, then the process group torn down,
    so that no rank exits while a peer still talks to it (an abort at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
