"""Finding the answer marker in a completion: on the device, one gather per decoding step.

A row is in its thinking phase until the answer marker has appeared in its completion.
``AnswerMarkerAutomaton`` follows that on the device without decoding anything while
sampling: a state per row (how many bytes of the marker's UTF-8 the completion's text ends
with, Knuth-Morris-Pratt style, or "found", which is final), advanced by a table lookup
``table[state, token]`` built once per tokenizer and marker. The step has no host sync and
a fixed shape, so the sampling loop stays compileable.

The table runs the bytes each token adds to the text (``token_bytes``) through the marker's
KMP automaton from every state. Separators a decoder puts between tokens (a word-level
decoder's space, a SentencePiece word boundary) count as the characters they are; a byte-level
token that holds part of a character counts as its bytes. A token that adds no text leaves
the state as it is.

``AnswerMarkerDetector`` is the reference it replaces in the loop: it decodes a window of
each row's last tokens and looks for the marker in the text (``tests/`` compares the two on
random token streams).
"""
from __future__ import annotations

import json
import re

import torch

def _failure(marker: bytes) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of marker[:i]."""
    fail = [0] * (len(marker) + 1)
    k = 0
    for i in range(1, len(marker)):
        while k and marker[i] != marker[k]:
            k = fail[k]
        if marker[i] == marker[k]:
            k += 1
        fail[i + 1] = k
    return fail


def _advance(marker: bytes, fail: list[int], state: int, text: bytes) -> int:
    """The state after ``text``: the length of the marker prefix the text so far ends with,
    or len(marker) once the marker has appeared (final)."""
    final = len(marker)
    for byte in text:
        if state == final:
            return final
        while state and byte != marker[state]:
            state = fail[state]
        if byte == marker[state]:
            state += 1
    return state


def _neutral_prefix(tokenizer, marker: str) -> int:
    """A token to decode each token after: ASCII text, none of the marker's characters, not special."""
    special = set(tokenizer.all_special_ids)
    for text in ("a", "x", "0", "1", "e"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in special and not set(text) & set(marker):
            return ids[0]
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id not in special and text and text.isascii() and not set(text) & set(marker):
            return token_id
    raise ValueError("no token of the tokenizer can serve as a neutral prefix for the answer-marker table")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), as char -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


def _decoder_kinds(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoder (and of the decoders of a Sequence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return {d.get("type") for d in decoder.get("decoders", [decoder])}


def token_bytes(tokenizer, marker: str, vocab_size: int) -> list[bytes]:
    """The UTF-8 bytes each token id adds to a text (ids beyond the tokenizer add none).

    Bytes, not characters: a byte-level BPE token can hold part of a character, which only the
    next token completes. A byte-level token's bytes come from its byte alphabet, a
    byte-fallback token (``<0xNN>``) is its byte; any other token adds the text it adds after
    another token, ``decode([x, t])`` minus ``decode([x])``.
    """
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    special = set(tokenizer.all_special_ids)
    prefix = _neutral_prefix(tokenizer, marker)
    head = tokenizer.decode([prefix])
    known = min(vocab_size, len(tokenizer))
    pairs = tokenizer.batch_decode([[prefix, token_id] for token_id in range(known)])
    pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
    out = []
    for token_id, (pair, piece) in enumerate(zip(pairs, pieces)):
        if alphabet is not None and token_id not in special and piece and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif "ByteFallback" in kinds and piece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            text = pair[len(head):] if pair.startswith(head) else tokenizer.decode([token_id])
            out.append(text.encode("utf-8"))
    return out + [b""] * (vocab_size - known)


class AnswerMarkerAutomaton:
    """The answer marker's KMP automaton over token ids: ``table[state, token]`` (int64, on the device)."""

    def __init__(self, tokenizer, marker: str, vocab_size: int, device=None):
        if not marker:
            raise ValueError("answer_marker must be a non-empty string")
        self.marker = marker
        pattern = marker.encode("utf-8")
        self.final = len(pattern)
        fail = _failure(pattern)
        marker_bytes = set(pattern)
        rows = []
        for text in token_bytes(tokenizer, marker, vocab_size):
            if not text:
                rows.append(range(self.final + 1))  # no text: the state stays
            elif not marker_bytes & set(text):
                rows.append([0] * self.final + [self.final])  # none of the marker's bytes: back to the start
            else:
                rows.append([_advance(pattern, fail, state, text) for state in range(self.final + 1)])
        self.table = torch.tensor(rows, dtype=torch.int64, device=device).T.contiguous()

    @classmethod
    def cached(cls, tokenizer, marker: str, vocab_size: int, device) -> "AnswerMarkerAutomaton":
        """One table per marker, vocabulary size and device, kept on the tokenizer (built once)."""
        tables = tokenizer.__dict__.setdefault("_hrpo_answer_marker_automata", {})
        key = (len(tokenizer), marker, vocab_size, str(device))
        if key not in tables:
            tables[key] = cls(tokenizer, marker, vocab_size, device)
        return tables[key]

    def start(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.int64, device=device)

    def step(self, state: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Each active row's state after its token; rows not active keep theirs."""
        return torch.where(active, self.table[state, tokens], state)

    def found(self, state: torch.Tensor) -> torch.Tensor:
        return state == self.final


class AnswerMarkerDetector:
    """Tells, per row, whether the answer marker has appeared in the completion so far.

    The reference detector, on the host: a row's check decodes only a window of its last few
    tokens, and only when the newest token's text holds the marker's last character. A
    marker split over several tokens is found at the token that completes it.
    """

    def __init__(self, tokenizer, marker: str, batch_size: int):
        if not marker:
            raise ValueError("answer_marker must be a non-empty string")
        self.tokenizer = tokenizer
        self.marker = marker
        # Every token adds at least one character, but special tokens can add none: keep
        # a margin so that one whole occurrence always fits in the window.
        self.window_size = len(marker) + 2
        self.windows: list[list[int]] = [[] for _ in range(batch_size)]
        self.found = [False] * batch_size
        self._piece_cache: dict[int, bool] = {}

    def _may_end_marker(self, token_id: int) -> bool:
        hit = self._piece_cache.get(token_id)
        if hit is None:
            hit = self.marker[-1] in self.tokenizer.decode([token_id])
            self._piece_cache[token_id] = hit
        return hit

    def update(self, token_ids: list[int], active: list[bool]) -> list[bool]:
        """Add one token per row (rows not active are skipped); return ``found`` per row."""
        to_check = []
        for row, (token_id, is_active) in enumerate(zip(token_ids, active)):
            if not is_active or self.found[row]:
                continue
            window = self.windows[row]
            window.append(token_id)
            if len(window) > self.window_size:
                del window[0]
            if self._may_end_marker(token_id):
                to_check.append(row)
        if to_check:
            texts = self.tokenizer.batch_decode([self.windows[row] for row in to_check])
            for row, text in zip(to_check, texts):
                if self.marker in text:
                    self.found[row] = True
        return list(self.found)
