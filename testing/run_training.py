"""hrpo.train's command line, for tests that run training in child processes (kill,
resume, several processes):

    python -m testing.run_training [--kill-in-save STEP] [--step-delay S] [--record DIR] -- <training flags>

- The reward is the completion length (it varies inside every group, so every step has a
  gradient; the tiny model never writes a right answer).
- --kill-in-save STEP: SIGKILL this process in the middle of saving checkpoint-STEP (after
  the adapter, optimizer and scheduler are written, before the RNG states, the trainer state
  and the completion marker).
- --step-delay S: sleep S seconds at each step's start (so that a kill from outside lands
  inside training).
- --record DIR: per rank and optimizer step, write the prompts it sampled, its on-policy
  figures, its trainable parameters (after the step) and their gradients (before it), and
  every generation's hybrid output, and the dtype and first values of each thinking module's
  parameters as the step's last forward read them, to DIR (torch files).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from testing.training import length_reward


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def recorder(trainer, folder: Path):
    """A callback that writes what the multi-process test compares (see the module docstring)."""
    import torch
    from transformers import TrainerCallback

    folder.mkdir(parents=True, exist_ok=True)
    seen = {"prompts": [], "generations": [], "grads": None}
    generate_add = trainer.replay_index.add

    def add(out, prompt_mask, **kwargs):  # every hybrid generation this rank made, with its prompts
        seen["generations"].append({key: (value.detach().clone() if isinstance(value, torch.Tensor) else value)
                                    for key, value in vars(out).items() if not key.startswith("_")}
                                   | {"prompt_mask": prompt_mask.detach().clone()})
        return generate_add(out, prompt_mask, **kwargs)

    trainer.replay_index.add = add
    score = trainer._generate_and_score_completions

    def generate_and_score(inputs):
        seen["prompts"].extend(str(x["prompt"]) for x in inputs)
        return score(inputs)

    trainer._generate_and_score_completions = generate_and_score

    from hrpo.distributed import full_tensor
    from testing.fsdp2_precision import record_thinking_forward

    thinking_forward, _ = record_thinking_forward(trainer.model)  # what the last forward of a step read

    def trainable():
        return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["grads"] = {n: p.grad.detach().cpu().clone() for n, p in trainable().items()
                             if p.grad is not None}  # DDP; ZeRO and FSDP keep their own

        def on_step_end(self, args, state, control, **kwargs):
            torch.save({"prompts": seen["prompts"], "generations": seen["generations"], "grads": seen["grads"],
                        "params": {n: full_tensor(p).cpu().clone() for n, p in trainable().items()},
                        "replay_logprob_diffs": list(trainer.replay_logprob_diffs),
                        "thinking_forward": json.loads(json.dumps(thinking_forward)),
                        "world_size": args.world_size, "wrapper": type(trainer.model_wrapped).__name__,
                        "distributed_type": str(trainer.accelerator.distributed_type),
                        "param_types": sorted({type(p).__name__ for p in trainable().values()})},
                       folder / f"rank{rank()}-step{state.global_step}.pt")
            seen["prompts"], seen["generations"], seen["grads"] = [], [], None
            trainer.replay_logprob_diffs.clear()

        def on_train_end(self, args, state, control, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model).eval()
            with torch.no_grad(), trainer.accelerator.autocast():
                probe = logit_probe(model)
            torch.save(probe, folder / f"rank{rank()}-logits.pt")

    return Record()


def logit_probe(model, seed: int = 0):
    """Inputs with thinking positions, and the model's logits on them: a trained model's
    output, to compare with its checkpoint loaded elsewhere."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = model.get_base_model().config.hidden_size if hasattr(model, "get_base_model") else model.config.hidden_size
    input_ids = torch.randint(3, 30, (2, 12), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "thinking_mask": torch.arange(12).expand(2, 12) >= 6,
              "thinking_hidden": torch.randn(2, 12, hidden, generator=generator),
              "thinking_latents": torch.randn(2, 12, hidden, generator=generator)}  # every source has its input
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.detach().float().cpu()
    return {"inputs": inputs, "logits": logits}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--record", type=Path, default=None)
    ours, rest = parser.parse_known_args()
    flags = rest[1:] if rest[:1] == ["--"] else rest

    from hrpo import run as hrpo_run, train

    build = hrpo_run.build_trainer

    def build_trainer(settings, reward_funcs=None):
        from transformers import Trainer, TrainerCallback

        trainer = build(settings, reward_funcs=[length_reward])
        if ours.kill_in_save is not None:
            save_rng = Trainer._save_rng_state

            def killing_save_rng_state(self, output_dir):
                if self.state.global_step == ours.kill_in_save:
                    print(f"[run_training] SIGKILL in the save of checkpoint-{self.state.global_step}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                return save_rng(self, output_dir)

            Trainer._save_rng_state = killing_save_rng_state
        if ours.step_delay:
            class Delay(TrainerCallback):
                def on_step_begin(self, args, state, control, **kwargs):
                    time.sleep(ours.step_delay)

            trainer.add_callback(Delay())
        if ours.record is not None:
            trainer.add_callback(recorder(trainer, ours.record))
        return trainer

    hrpo_run.build_trainer = build_trainer
    return train.main(flags)


if __name__ == "__main__":
    sys.exit(main())
