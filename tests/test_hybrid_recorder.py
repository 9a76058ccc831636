"""The hybrid loop's recorder (``HybridRecorder``) on a scripted run, against output fields
written out by hand: rows that stop thinking and finish at different steps, zeros on the prompt
and on the last sampled position (never fed), the inputs a forward without a cache feeds, and
the copies of what a step's outputs hand over."""
import math
from types import SimpleNamespace

import torch
from transformers.hybrid_thinking.generation import HybridGenerateOutput, HybridRecorder

BATCH, PROMPT, D = 3, 2, 2
EMBED_DTYPE = torch.float16
F, T = False, True


def recorder(keep=True, every_position=False, latents=True, hidden=True, noise=True):
    return HybridRecorder.for_run(BATCH, PROMPT, "cpu", D, EMBED_DTYPE, latents=latents, hidden=hidden, noise=noise,
                                  keep=keep, every_position=every_position)


def step_inputs(step: int, mask: list[bool]) -> dict:
    """The thinking inputs of the token sampled at ``step``: values that tell row and step apart."""
    rows = torch.arange(BATCH, dtype=torch.float64)[:, None]
    return {"thinking_mask": torch.tensor(mask),
            "thinking_latents": (10 * step + rows + torch.tensor([0.5, 0.25])).to(EMBED_DTYPE),
            "thinking_hidden": -(10 * step + rows + torch.tensor([0.5, 0.75])),  # float64: its own dtype
            "thinking_noise": (100 * step + rows + torch.tensor([0.125, 0.375])).float()}


def outputs(gate: list[float], hidden: list[float]):
    return SimpleNamespace(thinking_gate_ratio=torch.tensor(gate)[:, None],
                           thinking_hidden_ratio=torch.tensor(hidden)[:, None])


# the sampling distribution of each step (rows), as log-probs after the logits processors, and the tokens
PROBS = [[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]],
         [[0.25, 0.5, 0.25], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],
         [[0.125, 0.375, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]
TOKENS = [[0, 2, 1], [1, 0, 0], [2, 0, 0]]  # row 2 finishes at step 1, row 1 at step 2 (then padding, token 0)
MASKS = [[T, T, F], [T, F, F]]  # row 1 is still thinking after step 1 and finished after step 2; row 2 never thinks
GATES = [([0.9, 0.8, 0.0], [0.4, 0.6, 0.0]), ([0.7, 0.0, 0.0], [0.7, 0.0, 0.0])]


def scripted_run(rec, kept_outputs=None, fed=None):
    """The calls the loop makes for three sampled tokens: step 1 samples, steps 2 and 3 feed the
    token sampled before them and sample; the last token is never fed."""
    for step in range(3):
        if step:
            if fed is not None:
                fed.append(rec.forward_inputs(PROMPT + step))
            out = outputs(*GATES[step - 1])
            rec.forwarded(out)
            if kept_outputs is not None:
                kept_outputs.append(out)
        scores = torch.tensor(PROBS[step]).log()
        rec.sampled(scores, torch.tensor(TOKENS[step]))
        if step < 2:
            inputs = step_inputs(step + 1, MASKS[step])
            rec.to_be_fed(inputs, torch.tensor([0.01, 0.02, 0.03]) * (step + 1))
    return rec


def by_hand(per_position, tail=(), dtype=torch.float32):
    """(batch, 5, *tail): zeros on the 2 prompt positions, then the completion's positions."""
    out = torch.zeros((BATCH, PROMPT + 3, *tail), dtype=dtype)
    for position, values in enumerate(per_position):
        out[:, PROMPT + position] = torch.as_tensor(values, dtype=dtype)
    return out


def test_recorded_fields_are_the_hand_written_ones():
    kept_outputs = []
    rec = scripted_run(recorder(), kept_outputs)
    for out in kept_outputs:  # a later step's outputs in the same storage (CUDA-graph replay) change nothing
        out.thinking_gate_ratio.fill_(-1)
        out.thinking_hidden_ratio.fill_(-1)
    result = rec.finish(HybridGenerateOutput(sequences=torch.zeros((BATCH, PROMPT + 3), dtype=torch.long)))

    assert torch.equal(result.thinking_mask, by_hand([MASKS[0], MASKS[1]], dtype=torch.bool))
    assert result.thinking_latents.dtype == EMBED_DTYPE
    assert torch.equal(result.thinking_latents, by_hand(
        [[[10.5, 10.25], [11.5, 11.25], [12.5, 12.25]], [[20.5, 20.25], [21.5, 21.25], [22.5, 22.25]]],
        (D,), EMBED_DTYPE))
    assert result.thinking_hidden.dtype == torch.float64
    assert torch.equal(result.thinking_hidden, by_hand(
        [[[-10.5, -10.75], [-11.5, -11.75], [-12.5, -12.75]], [[-20.5, -20.75], [-21.5, -21.75], [-22.5, -22.75]]],
        (D,), torch.float64))
    assert torch.equal(result.thinking_noise, by_hand(
        [[[100.125, 100.375], [101.125, 101.375], [102.125, 102.375]],
         [[200.125, 200.375], [201.125, 201.375], [202.125, 202.375]]], (D,)))
    torch.testing.assert_close(result.thinking_latent_left_out_mass,
                               by_hand([[0.01, 0.02, 0.03], [0.02, 0.04, 0.06]]), rtol=0, atol=1e-7)
    assert torch.equal(result.thinking_gate_ratio, by_hand([[0.9, 0.8, 0.0], [0.7, 0.0, 0.0]]))
    assert torch.equal(result.thinking_hidden_ratio, by_hand([[0.4, 0.6, 0.0], [0.7, 0.0, 0.0]]))
    # log p of each sampled token; a row's padding after its end is token 0
    logprobs = [[math.log(0.5), math.log(0.7), math.log(0.3)], [math.log(0.5), math.log(0.5), 0.0],
                [math.log(0.5), 0.0, 0.0]]
    torch.testing.assert_close(result.sampled_token_logprobs, by_hand(logprobs), rtol=0, atol=1e-6)


def test_a_forward_without_a_cache_is_fed_every_position_so_far():
    fed = []
    rec = scripted_run(recorder(keep=False, every_position=True, latents=False), fed=fed)
    assert [sorted(inputs) for inputs in fed] == [sorted(["thinking_mask", "thinking_latents", "thinking_hidden",
                                                          "thinking_noise"])] * 2
    assert all(inputs["thinking_latents"] is None for inputs in fed)  # not formed by this run
    assert torch.equal(fed[0]["thinking_mask"], by_hand([MASKS[0]], dtype=torch.bool)[:, :PROMPT + 1])
    assert torch.equal(fed[1]["thinking_mask"], by_hand([MASKS[0], MASKS[1]], dtype=torch.bool)[:, :PROMPT + 2])
    assert torch.equal(fed[1]["thinking_noise"], by_hand(
        [[[100.125, 100.375], [101.125, 101.375], [102.125, 102.375]],
         [[200.125, 200.375], [201.125, 201.375], [202.125, 202.375]]], (D,))[:, :PROMPT + 2])
    assert fed[1]["thinking_hidden"].dtype == torch.float64
    # nothing else is kept when nothing is returned
    assert rec.values["thinking_gate_ratio"] == [] and rec.values["sampled_token_logprobs"] == []


def test_with_a_cache_a_forward_is_fed_the_last_token_and_nothing_is_kept_unasked():
    rec = recorder(keep=False)
    assert rec.forward_inputs(PROMPT) == {}
    inputs = step_inputs(1, MASKS[0])
    rec.to_be_fed(inputs, None)
    assert rec.forward_inputs(PROMPT + 1) is inputs
    rec.forwarded(outputs(*GATES[0]))
    assert rec.forward_inputs(PROMPT + 1) == {}  # a finished peer keeps stepping with no thinking inputs
    assert all(values == [] for values in rec.values.values())


def test_a_run_that_feeds_nothing_has_zeros_and_the_embedding_dtype():
    rec = recorder(noise=False)
    rec.sampled(torch.tensor(PROBS[0]).log(), torch.tensor(TOKENS[0]))
    result = rec.finish(HybridGenerateOutput(sequences=torch.zeros((BATCH, PROMPT + 1), dtype=torch.long)))
    assert result.thinking_noise is None
    assert result.thinking_hidden.dtype == EMBED_DTYPE and not result.thinking_hidden.any()
    assert not result.thinking_mask.any() and result.thinking_mask.shape == (BATCH, PROMPT + 1)
    torch.testing.assert_close(result.sampled_token_logprobs[:, PROMPT],
                               torch.tensor([math.log(0.5), math.log(0.7), math.log(0.3)]), rtol=0, atol=1e-6)
    assert not result.sampled_token_logprobs[:, :PROMPT].any()
