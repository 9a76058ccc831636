"""One rank of the FSDP2 mixed-precision check (tests/test_sharded_precision.py), run by torch.distributed.run:

    python -m torch.distributed.run --nproc_per_node 2 -m testing.fsdp2_precision WORKSPACE OUT_DIR \
        [SOURCE [SCALE]]

The model as a training run builds it (``hrpo.loading.load_model``, --backend transformers,
bf16 weights as on CUDA: LoRA, the thinking copies in float32; latent source SOURCE, default
embedding_plus_projection, whose sampling reads the embedding matrix between forwards, and
latent scale SCALE, default unit; "projection embedding" reads it inside the forward), sharded
as a trainer under ``accelerate launch --config_file configs/fsdp.yaml`` shards it:
``HRPOTrainer``'s step (``hrpo.sharding.keep_thinking_modules_float32``), then
accelerate's own ``fsdp2_prepare_model`` with that config's FSDP2 plugin and its bf16 mixed
precision, then accelerate's mapping of the optimizer's parameters to their shards. accelerate
runs FSDP only on accelerators (on CPU it falls back to DDP), so the accelerator here is a
stand-in holding what those two functions read: the plugin, the mixed precision, the device.
The MixedPrecisionPolicy's cast happens in FSDP2's pre-forward on any device, over gloo too.

Each rank records what each thinking module's forward saw (``record_thinking_forward``): the
dtype and the first values of its parameters, before and after an AdamW step, and the float32
master values they should be. It also samples in hybrid mode with ``synced_gpus`` while its
peer's rows finish at another step (rank 0 after one token, rank 1 after 12): a rank
without thinking inputs must enter the same collectives as one with them; then rank 1 alone
applies a thinking module outside a forward, as the trainer's metrics do on ranks with thinking
positions.
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

LAMBDA_PROBE = (6.70, 9.03)  # bf16 rounds them to 6.6875 and 9.0 (its spacing is 0.0625 at 8-16)
MAX_NEW_TOKENS = 12
REPO = Path(__file__).resolve().parent.parent


def record_thinking_forward(model) -> tuple[dict, list]:
    """Forward pre-hooks on every trainable thinking module: per module (its name in ``model``),
    the dtype and first 4 values of each parameter the forward reads, as the last forward saw
    them. FSDP's own pre-forward runs before these hooks (it prepends its hook), so they see the
    all-gathered, cast parameters."""
    from hrpo.sharding import trainable_thinking_modules

    wanted = {id(m) for m in trainable_thinking_modules(model)}
    seen, handles = {}, []
    for name, module in model.named_modules():
        if id(module) not in wanted:
            continue

        def pre(module, args, name=name):
            seen[name] = {p_name: {"dtype": str(p.dtype).removeprefix("torch."),
                                   "first": [float(x) for x in p.detach().reshape(-1)[:4].float()]}
                          for p_name, p in module.named_parameters(recurse=False)}

        handles.append(module.register_forward_pre_hook(pre))
    return seen, handles


def fsdp_plugin_of(config_file: Path):
    """The FSDP plugin accelerate builds from an accelerate config (fsdp_config), and its mixed precision."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = load_config_from_file(str(config_file))
    fsdp = config.fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
                                       if "fsdp_transformer_layer_cls_to_wrap" in fsdp else None),
        state_dict_type=fsdp["fsdp_state_dict_type"], reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        cpu_offload=fsdp["fsdp_offload_params"], cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"])
    plugin.set_mixed_precision(config.mixed_precision)  # as AcceleratorState does
    return plugin, config.mixed_precision


def master_values(model, names: list[str]) -> dict:
    """The float32 master parameters of the recorded modules, whole (a full state dict, which
    FSDP2 makes from the shards): what the forward should see."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: {key.rsplit(".", 1)[-1]: {"dtype": str(value.dtype).removeprefix("torch."),
                                             "first": [float(x) for x in value.reshape(-1)[:4]]}
                   for key, value in state.items() if key.rsplit(".", 1)[0] == name}
            for name in names}


def main(workspace: Path, out: Path, source: str = "embedding_plus_projection", scale: str = "unit") -> None:
    import torch
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import (fsdp2_canonicalize_names, fsdp2_prepare_model,
                                             fsdp2_switch_optimizer_parameters)
    from torch.distributed.fsdp import register_fsdp_forward_method
    from transformers.hybrid_thinking.modeling import LAMBDA_MODULE

    from hrpo import loading
    from hrpo.settings_parser import parse_settings
    from hrpo.sharding import keep_thinking_modules_float32
    from testing.tiny import encode_prompts
    from testing.training import tiny_training_argv

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    settings = parse_settings(tiny_training_argv(workspace, out / "run", "--backend", "transformers",
                                                 "--thinking_latent_source", source, "--thinking_latent_scale", scale,
                                                 "--dtype", "bfloat16"))
    model, tokenizer = loading.load_model(settings, cuda=False)
    lambda_copy = next(m for n, m in model.named_modules() if n.endswith(f"{LAMBDA_MODULE}.modules_to_save.default"))
    with torch.no_grad():
        lambda_copy.Lambda[:2] = torch.tensor(LAMBDA_PROBE)
    plugin, mixed_precision = fsdp_plugin_of(REPO / "configs" / "fsdp.yaml")
    accelerator = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision=mixed_precision,
                                  device=torch.device("cpu"), is_main_process=rank == 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    # what the trainer and then accelerate's _prepare_fsdp2 do
    keep_thinking_modules_float32(accelerator, model, optimizer)
    old = fsdp2_canonicalize_names({n: (p._local_tensor if hasattr(p, "_local_tensor") else p).data_ptr()
                                    for n, p in model.named_parameters()})
    model = fsdp2_prepare_model(accelerator, model)
    new = fsdp2_canonicalize_names(dict(model.named_parameters()))
    for group in optimizer.param_groups:  # accelerate swaps each for a placeholder that keeps its data_ptr
        group["params"] = [SimpleNamespace(data_ptr=(p._local_tensor if hasattr(p, "_local_tensor") else p).data_ptr())
                           for p in group["params"]]
    fsdp2_switch_optimizer_parameters(optimizer, {ptr: new[n] for n, ptr in old.items()})
    register_fsdp_forward_method(model, "generate")  # as the trainer does after prepare
    seen, _ = record_thinking_forward(model)
    layer_dtype = {}
    q_proj = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
    q_proj.register_forward_pre_hook(lambda m, a: layer_dtype.update(q_proj=str(m.weight.dtype).removeprefix("torch.")))

    # sampling with synced_gpus: rank 0's rows end after one token, rank 1's run to the end
    questions = [["1+2=?", "ab"], ["3+4=?", "cd"]][rank]
    enc = encode_prompts(tokenizer, questions)
    eos = tokenizer.eos_token_id
    torch.manual_seed(1234 + rank)
    with torch.no_grad():
        rollout = model.generate(**enc, processing_class=tokenizer, return_thinking_embeds=True, do_sample=True,
                                 temperature=0.7, top_k=0, max_new_tokens=MAX_NEW_TOKENS, synced_gpus=True,
                                 sequence_bias={(eos,): 50.0 if rank == 0 else -50.0},
                                 return_dict_in_generate=True)
    completion_length = rollout.sequences.shape[1] - enc.input_ids.shape[1]
    # the trainer's metrics apply the thinking modules outside a forward, on ranks with thinking
    # positions only: here rank 1 alone (a gather of its own would wait for rank 0 in vain); a gate,
    # which every source has
    if rank == 1:
        with torch.no_grad():
            base = model.get_base_model().model
            base.thinking_residual_gate_r(torch.ones(1, base.config.hidden_size))
    dist.barrier()  # rank 0's next collective: a gather entered by rank 1 alone would meet this

    # a replay-shaped forward on every rank (thinking positions), a loss, a backward and a step
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 30, (2, 10), generator=generator)
    d = model.get_base_model().config.hidden_size
    thinking = {"thinking_mask": torch.arange(10).expand(2, 10) >= 5,
                "thinking_hidden": torch.randn(2, 10, d, generator=generator),
                "thinking_latents": torch.randn(2, 10, d, generator=generator)}

    def forward():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **thinking).logits

    model.train()
    logits = forward()
    names = sorted(seen)
    before = {"seen": json.loads(json.dumps(seen)), "master": master_values(model, names)}
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        forward()
    after = {"seen": json.loads(json.dumps(seen)), "master": master_values(model, names)}
    result = {"rank": rank, "world": dist.get_world_size(), "mixed_precision": mixed_precision, "source": source,
              "scale": scale,
              "completion_length": completion_length, "modules": names, "layer_dtype": layer_dtype.get("q_proj"),
              "lambda_module": next(n for n in names if LAMBDA_MODULE in n), "before": before, "after": after}
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
