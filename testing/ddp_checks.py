"""Two-process DDP (gloo, CPU) checks of the fork's models, run by tests/test_opt_in.py.

    python -m testing.ddp_checks OUT.json

Each rank trains, with DistributedDataParallel at its defaults (find_unused_parameters=False):

- ``plain``: a Llama built from a config without hybrid thinking (upstream's model), 3 steps;
- ``hybrid-<source>``: a Llama built for each latent source, gradient checkpointing on,
  3 steps of a replay-style forward with thinking inputs, where rank 1 has no thinking
  position at all in step 2 (the modules still take part, with a zero gradient).

After the steps both ranks must hold the same parameters. Each case writes "ok" or the
error into OUT.json (rank 0's view; a rank's failure is reported by that rank's entry).

The ranks meet through a file store (no port to race for, no store server thread in rank
0), and pass a barrier before they tear the process group down, so that neither closes its
connections while the other still uses them.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SOURCES = ("embedding", "projection", "embedding_plus_projection")
STEPS = 3


def tiny_llama(**thinking):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, tie_word_embeddings=False, **thinking)
    return LlamaForCausalLM(config).float().train()


def same_on_every_rank(model) -> bool:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    # each rank steps its own copy from the all-reduced gradients: equal up to rounding
    return all(torch.allclose(gathered[0], g, rtol=0, atol=1e-6) for g in gathered[1:])


def train(model, rank: int, hybrid: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)  # PyTorch's defaults: find_unused_parameters=False
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    d = model.config.hidden_size
    for step in range(STEPS):
        input_ids = torch.randint(2, model.config.vocab_size, (2, 8), generator=generator)
        kwargs = {}
        if hybrid:
            mask = torch.zeros(2, 8, dtype=torch.bool)
            if not (rank == 1 and step == 1):  # rank 1, step 2: no thinking position at all
                mask[:, 4:] = True
            kwargs = {"thinking_mask": mask, "thinking_latents": torch.randn(2, 8, d, generator=generator),
                      "thinking_hidden": torch.randn(2, 8, d, generator=generator)}
        loss = ddp(input_ids=input_ids, labels=input_ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def worker(rank: int, world: int, store_path: str, out: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective that its peer never joins fails after the timeout
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    cases = [("plain", {}, False)] + [(f"hybrid-{s}", {"thinking_latent_source": s}, True) for s in SOURCES]
    for name, thinking, hybrid in cases:
        try:
            model = tiny_llama(**thinking)
            if hybrid:
                model.gradient_checkpointing_enable()
            train(model, rank, hybrid)
            results[name] = "ok" if same_on_every_rank(model) else "the ranks' parameters differ"
        except Exception:  # noqa: BLE001 - reported, the other cases still run
            results[name] = traceback.format_exc(limit=3)[-1500:]
            break  # a failed collective leaves the process group unusable
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main(out: str) -> int:
    store = f"{out}.store"
    if os.path.exists(store):
        os.unlink(store)
    mp.spawn(worker, args=(2, store, out), nprocs=2, join=True)
    if os.path.exists(store):
        os.unlink(store)
    merged = {}
    for rank in (0, 1):
        with open(f"{out}.rank{rank}") as f:
            for name, result in json.load(f).items():
                if result != "ok" or name not in merged:
                    merged[name] = result if result == "ok" else f"rank {rank}: {result}"
        os.unlink(f"{out}.rank{rank}")
    with open(out, "w") as f:
        json.dump(merged, f, indent=2)
    print(json.dumps(merged, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
