"""One rank of the DeepSpeed bf16 precision measurement (scripts/sharded_cpu_checks.py --only ds_bf16), run by
torch.distributed.run with DeepSpeed's CPU accelerator:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 -m testing.deepspeed_precision \\
        WORKSPACE OUT_DIR STAGE [STEPS]

The model as a training run builds it (``hrpo.loading.load_model``, --backend transformers, bf16
weights as on CUDA, the projection source's thinking copies in float32), given to
``deepspeed.initialize`` with bf16 on and ZeRO stage STAGE (2 or 3), as ``configs/zero2.yaml`` /
``zero3.yaml`` with ``mixed_precision: bf16`` make it, and an AdamW whose thinking group has
lr 1e-3 without weight decay (the trainer's Lambda group at the same rate). Lambda[:2] starts
at 6.70 and 9.03. Every step: a forward with thinking positions, then a loss on Lambda alone
whose gradient is positive in every entry, DeepSpeed's backward and step. Each rank records, per step, the dtype and
the values of Lambda[:2] that the forward read and the float32 master values DeepSpeed's
optimizer holds (``safe_get_full_fp32_param``).
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

LAMBDA_START = (6.70, 9.03)
LR = 1e-3


def main(workspace: Path, out: Path, stage: str, steps: str = "40") -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers.hybrid_thinking.modeling import LAMBDA_MODULE

    from hrpo import loading
    from hrpo.settings_parser import parse_settings
    from hrpo.sharding import trainable_thinking_modules
    from testing.training import tiny_training_argv

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    settings = parse_settings(tiny_training_argv(workspace, out / "run", "--backend", "transformers",
                                                 "--thinking_latent_source", "projection", "--dtype", "bfloat16"))
    model, _ = loading.load_model(settings, cuda=False)
    lam = next(m for n, m in model.named_modules() if n.endswith(f"{LAMBDA_MODULE}.modules_to_save.default"))
    with torch.no_grad():
        lam.Lambda[:2] = torch.tensor(LAMBDA_START)
    before_engine = {"Lambda": str(lam.Lambda.dtype).removeprefix("torch."),
                     "thinking": sorted({str(p.dtype).removeprefix("torch.") for m in trainable_thinking_modules(model)
                                         for p in m.parameters()})}
    thinking = {id(p) for m in trainable_thinking_modules(model) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if id(p) in thinking], "weight_decay": 0.0},
                                   {"params": [p for p in trainable if id(p) not in thinking]}], lr=LR)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": int(stage)}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    seen = {}
    # registered after the engine's own hooks (ZeRO-3 gathers a module's parameters in its pre-forward)
    lam.register_forward_pre_hook(lambda m, a: seen.update(
        dtype=str(m.Lambda.dtype).removeprefix("torch."), first=[float(x) for x in m.Lambda.detach()[:2].float()]))

    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, 30, (2, 10), generator=generator)
    d = model.get_base_model().config.hidden_size
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "thinking_mask": torch.arange(10).expand(2, 10) >= 5,
              "thinking_hidden": torch.randn(2, 10, d, generator=generator),
              "thinking_latents": torch.randn(2, 10, d, generator=generator)}
    records = []
    for step in range(int(steps)):
        with torch.no_grad():
            engine(**inputs)  # the model's forward with thinking positions: the hook records what it read
        forward = dict(seen)
        # a loss on Lambda alone, the same on every rank: a = exp(-8 softplus(-Lambda)) rises with Lambda,
        # so AdamW lowers every entry by about lr per step
        engine.backward(lam(torch.ones(2, d)).float().sum())
        engine.step()
        master = safe_get_full_fp32_param(lam.Lambda)
        records.append({"step": step + 1, "seen_dtype": forward["dtype"], "seen": forward["first"],
                        "master": [float(x) for x in master[:2]]})
    after_engine = {"Lambda": str(lam.Lambda.dtype).removeprefix("torch.")}
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "stage": int(stage), "deepspeed": deepspeed.__version__, "before_engine": before_engine,
         "after_engine": after_engine, "steps": records}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
