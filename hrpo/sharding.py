"""FSDP2 and the thinking modules: float32 in the forward under bf16 mixed precision.

accelerate's FSDP2 path (``fsdp2_prepare_model``) shards a model with one
``MixedPrecisionPolicy``: with ``mixed_precision: bf16`` (configs/fsdp.yaml) every parameter
is all-gathered and cast to bf16 for the forward. The thinking modules (the gates, Lambda
and the projection) are held by the root unit, so their forward saw bf16 values: Lambda
6.70 as 6.6875, and an update of 9.0 by +0.03 not at all (bf16's spacing is 0.0625 there).
The design keeps them float32 in every backend (docs/design.md).

``shard_thinking_modules`` shards the trainable thinking modules before accelerate shards the
rest, as one FSDP2 unit of their own with a float32 policy: all-gathered, computed with and
reduced in float32. accelerate leaves a module that is already an ``FSDPModule`` alone and
shards the decoder layers and the root around it. The trainer calls it when it prepares the
model (``HRPOTrainer._prepare_for_training``, through ``keep_thinking_modules_float32``), before
the optimizer's parameters are mapped to their shards.

A unit of their own is also a collective of their own, and the thinking modules do not run
in every forward of every rank: under ``synced_gpus`` a rank whose rows are finished keeps
making forwards without thinking inputs (no thinking module runs) while its peers make
forwards with them. A per-module all-gather would then be entered by some ranks only. So
the unit is gathered before every forward of the model that holds it (the base model, which
every rank runs in every forward; a no-op while it is whole), whether the forward calls the
thinking modules or not, and released after a forward with gradients: it stays whole through
generation and scoring (as the root unit did), so that code outside a forward, on some ranks
only (the trainer's metrics), reads it without a collective.

accelerate also makes the input embedding a unit that reshards after its forward, while hybrid
thinking reads the embedding matrix outside that forward (the embedding-method latent between
decoding steps, the embedding latent scale): ``shard_input_embeddings_whole_after_forward``
makes it first, as a unit that stays whole after its forward, as the root unit does.

DeepSpeed's bf16 (and fp16) mode casts every parameter, the thinking modules included, and
has no setting that keeps a parameter in float32; ``keep_thinking_modules_float32`` warns,
naming what that does (measured in docs/scaling.md, "Mixed precision").
"""
from __future__ import annotations

import torch
from torch import nn

FLOAT32 = torch.float32


def thinking_module_types() -> tuple[type, ...]:
    from transformers.hybrid_thinking.modeling import ThinkingGate, ThinkingProjection, ThinkingResidualLambda

    return ThinkingGate, ThinkingResidualLambda, ThinkingProjection


def trainable_thinking_modules(model: nn.Module) -> list[nn.Module]:
    """The thinking modules that train: with PEFT the adapters' trained copies
    (``modules_to_save``), not the frozen originals; without PEFT the modules themselves."""
    types = thinking_module_types()
    return [m for m in model.modules() if isinstance(m, types) and any(p.requires_grad for p in m.parameters())]


def thinking_bases(model: nn.Module) -> list[nn.Module]:
    """The base models (Qwen2Model, LlamaModel) that hold the thinking modules."""
    from transformers.hybrid_thinking.modeling import HybridThinkingMixin

    return [m for m in model.modules() if isinstance(m, HybridThinkingMixin) and m.has_thinking_modules]


def float32_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=FLOAT32, reduce_dtype=FLOAT32)


def shard_thinking_modules(model: nn.Module, *, mesh=None, offload_policy=None) -> list[nn.Module]:
    """``fully_shard`` the trainable thinking modules of ``model`` as one float32 unit (see the
    module docstring), before the rest of the model is sharded. Returns the modules sharded
    (none when already done, or when the model has no trainable thinking module)."""
    from torch.distributed.fsdp import FSDPModule, OffloadPolicy, fully_shard

    modules = [m for m in trainable_thinking_modules(model) if not isinstance(m, FSDPModule)]
    if not modules:
        return []
    for module in modules:
        module.to(FLOAT32)  # the master weights too: loading.py makes the copies float32 already
    # resharded by the hooks below, not after each module's own forward
    fully_shard(modules, mesh=mesh, reshard_after_forward=False, offload_policy=offload_policy or OffloadPolicy(),
                mp_policy=float32_policy())
    unit = modules[0]  # the modules of one fully_shard call share its state: one unshard gathers all

    def gather(module, args):
        unit.unshard()  # a no-op while it is whole

    def release(module, args, output):
        # after a forward with gradients (before its backward, which gathers again, and the step);
        # after generation and scoring (no gradients) it stays whole, so that code outside a forward
        # (the trainer's metrics) reads the modules without a collective of its own
        if torch.is_grad_enabled():
            unit.reshard()

    for base in thinking_bases(model):
        base.register_forward_pre_hook(gather)
        base.register_forward_hook(release, always_call=True)
    return modules


def shard_input_embeddings_whole_after_forward(model: nn.Module, *, mp_policy, mesh=None,
                                               offload_policy=None) -> nn.Module | None:
    """``fully_shard`` the input embedding as a unit that stays whole after its forward
    (``reshard_after_forward=False``, as the root unit does), before accelerate would make it a unit
    that reshards after its forward. Hybrid thinking reads the embedding matrix outside the
    embedding's own forward: generation forms the embedding-method latent between forwards, and
    ``--thinking_latent_scale embedding`` reads the mean row norm inside the base forward. From a
    resharded unit those reads got a DTensor shard ("got mixed torch.Tensor and DTensor"), or a
    collective entered on some ranks only. The matrix is frozen, so a whole copy is never stale.
    None when the embedding is tied to the head (accelerate then keeps it whole with the head)."""
    from torch.distributed.fsdp import FSDPModule, OffloadPolicy, fully_shard

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is None or isinstance(embed, FSDPModule) or getattr(head, "weight", None) is embed.weight:
        return None
    fully_shard(embed, mesh=mesh, reshard_after_forward=False, offload_policy=offload_policy or OffloadPolicy(),
                mp_policy=mp_policy)
    return embed


def accelerate_fsdp2_settings(accelerator) -> dict:
    """The mesh and offload that accelerate's ``fsdp2_prepare_model`` gives the units it makes."""
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return {"mesh": mesh, "offload_policy": plugin.cpu_offload}


def deepspeed_half_precision(accelerator) -> str | None:
    """"bf16" or "fp16" when DeepSpeed trains in that mode (its config, "auto" resolved by the
    trainer), else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    return next((k for k in ("bf16", "fp16") if str(config.get(k, {}).get("enabled", False)).lower() == "true"), None)


DEEPSPEED_HALF_WARNING = (
    "DeepSpeed's {mode} mode casts every parameter to {mode}, HRPO's thinking modules included: their "
    "float32 values are rounded when the engine is made, the fp32 master weights in DeepSpeed's optimizer "
    "keep every AdamW step, and the forward reads the master rounded to {mode} (Lambda, about 7-9, moves in "
    "the forward in jumps of 0.03-0.06, one per ~30-60 steps of 1e-3). DeepSpeed keeps no parameter in "
    "float32 in this mode (data_types.keep_in_fp32_modules keeps buffers only). docs/scaling.md, "
    "\"Mixed precision\", has the measurement; FSDP2 keeps the thinking modules float32")


def keep_thinking_modules_float32(accelerator, model: nn.Module, optimizer=None) -> list[nn.Module]:
    """Before ``accelerator.prepare``: under accelerate's FSDP2, shard the thinking modules as
    their own float32 unit, and the input embedding as a unit that stays whole after its
    forward (``shard_input_embeddings_whole_after_forward``); a no-op for DDP and a single
    process. An optimizer made before (the trainer makes its six groups first) is pointed at the
    sharded parameters, as accelerate then maps every parameter it holds to its shard. Under
    DeepSpeed in bf16 or fp16, which cannot keep them float32, a warning says so and what it
    does to them."""
    mode = deepspeed_half_precision(accelerator)
    if mode is not None and trainable_thinking_modules(model):
        import warnings

        warnings.warn(DEEPSPEED_HALF_WARNING.format(mode=mode), stacklevel=2)
    if not getattr(accelerator, "is_fsdp2", False):
        return []
    if getattr(accelerator.state.fsdp_plugin, "cpu_ram_efficient_loading", False):
        raise ValueError("FSDP2 with cpu_ram_efficient_loading (fsdp_cpu_ram_efficient_loading: true) is not "
                         "supported with HRPO's thinking modules, which are sharded as a float32 unit of their own "
                         "before accelerate's loading; set it to false (configs/fsdp.yaml)")
    before = dict(model.named_parameters())
    settings = accelerate_fsdp2_settings(accelerator)
    modules = shard_thinking_modules(model, **settings)
    if modules:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        shard_input_embeddings_whole_after_forward(
            model, mesh=settings["mesh"], offload_policy=settings["offload_policy"],
            mp_policy=accelerator.state.fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy())
    if modules and optimizer is not None:
        if optimizer.state:
            raise RuntimeError("the optimizer has state before the model is sharded: the thinking modules must be "
                               "sharded before the first step")
        after = dict(model.named_parameters())
        swap = {id(p): after[name] for name, p in before.items() if after[name] is not p}
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
    return modules
