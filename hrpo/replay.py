"""The replay data of sampled completions, found again when the GRPO loss scores them.

Generation hands back, per position of prompt + completion, the thinking mask and the
latent sources; the replay forward mixes the same positions with the same latents (the
projection, gates and Lambda applied inside autograd) and scores the completion tokens.
``ReplayIndex`` keeps them per rollout for the trainer's scoring forwards.
"""
from __future__ import annotations

import torch
from transformers.hybrid_thinking.modeling import THINKING_INPUTS

MASK_INPUT, *LATENT_INPUTS = THINKING_INPUTS  # the thinking mask, then the latent sources of its positions


def stop_token_ids(eos_token_id) -> list[int]:
    """The end-of-sequence ids as a list: a generation config's ``eos_token_id`` is None,
    one id, or several (Qwen2.5 and Llama 3 stop on more than one)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(i) for i in eos_token_id.flatten().tolist()]
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(i) for i in eos_token_id]


def completion_mask(completion_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
    """1 for completion tokens up to and including the first end-of-sequence token (any of
    ``eos_token_id``: one id or a list), 0 after it."""
    stop = stop_token_ids(eos_token_id)
    if not stop:
        return torch.ones_like(completion_ids)
    is_eos = torch.isin(completion_ids, torch.tensor(stop, device=completion_ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate() numbers them: counting only attended tokens (left padding)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class ReplayMiss(LookupError):
    """A scoring forward over a token sequence that no recorded rollout has."""


class ReplayIndex:
    """The thinking inputs recorded while sampling, found again by the tokens they belong to.

    Trainers reshape rollouts before scoring them: TRL re-pads prompt and completion,
    unsloth's GRPO loss moves left padding to the right and packs rows into one sequence,
    and both score in chunks of rows. Every one of those keeps, within a row, the order of
    the row's attended tokens. So each rollout's replay data is kept as one entry per
    attended token, under the tuple of those tokens, and a forward over any of the
    rollouts, in any of those layouts, gets its thinking inputs by lookup. Two rollouts
    with the same tokens have the same thinking inputs (same model, same prefix; exploration
    noise is drawn as a function of the tokens so far, for this reason), so sharing a key
    loses nothing.

    A pad-id token inside a rollout (in the prompt when pad = EOS and the chat template
    puts EOS between turns, or sampled in a completion) is attended for TRL but dropped by
    unsloth's left packing (which treats every pad-id token as padding). A forward over such
    a shortened rollout would score other tokens than were sampled, so it is refused
    (ReplayMiss, saying so); hrpo.data.left_padded gives every model a dedicated pad token.

    Rollouts are kept per ``group`` (the trainer's "train" and "eval"), each cleared on its
    own: an evaluation in the middle of a buffered training batch leaves that batch's
    rollouts in place. A lookup searches its own group only: an evaluation rollout with the
    same tokens as a training one was sampled by another policy (and other noise), so it
    must never stand in for it.
    """

    def __init__(self, pad_token_id: int | None, eos_token_ids):
        """``eos_token_ids``: every id that ends a completion (one id or a list), as the
        trainer's own completion mask uses them."""
        self.pad_token_id, self.eos_token_ids = pad_token_id, stop_token_ids(eos_token_ids)
        self.groups: dict[str, dict[tuple, dict]] = {}
        # per group: the rollouts that hold pad-id tokens, keyed without them (to name the miss)
        self.pad_dropped_keys: dict[str, set[tuple]] = {}

    def clear(self, group: str = "train") -> None:
        self.groups.pop(group, None)
        self.pad_dropped_keys.pop(group, None)

    def __len__(self) -> int:
        return sum(len(records) for records in self.groups.values())

    def add(self, generation_output, prompt_attention_mask: torch.Tensor, group: str = "train") -> None:
        """Record the rollouts of one hybrid generate() call (sequences = prompt + completion)."""
        sequences = generation_output.sequences
        prompt_len = prompt_attention_mask.shape[1]
        completion = completion_mask(sequences[:, prompt_len:], self.eos_token_ids)
        attended = torch.cat([prompt_attention_mask.to(completion.dtype), completion], dim=1).bool()
        for row in range(sequences.shape[0]):
            positions = attended[row].nonzero().squeeze(1)
            mask = generation_output.thinking_mask[row, positions]
            flagged = positions[mask]
            latents = {}
            for key in LATENT_INPUTS:
                source = getattr(generation_output, key)
                latents[key] = None if source is None else source[row, flagged]
            self.add_rollout(sequences[row, positions], mask, generation_output.sampled_token_logprobs[row, positions],
                             latents, group)

    def add_rollout(self, tokens: torch.Tensor, mask: torch.Tensor, sampled_token_logprobs: torch.Tensor,
                    latents: dict, group: str = "train") -> None:
        """Record one rollout: its attended tokens (prompt + completion), the thinking mask and the
        sampling log-probs over them, and ``latents`` (each of LATENT_INPUTS: the flagged positions'
        rows in order, or None)."""
        record = {MASK_INPUT: mask, "sampled_token_logprobs": sampled_token_logprobs,
                  **{key: latents.get(key) for key in LATENT_INPUTS}}
        self.groups.setdefault(group, {})[tuple(tokens.tolist())] = record
        if self.pad_token_id is not None and bool((tokens == self.pad_token_id).any()):
            self.pad_dropped_keys.setdefault(group, set()).add(tuple(tokens[tokens != self.pad_token_id].tolist()))

    def _segments(self, input_ids, attention_mask, packed_seq_lengths):
        """(row, positions of the attended tokens) of each sequence in the forward's input."""
        if packed_seq_lengths is None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return [(row, attention_mask[row].bool().nonzero().squeeze(1)) for row in range(input_ids.shape[0])]
        if input_ids.shape[0] != 1:
            raise ValueError(f"packed_seq_lengths with {input_ids.shape[0]} rows: expected one packed row")
        segments, start = [], 0
        for length in torch.as_tensor(packed_seq_lengths).tolist():
            segments.append((0, torch.arange(start, start + length, device=input_ids.device)))
            start += length
        return segments

    def _find(self, records: dict, input_ids, row, positions):
        record = records.get(tuple(input_ids[row, positions].tolist()))
        if record is None and self.pad_token_id is not None:  # unmasked trailing padding
            positions = positions[input_ids[row, positions] != self.pad_token_id]
            record = records.get(tuple(input_ids[row, positions].tolist()))
        return record, positions

    def _miss(self, input_ids, row, positions, group: str) -> ReplayMiss:
        key = tuple(input_ids[row, positions].tolist())
        if key in self.pad_dropped_keys.get(group, ()):
            return ReplayMiss(f"row {row} of this forward is a recorded rollout without its pad-id "
                              f"({self.pad_token_id}) tokens: the scoring layout (unsloth's left packing) dropped "
                              f"them as padding, so it would score other tokens than were sampled. The pad token "
                              f"must be one that no chat template emits and the model does not generate "
                              f"(hrpo.data.left_padded chooses one)")
        return ReplayMiss(f"no recorded {group!r} rollout has the {positions.numel()} tokens of row {row} of "
                          f"this forward ({len(self.groups.get(group, {}))} {group!r} rollouts recorded)")

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               packed_seq_lengths=None, group: str = "train") -> dict:
        """Thinking inputs (and sampling log-probs) laid out like ``input_ids``, from the
        rollouts of ``group``.

        Raises ReplayMiss when a sequence was not recorded in that group."""
        batch, length = input_ids.shape
        device = input_ids.device
        records = self.groups.get(group, {})
        found = []
        for row, positions in self._segments(input_ids, attention_mask, packed_seq_lengths):
            record, positions = self._find(records, input_ids, row, positions)
            if record is None:
                raise self._miss(input_ids, row, positions, group)
            found.append((row, positions, record))
        out = {MASK_INPUT: torch.zeros(batch, length, dtype=torch.bool, device=device),
               "sampled_token_logprobs": torch.zeros(batch, length, dtype=torch.float32, device=device)}
        for key in LATENT_INPUTS:
            sample = next((rec[key] for _, _, rec in found if rec[key] is not None), None)
            out[key] = (None if sample is None else
                        torch.zeros(batch, length, sample.shape[-1], dtype=sample.dtype, device=device))
        for row, positions, record in found:
            positions = positions.to(device)
            flags = record[MASK_INPUT].to(device)
            out[MASK_INPUT][row, positions] = flags
            out["sampled_token_logprobs"][row, positions] = record["sampled_token_logprobs"].to(device)
            for key in LATENT_INPUTS:
                if out[key] is not None and record[key] is not None:
                    out[key][row, positions[flags]] = record[key].to(device)
        return out
