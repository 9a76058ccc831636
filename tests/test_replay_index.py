"""ReplayIndex: thinking inputs found again by the rollout's tokens, in every scoring layout."""
from types import SimpleNamespace

import pytest
import torch

from hrpo.replay import ReplayIndex, ReplayMiss

PAD, EOS, D = 0, 1, 3


def rollouts():
    """Three left-padded prompts and their completions (EOS then padding), with
    per-position thinking data whose values encode (row, column)."""
    prompts = [[0, 0, 5, 6], [0, 7, 8, 9], [4, 5, 6, 7]]
    completions = [[10, 11, 1, 0, 0], [12, 13, 14, 15, 16], [17, 0, 18, 1, 0]]  # row 2 samples the pad token
    sequences = torch.tensor([p + c for p, c in zip(prompts, completions)])
    prompt_mask = (torch.tensor(prompts) != PAD).long()
    batch, width = sequences.shape
    code = torch.arange(batch)[:, None] * 100 + torch.arange(width)[None, :] + 1.0
    thinking = torch.zeros(batch, width, dtype=torch.bool)
    thinking[:, 4:] = True
    out = SimpleNamespace(sequences=sequences, thinking_mask=thinking,
                          thinking_latents=code[..., None].repeat(1, 1, D), thinking_hidden=-code[..., None].repeat(1, 1, D),
                          thinking_noise=(code / 7)[..., None].repeat(1, 1, D), sampled_token_logprobs=-code / 1000)
    return out, prompt_mask


def attended(out, prompt_mask):
    completion = out.sequences[:, 4:]
    after_eos = (completion == EOS).long().cumsum(1) - (completion == EOS).long() > 0
    return torch.cat([prompt_mask.bool(), ~after_eos], dim=1)


def real_columns(out, prompt_mask, row, drop_pad=False):
    cols = attended(out, prompt_mask)[row].nonzero().squeeze(1)
    if drop_pad:
        cols = cols[out.sequences[row, cols] != PAD]
    return cols


def check_layout(index, out, ids, mask, placement, packed=None):
    """placement: list of (target row, target columns, source row, source columns)."""
    got = index.lookup(ids, mask, packed)
    expected_logprobs = torch.zeros(ids.shape)
    expected_latents = torch.zeros(*ids.shape, D)
    expected_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, cols, src, src_cols in placement:
        assert torch.equal(ids[row, cols], out.sequences[src, src_cols])
        flags = out.thinking_mask[src, src_cols]
        expected_mask[row, cols] = flags
        expected_logprobs[row, cols] = out.sampled_token_logprobs[src, src_cols]
        expected_latents[row, cols[flags]] = out.thinking_latents[src, src_cols[flags]]
    assert torch.equal(got["thinking_mask"], expected_mask)
    assert torch.equal(got["sampled_token_logprobs"], expected_logprobs)
    assert torch.equal(got["thinking_latents"], expected_latents)
    assert torch.equal(got["thinking_hidden"], -expected_latents)
    assert torch.allclose(got["thinking_noise"], expected_latents / 7)
    return got


@pytest.fixture
def recorded():
    out, prompt_mask = rollouts()
    index = ReplayIndex(PAD, EOS)
    index.add(out, prompt_mask)
    return index, out, prompt_mask


def test_same_layout_as_generation(recorded):
    index, out, prompt_mask = recorded
    mask = attended(out, prompt_mask).long()
    check_layout(index, out, out.sequences, mask,
                 [(r, real_columns(out, prompt_mask, r), r, real_columns(out, prompt_mask, r)) for r in range(3)])


def test_trl_repadding_to_wider_prompt_and_completion_columns(recorded):
    index, out, prompt_mask = recorded
    ids = torch.full((3, 12), PAD)
    mask = torch.zeros(3, 12, dtype=torch.long)
    placement = []
    for r in range(3):
        cols = real_columns(out, prompt_mask, r)
        n_prompt = int(prompt_mask[r].sum())
        target = torch.cat([torch.arange(6 - n_prompt, 6), torch.arange(6, 6 + len(cols) - n_prompt)])
        ids[r, target] = out.sequences[r, cols]
        mask[r, target] = 1
        placement.append((r, target, r, cols))
    check_layout(index, out, ids, mask, placement)


def test_unsloth_left_packing_chunks_and_reordered_rows(recorded):
    index, out, prompt_mask = recorded
    rows = [1, 0]  # a chunk, in another order
    ids = torch.full((2, 9), PAD)
    placement = []
    for target_row, r in enumerate(rows):
        cols = real_columns(out, prompt_mask, r)
        ids[target_row, :len(cols)] = out.sequences[r, cols]
        placement.append((target_row, torch.arange(len(cols)), r, cols))
    check_layout(index, out, ids, (ids != PAD).long(), placement)


def test_sequence_packing(recorded):
    index, out, prompt_mask = recorded
    pieces, placement, start = [], [], 0
    for r in (1, 0):
        cols = real_columns(out, prompt_mask, r, drop_pad=True)
        pieces.append(out.sequences[r, cols])
        placement.append((0, torch.arange(start, start + len(cols)), r, cols))
        start += len(cols)
    ids = torch.cat(pieces)[None]
    check_layout(index, out, ids, None, placement, packed=torch.tensor([len(p) for p in pieces]))


def test_a_rollout_packed_without_its_sampled_pad_is_refused(recorded):
    """Row 2 sampled the pad token, which left packing drops: scored, it would not be what was sampled."""
    index, out, prompt_mask = recorded
    ids = out.sequences[2, real_columns(out, prompt_mask, 2, drop_pad=True)][None]
    with pytest.raises(ReplayMiss, match="row 0 .* without its pad-id \\(0\\) tokens"):
        index.lookup(ids, None, torch.tensor([ids.shape[1]]))


def test_a_prompt_with_a_dropped_pad_is_refused():
    """pad = EOS and a chat template with EOS between turns: left packing drops prompt tokens."""
    pad = eos = 1
    prompt = torch.tensor([[5, 1, 6, 7]])  # "turn 1 <eos> turn 2", all attended
    sequences = torch.cat([prompt, torch.tensor([[8, 9, eos, pad]])], dim=1)
    out = SimpleNamespace(sequences=sequences, thinking_mask=torch.zeros(1, 8, dtype=torch.bool),
                          thinking_latents=None, thinking_hidden=None, thinking_noise=None,
                          sampled_token_logprobs=torch.zeros(1, 8))
    index = ReplayIndex(pad, [eos])
    index.add(out, torch.ones_like(prompt))
    attended = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    assert not index.lookup(sequences, attended)["thinking_mask"].any()  # TRL's layout: found
    packed = sequences[:, [0, 2, 3, 4, 5]]  # every pad-id token dropped as padding
    with pytest.raises(ReplayMiss, match="without its pad-id \\(1\\) tokens"):
        index.lookup(packed, torch.ones_like(packed))


def test_an_unrecorded_sequence_is_an_error_not_a_plain_forward(recorded):
    index, out, prompt_mask = recorded
    ids = out.sequences.clone()
    ids[1, -1] = 19  # one token differs
    with pytest.raises(ReplayMiss, match="row 1"):
        index.lookup(ids, attended(out, prompt_mask).long())
    index.clear()
    with pytest.raises(ReplayMiss, match="0 'train' rollouts recorded"):
        index.lookup(out.sequences, attended(out, prompt_mask).long())


def test_an_evaluation_batch_leaves_the_buffered_training_rollouts_in_place(recorded):
    index, out, prompt_mask = recorded  # recorded as "train"
    eval_out, eval_mask = rollouts()
    eval_out.sequences = eval_out.sequences.clone()
    eval_out.sequences[:, 4] += 20  # other rollouts
    index.clear("eval")
    index.add(eval_out, eval_mask, group="eval")
    mask = attended(out, prompt_mask).long()
    assert torch.equal(index.lookup(out.sequences, mask)["thinking_mask"], out.thinking_mask & mask.bool())
    assert index.lookup(eval_out.sequences, mask, group="eval")["thinking_mask"].any()
    with pytest.raises(ReplayMiss, match="'train'"):  # each group is searched on its own
        index.lookup(eval_out.sequences, mask)
    index.clear("train")
    with pytest.raises(ReplayMiss):
        index.lookup(out.sequences, mask)


def test_a_training_lookup_never_returns_an_evaluation_rollout_with_the_same_tokens():
    """After a mid-training evaluation the "eval" group is the older key of the index: a
    training rollout whose tokens an evaluation rollout also has must get its own inputs."""
    train_out, prompt_mask = rollouts()
    eval_out, _ = rollouts()
    for key in ("thinking_latents", "thinking_hidden", "thinking_noise", "sampled_token_logprobs"):
        setattr(eval_out, key, getattr(eval_out, key) + 1000)  # the same tokens, other inputs
    index = ReplayIndex(PAD, EOS)
    index.add(eval_out, prompt_mask, group="eval")
    index.add(train_out, prompt_mask, group="train")
    mask = attended(train_out, prompt_mask).long()
    for group, source in (("train", train_out), ("eval", eval_out)):
        got = index.lookup(train_out.sequences, mask, group=group)
        flags = got["thinking_mask"]
        assert torch.equal(got["thinking_latents"][flags], source.thinking_latents[flags])
        assert torch.equal(got["sampled_token_logprobs"][mask.bool()], source.sampled_token_logprobs[mask.bool()])
