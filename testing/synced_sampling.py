"""One rank of the synced-stepping check (tests/test_multiprocess.py), run by torch.distributed.run:

    python -m torch.distributed.run --nproc_per_node 2 -m testing.synced_sampling OUT_DIR

Under ZeRO-3 and FSDP the parameters are sharded, so a forward is a collective: transformers'
generate() then runs with synced_gpus, and a rank whose rows are all finished keeps making
forwards until every rank is done. Here rank 0's rows all stop after a few tokens (its EOS is
boosted) while rank 1's run to max_new_tokens. Each rank records its forwards and which
thinking modules each forward ran, and compares its synced output with the same generation
made alone (no synced_gpus, same seed): the extra forwards must change nothing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MAX_NEW_TOKENS = 12


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from testing.tiny import encode_prompts, tiny_model, tiny_tokenizer
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer, thinking_latent_source="projection")  # same weights on every rank
    questions = [["1+2=?", "ab"], ["3+4=?", "cd"]][rank]
    inputs = encode_prompts(tokenizer, questions)
    eos = tokenizer.eos_token_id
    bias = {(eos,): 50.0} if rank == 0 else {(eos,): -50.0}  # rank 0 stops at once, rank 1 never does

    forwards, called = [], []
    base = model.model

    def count(module, args, kwargs):
        forwards.append(kwargs.get("input_ids", args[0] if args else None).shape[1])
        called.append(set())

    hooks = [base.register_forward_pre_hook(count, with_kwargs=True)]
    for name in THINKING_MODULES:
        hooks.append(getattr(base, name).register_forward_pre_hook(
            lambda module, args, name=name: called[-1].add(name) if called else None))

    def generate(synced: bool):
        torch.manual_seed(1234 + rank)
        return model.generate(**inputs, processing_class=tokenizer, return_thinking_embeds=True, do_sample=True,
                              temperature=0.7, top_k=0, max_new_tokens=MAX_NEW_TOKENS, sequence_bias=bias,
                              synced_gpus=synced)

    with torch.no_grad():
        synced = generate(True)
        synced_forwards, synced_called = list(forwards), [sorted(c) for c in called]
        forwards.clear(), called.clear()
        alone = generate(False)
    for hook in hooks:
        hook.remove()
    same = all(torch.equal(getattr(synced, key), getattr(alone, key)) for key in ("sequences", "thinking_mask")) \
        and all(torch.allclose(getattr(synced, key), getattr(alone, key), rtol=0, atol=1e-6)
                for key in ("thinking_hidden", "sampled_token_logprobs"))
    completion = synced.sequences[:, inputs.input_ids.shape[1]:]
    result = {"rank": rank, "world": world, "forwards_synced": len(synced_forwards),
              "forwards_alone": len(forwards), "completion_length": completion.shape[1],
              "synced_equals_alone": same, "thinking_modules_per_forward": synced_called}
    result["full_tensor_of_a_shard"] = sharded_metric_check(model, world)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def sharded_metric_check(model, world: int) -> bool:
    """The trainer's metrics read the projection whole (hrpo.distributed.full_tensor) also when
    FSDP2 has sharded it into a DTensor."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hrpo.distributed import full_tensor

    weight = model.model.thinking_projection.weight.detach()
    shard = torch.nn.Parameter(distribute_tensor(weight, init_device_mesh("cpu", (world,)), [Shard(0)]))
    assert shard.to_local().shape[0] == weight.shape[0] // world
    return bool(torch.equal(full_tensor(shard), weight))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
