"""--loss_temperature: the temperature of every log-prob the loss scores (the current policy's,
the old policy's, the reference's). By default the sampling temperature (the policy that sampled
the rollouts); 1.0 is HRPO's code (sampling at 0.5, scoring the untempered logits).

One real training step (a tiny model, float32, CPU) through hrpo.run on both backends
(transformers; unsloth, here in its CPU mode with TRL's own trainer): every scoring call the
trainer makes is compared with a hand computation from the model's own logits,
log_softmax(logits / T)[token], at the expected T, and is far from the other temperature's. With
a loss temperature other than the sampling one, the on-policy check still compares the replay
with the sampling-time log-probs at the sampling temperature (the loss's own log-probs are far
from those).
"""
import math
import types

import pytest
import torch

from hrpo import run as hrpo_run
from hrpo.config import loss_temperature, refuse_unsupported_loss_temperature
from hrpo.trainer import HRPOTrainer
from testing.training import length_reward, save_training_workspace, tiny_training_args

SAMPLING = 0.5
TOL = 1e-5  # float32: the fused head's log-probs and the model's logits, same forward, same inputs
APART = 1e-2  # the two temperatures' log-probs on this tiny model (the negative control), measured ~0.1-1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_training_workspace(tmp_path_factory.mktemp("loss-temperature"))


def scored_step(workspace, out, backend: str, *flags: str):
    """One optimizer step; every call of the trainer's scoring function, with the model's own logits
    for the same inputs (same forward hooks: the hybrid replay's thinking inputs, adapters as set)."""
    settings = tiny_training_args(workspace, out, "--backend", backend, "--temperature", str(SAMPLING),
                                  "--beta", "0.04", "--num_iterations", "2", *flags)  # 2 iterations: old log-probs
    trainer = hrpo_run.build_trainer(settings, reward_funcs=[length_reward])
    score, calls = trainer._get_per_token_logps_and_entropies, []

    def spy(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        result = score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        inputs = getattr(trainer, "_loss_inputs", None) or {}
        calls.append({"logps": result[0].detach().float(), "logits": logits[:, -logits_to_keep - 1:-1].float(),
                      "tokens": input_ids[:, -logits_to_keep:], "mask": attention_mask[:, -logits_to_keep:].bool(),
                      "loss": torch.is_grad_enabled(), "reference": HRPOTrainer._is_reference_pass(trainer),
                      "sampled": inputs.get("sampled_token_logprobs"), "completion": inputs.get("completion_mask")})
        return result

    trainer._get_per_token_logps_and_entropies = spy
    trainer.train()
    return trainer, calls


def by_hand(call, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(call["logits"] / temperature, dim=-1)
    return logp.gather(-1, call["tokens"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("backend, loss_t, hybrid", [
    ("transformers", None, "on"), ("transformers", 1.0, "on"), ("unsloth", None, "on"), ("unsloth", 1.0, "on"),
    ("transformers", 1.0, "off")])
def test_every_log_prob_the_loss_scores_is_at_the_loss_temperature(workspace, tmp_path, backend, loss_t, hybrid):
    flags = ["--hybrid_thinking", hybrid] + ([] if hybrid == "off" else ["--thinking_latent_source", "projection"])
    flags += [] if loss_t is None else ["--loss_temperature", str(loss_t)]
    trainer, calls = scored_step(workspace, tmp_path / "out", backend, *flags)
    expected = SAMPLING if loss_t is None else loss_t
    other = 1.0 if loss_t is None else SAMPLING
    kinds = {("loss" if c["loss"] else "reference" if c["reference"] else "old") for c in calls}
    assert kinds == {"loss", "old", "reference"}, kinds
    for call in calls:
        mask = call["mask"]
        gap = (call["logps"] - by_hand(call, expected))[mask].abs().max().item()
        apart = (call["logps"] - by_hand(call, other))[mask].abs().max().item()
        kind = "loss" if call["loss"] else "reference" if call["reference"] else "old policy"
        print(f"[{backend}, loss T {expected}] {kind}: max |fused head - "
              f"log_softmax(logits/{expected})| {gap:.1e}; at T={other} {apart:.2f}")
        assert gap <= TOL
        assert apart >= APART  # negative control: the check tells the temperatures apart
    if hybrid == "on":
        # the on-policy check compared like with like: the replay at the sampling temperature
        assert len(trainer.replay_logprob_diffs) == 2 and max(trainer.replay_logprob_diffs) <= 1e-4
        loss_calls = [c for c in calls if c["loss"]]
        scored_against_sampled = max((c["logps"] - c["sampled"]).abs()[c["completion"].bool()].max().item()
                                     for c in loss_calls)
        if loss_t is None:
            assert scored_against_sampled <= 1e-4
        else:  # the loss's own log-probs are not the sampling ones: comparing those would stop the run
            assert scored_against_sampled >= APART


def test_the_loss_temperature_defaults_to_the_sampling_one_and_must_be_positive():
    args = types.SimpleNamespace(temperature=0.7, loss_temperature=None, use_vllm=False)
    assert loss_temperature(args) == 0.7
    assert loss_temperature(types.SimpleNamespace(temperature=0.7, loss_temperature=1.0)) == 1.0
    for bad in (0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match=f"--loss_temperature {bad}: expected a value > 0"):
            loss_temperature(types.SimpleNamespace(temperature=0.7, loss_temperature=bad))


def test_a_path_that_would_not_honour_it_refuses_it_by_name():
    other = types.SimpleNamespace(temperature=0.5, loss_temperature=1.0, use_vllm=False)
    with pytest.raises(ValueError, match=r"--loss_temperature 1.0 \(--temperature 0.5\): unsloth's GRPO rewrite.*"
                                         r"--backend transformers"):
        refuse_unsupported_loss_temperature(other, unsloth_rewrite=True)
    with pytest.raises(ValueError, match=r"--loss_temperature 1.0 .*--use_vllm"):
        refuse_unsupported_loss_temperature(types.SimpleNamespace(**{**vars(other), "use_vllm": True}), False)
    # the default, or a loss temperature equal to the sampling one, is what every path does
    refuse_unsupported_loss_temperature(types.SimpleNamespace(**{**vars(other), "loss_temperature": None}), True)
    refuse_unsupported_loss_temperature(types.SimpleNamespace(**{**vars(other), "loss_temperature": 0.5}), True)
