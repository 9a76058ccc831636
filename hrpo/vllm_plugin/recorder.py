"""What the trainer's replay needs from each vLLM rollout, recorded while the engine decodes.

The replay (``hrpo.replay``) mixes the same completion positions with the same latent inputs as
sampling did: per position, whether it was mixed, and the latent's inputs (the embedding-method
latent and/or the previous step's final hidden state h, and any Gaussian noise). vLLM hands back tokens and log-probs
only, so the model records these itself while decoding.

Per forward step the recorder keeps copies of the step's token ids, positions and row layout (as
device tensors: nothing waits for the host during decoding) and, for the rows that were mixed,
their latent inputs. ``assemble`` then follows each state slot through the steps: a prompt chunk
at position 0 starts a new rollout in its slot, later chunks and decode steps extend it. Each
rollout comes back as the tokens it fed (prompt, then every completion token but the last, which
is sampled and never fed), the thinking flag of each fed completion token, and the latent inputs
of the flagged ones, in order. The trainer matches them to vLLM's outputs by those tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LATENT_FIELDS = ("thinking_latents", "thinking_hidden", "thinking_noise")  # the fork's replay inputs, as recorded


@dataclass
class RecordedRollout:
    """One request as the engine decoded it: ``tokens`` fed (prompt + all completion tokens but the
    last), ``prompt_len``, ``thinking`` (bool, one per fed completion token) and, for the flagged ones
    in order, ``thinking_latents`` / ``thinking_hidden`` / ``thinking_noise`` (rows x d, CPU; None where
    the source uses no such input)."""

    tokens: list[int]
    prompt_len: int
    thinking: torch.Tensor
    thinking_latents: torch.Tensor | None
    thinking_hidden: torch.Tensor | None
    thinking_noise: torch.Tensor | None = None


class RecordingError(RuntimeError):
    """The recorded steps do not form consistent rollouts (a vLLM scheduling this plugin does not expect)."""


class RolloutRecorder:
    """Collects the steps of one ``generate`` call (see the module docstring)."""

    def __init__(self):
        self.steps: list[dict] = []

    def add_step(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata, decode_rows: torch.Tensor,
                 thinking: torch.Tensor, inputs: dict | None) -> None:
        """One forward: ``decode_rows`` (the row indices that decoded), ``thinking`` (bool per decode
        row), and ``inputs``, the latent inputs of the thinking ones (each of LATENT_FIELDS: their rows in
        order, or None)."""
        inputs = inputs or {}
        rows = int(metadata.row_slots.shape[0])
        end = int(metadata.row_query_start_loc[-1]) if rows else 0  # a device sync: once per step
        self.steps.append({
            "input_ids": input_ids[:end].clone(), "positions": positions[:end].clone(),
            "slots": metadata.row_slots.clone(), "starts": metadata.row_query_start_loc.clone(),
            "prefilling": metadata.row_prefilling.clone(), "decode_rows": decode_rows.clone(),
            "thinking": thinking.clone(),
            **{field: None if inputs.get(field) is None else inputs[field].detach().clone() for field in LATENT_FIELDS},
        })

    def assemble(self) -> list[RecordedRollout]:
        """Every rollout recorded, on the CPU (see the module docstring); clears the steps."""
        open_rollouts: dict[int, dict] = {}
        finished: list[dict] = []
        for step in self.steps:
            step = {key: (None if value is None else value.cpu()) for key, value in step.items()}
            self._prefill_chunks(step, open_rollouts, finished)
            self._decode_rows(step, open_rollouts)
        finished.extend(open_rollouts.values())
        self.steps = []
        return [self._rollout(parts) for parts in finished]

    @staticmethod
    def _prefill_chunks(step: dict, open_rollouts: dict, finished: list) -> None:
        starts, ids, positions = step["starts"].tolist(), step["input_ids"].tolist(), step["positions"].tolist()
        for row in step["prefilling"].nonzero().squeeze(1).tolist():
            slot, (begin, end) = int(step["slots"][row]), (starts[row], starts[row + 1])
            if positions[begin] == 0:
                if slot in open_rollouts:
                    finished.append(open_rollouts.pop(slot))
                open_rollouts[slot] = {"tokens": [], "prompt_len": 0, "thinking": [],
                                       **{field: [] for field in LATENT_FIELDS}}
            parts = open_rollouts.get(slot)
            if parts is None or len(parts["tokens"]) != positions[begin] or parts["thinking"]:
                raise RecordingError(f"a prompt chunk at position {positions[begin]} in state slot {slot} does not "
                                     f"continue a prompt recorded there")
            parts["tokens"].extend(ids[begin:end])
            parts["prompt_len"] = len(parts["tokens"])

    @staticmethod
    def _decode_rows(step: dict, open_rollouts: dict) -> None:
        starts, ids, positions = step["starts"].tolist(), step["input_ids"].tolist(), step["positions"].tolist()
        flagged = 0
        for row, thinking in zip(step["decode_rows"].tolist(), step["thinking"].tolist()):
            slot, token = int(step["slots"][row]), starts[row]
            parts = open_rollouts.get(slot)
            if parts is None or len(parts["tokens"]) != positions[token]:
                raise RecordingError(f"a decode step at position {positions[token]} in state slot {slot} does not "
                                     f"continue a rollout recorded there")
            parts["tokens"].append(ids[token])
            parts["thinking"].append(bool(thinking))
            if thinking:
                for field in LATENT_FIELDS:
                    if step[field] is not None:
                        parts[field].append(step[field][flagged])
                flagged += 1

    @staticmethod
    def _rollout(parts: dict) -> RecordedRollout:
        latent = {field: torch.stack(parts[field]) if parts[field] else None for field in LATENT_FIELDS}
        return RecordedRollout(tokens=parts["tokens"], prompt_len=parts["prompt_len"],
                               thinking=torch.tensor(parts["thinking"], dtype=torch.bool), **latent)
