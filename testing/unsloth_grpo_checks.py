"""Subprocess entry: one HRPO step through unsloth's GRPO rewrite (PatchFastRL) on the CPU.

    python -m testing.unsloth_grpo_checks <arch> <latent variant> <packing 0|1> <out.json>

(a latent variant: a source, optionally with top-k and noise, testing/variants.py)

Importing unsloth's GPU model code (testing/unsloth_cpu.py) runs PatchFastRL, which replaces
trl.GRPOTrainer by the generated UnslothGRPOTrainer; the trainer is put on it as the unsloth
backend does on CUDA (``hrpo.trainer.trainer_class`` with that base). Its loss (grpo_accumulated_loss) makes its own forwards over left-packed,
sequence-packed (or padded) chunks of the rollouts. A forward hook on the base model
records every forward: whether it got thinking inputs, whether it was the reference pass,
and for policy forwards the log-probs of the completion tokens computed from its output
hidden states, compared with the log-probs recorded while sampling (on-policy: equal).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(arch: str, source: str, packing: str, out_path: str) -> None:
    os.environ["UNSLOTH_GRPO_SEQ_PACKING"] = packing
    os.environ["UNSLOTH_GRPO_PREFIX_GROUPER"] = "0"  # as hrpo.backend.import_unsloth sets it
    import torch
    from testing import unsloth_cpu

    unsloth_cpu.install()
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.hybrid_thinking.modeling import THINKING_MODULES

    from hrpo.tasks import get_task
    from hrpo.tasks.arith import make_problems
    from hrpo.trainer import trainer_class
    from testing.tiny import PLAIN_CHAT_TEMPLATE, tiny_model, tiny_tokenizer
    from testing.training import length_reward, module_of
    from testing.variants import latent_variant

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    model = tiny_model(arch, tokenizer, hidden_size=64, **latent_variant(source))
    never_generates_pad(model, tokenizer.pad_token_id)
    unsloth_cpu.prepare_like_from_pretrained(model, tokenizer)
    model = unsloth_cpu.peft_like_get_peft_model(model, THINKING_MODULES)
    dataset = get_task("arith").with_prompts(Dataset.from_list(make_problems(8, difficulty=3)))
    temperature = 0.7

    config = trl.GRPOConfig(
        output_dir=str(Path(out_path).parent / "run"), learning_rate=1e-2, beta=0.04, num_generations=4,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=10, max_steps=1,
        temperature=temperature, top_k=0, top_p=1.0, use_cpu=True, report_to="none", logging_steps=1,
        remove_unused_columns=False, save_strategy="no", lr_scheduler_type="constant", warmup_steps=0)
    trainer = trainer_class(True, trl.GRPOTrainer)(
        model=model, processing_class=tokenizer, reward_funcs=[length_reward], args=config,
                          train_dataset=dataset)
    # unsloth's loss scores under autocast (fp16 for a float32 model where it finds no bf16, as on
    # this CPU), which puts ~1e-4 between scoring and sampling on this tiny model. Its latch, set
    # off here, keeps the scoring in float32 so the comparison can be tight.
    trainer._autocast_enabled, trainer._autocast_dtype = False, torch.float32

    forwards = []
    inside = []

    def spy(module, args, kwargs, output):
        if inside:  # the negative control's own forward
            return
        input_ids = kwargs.get("input_ids")
        entry = {"grad": torch.is_grad_enabled(), "thinking": kwargs.get("thinking_mask") is not None,
                 "reference": trainer._is_reference_pass(), "shape": list(input_ids.shape),
                 "packed": kwargs.get("packed_seq_lengths") is not None}
        if entry["thinking"] and not entry["reference"]:
            with torch.no_grad():
                entry.update(replay_against_sampling(trainer, kwargs, output, temperature))
                inside.append(True)
                try:  # negative control: the same forward on the discrete tokens
                    plain = module(**{**kwargs, "thinking_mask": torch.zeros_like(kwargs["thinking_mask"])})
                finally:
                    inside.clear()
                entry["discrete_max_diff"] = replay_against_sampling(trainer, kwargs, plain, temperature)["max_diff"]
        forwards.append(entry)

    grads = {}

    class GradientNorms(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for name, p in trainer.model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    key = module_of(name)
                    grads[key] = grads.get(key, 0.0) + p.grad.float().norm().item()

    trainer.add_callback(GradientNorms())
    trainer.thinking_base.register_forward_hook(spy, with_kwargs=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = sorted({module_of(n) for n in before if not torch.equal(before[n], after[n])})
    result = {
        "mro": [c.__name__ for c in type(trainer).__mro__],
        "forwards": forwards,
        "changed": changed,
        "grad_norms": grads,
        "logged": trainer.state.log_history[0],
    }
    Path(out_path).write_text(json.dumps(result, indent=1))


def never_generates_pad(model, pad_token_id: int) -> None:
    """A real model does not sample its dedicated pad token; a tiny random one does (about 1 in
    V), and unsloth's left packing would then drop it from the rollout, which the replay refuses.
    A head bias of -1e4 on the pad id makes this model like a real one."""
    import torch

    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    bias = torch.zeros(head.out_features, dtype=head.weight.dtype)
    bias[pad_token_id] = -1e4
    biased.bias = torch.nn.Parameter(bias, requires_grad=False)
    model.lm_head = biased


def replay_against_sampling(trainer, kwargs, output, temperature: float) -> dict:
    """Log-probs of the completion tokens from this forward's final hidden states, against
    the sampling-time ones of the same tokens."""
    import torch

    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    lengths = kwargs.get("packed_seq_lengths")
    recorded = trainer.replay_index.lookup(input_ids, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2
                                           else None, lengths)
    sampled = recorded["sampled_token_logprobs"]
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    logits = head(output.last_hidden_state.to(head.weight.dtype)).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    # the token at position q is scored by the output at q - 1, within its own sequence
    scored = torch.zeros_like(sampled)
    scored[:, 1:] = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    # a rollout that lost pad-id tokens to unsloth's left packing is refused by the lookup
    completion = sampled != 0
    if lengths is not None:  # a sequence's first token is not scored by the previous sequence
        starts = torch.cumsum(torch.as_tensor(lengths), 0)[:-1]
        completion[0, starts] = False
    diff = (scored - sampled).abs()[completion]
    return {"compared": int(completion.sum()), "max_diff": diff.max().item() if diff.numel() else None}


if __name__ == "__main__":
    main(*sys.argv[1:5])
