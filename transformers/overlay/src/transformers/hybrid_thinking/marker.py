"""Finding the answer marker in a completion: on the device, one gather per decoding step.

A row is in its thinking phase until the answer marker has appeared in its completion's text,
the text the reward reads: ``tokenizer.decode(completion_ids, skip_special_tokens=True)``, as
TRL decodes completions. ``AnswerMarkerAutomaton`` follows that on the device without decoding
anything while sampling: a state per row (how many bytes of the marker's UTF-8 the text ends
with, Knuth-Morris-Pratt style, or "found", which is final), advanced by a table lookup
``table[state, token]`` built once per tokenizer and marker. The step has no host sync and a
fixed shape, so the sampling loop stays compileable.

What each token adds to the text (``token_texts``), as that decode writes it:

- a token the decode skips (a special token, an id beyond the tokenizer) adds nothing;
- a byte-level BPE token adds its bytes, which can be part of a character that only the next
  token completes;
- any other token adds what it adds after another token, ``decode([x, t])`` minus
  ``decode([x])`` (separators a decoder puts between tokens included), and as the text's first
  token ``decode([t])`` (decoders strip a leading space there): a state "no text yet" tells
  the two apart;
- a byte-fallback token (``<0xNN>``, tokenizers' ByteFallback decoder) adds its byte to a run of
  such tokens. The decoder writes a run as its UTF-8 text when the whole run is valid UTF-8 and as
  one U+FFFD per byte otherwise, so a later byte of a run can turn text that a shorter prefix
  showed into U+FFFD. The automaton counts a run once it is closed (by the next token that is
  neither a byte token nor skipped): meanwhile its state follows the run's bytes through the
  marker's automaton and their UTF-8 validity, and reports nothing of them. So it never reports a
  marker that the text of a longer completion lacks, and it reports the marker as soon as the
  text before the open run holds it.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

import torch

REPLACEMENT_CHARACTER = "\ufffd"
# clean_up_tokenization (a decode option) deletes spaces next to these characters
_CLEANUP_CHARACTERS = set(".?!,'")


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


# Strict UTF-8 (Rust's String::from_utf8, which the ByteFallback decoder uses, and Python's
# decoder agree): the validity of a run of bytes so far is one of these classes. 0: at a
# character boundary; 1-7: inside a character, (bytes still to come, the range the next one must be in).
_INSIDE = {1: (1, 0x80, 0xBF), 2: (2, 0x80, 0xBF), 3: (2, 0xA0, 0xBF), 4: (2, 0x80, 0x9F),
           5: (3, 0x80, 0xBF), 6: (3, 0x90, 0xBF), 7: (3, 0x80, 0x8F)}
UTF8_CLASSES = 1 + len(_INSIDE)
UTF8_INVALID = -1


def utf8_next(utf8_class: int, byte: int) -> int:
    """The class of a run of bytes after one more byte, or UTF8_INVALID: no continuation of the
    run is valid UTF-8 any more."""
    if utf8_class == 0:
        if byte < 0x80:
            return 0
        if 0xC2 <= byte <= 0xDF:
            return 1
        if byte == 0xE0:
            return 3
        if byte == 0xED:
            return 4
        if 0xE1 <= byte <= 0xEF:
            return 2
        if byte == 0xF0:
            return 6
        if 0xF1 <= byte <= 0xF3:
            return 5
        if byte == 0xF4:
            return 7
        return UTF8_INVALID  # a continuation byte, C0, C1, F5-FF
    remaining, low, high = _INSIDE[utf8_class]
    if not low <= byte <= high:
        return UTF8_INVALID
    return {1: 0, 2: 1, 3: 2}[remaining]


def _neutral_prefix(tokenizer, marker: str, skipped: set[int]) -> int:
    """A token to decode each token after: ASCII text, none of the marker's characters, neither
    skipped by the decode nor a byte-fallback token."""
    def neutral(token_id: int, text: str) -> bool:
        return (token_id not in skipped and bool(text) and text.isascii() and not set(text) & set(marker)
                and _byte_fallback_byte(tokenizer.convert_ids_to_tokens(token_id)) is None)

    for text in ("a", "x", "0", "1", "e"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids) == text and neutral(ids[0], text):
            return ids[0]
    for token_id in range(len(tokenizer)):
        if neutral(token_id, tokenizer.decode([token_id])):
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


def _byte_fallback_byte(piece: str | None) -> int | None:
    """The byte of a byte-fallback token as the ByteFallback decoder reads it (six characters,
    ``<0x``, two hexadecimal digits as Rust's u8::from_str_radix takes them, ``>``), else None."""
    if piece is None:
        return None
    match = re.fullmatch(r"<0x(\+[0-9A-Fa-f]|[0-9A-Fa-f]{2})>", piece)
    return int(match.group(1), 16) if match else None


def decode_cleans_up_spaces(tokenizer) -> bool:
    """Whether ``tokenizer.decode`` applies clean_up_tokenization by default (the fast tokenizer's
    ``_decode``: on when asked for, but not for a BPE model unless forced)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    is_bpe = backend is not None and type(backend.model).__name__ == "BPE"
    forced = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    return not is_bpe or bool(getattr(tokenizer, forced, False))


def check_marker(tokenizer, marker: str) -> None:
    """A marker whose presence in the decoded text the automaton can follow exactly."""
    if not marker:
        raise ValueError("answer_marker must be a non-empty string")
    if REPLACEMENT_CHARACTER in marker:
        raise ValueError("answer_marker cannot hold U+FFFD, which decoding writes for invalid bytes")
    if decode_cleans_up_spaces(tokenizer) and (set(marker) & _CLEANUP_CHARACTERS or marker != marker.strip(" ")):
        raise ValueError(f"answer_marker {marker!r}: this tokenizer's decode cleans up tokenization spaces "
                         f"(clean_up_tokenization_spaces=True), which deletes spaces next to "
                         f"{''.join(sorted(_CLEANUP_CHARACTERS))}; a marker holding one of these characters or "
                         f"starting or ending with a space would appear or vanish with it")


class TextToken(NamedTuple):
    after: bytes  # what the token adds to the text after another token
    first: bytes  # and as the text's first token


class ByteToken(NamedTuple):
    byte: int  # a byte-fallback token's byte
    first: bytes  # what it adds as the text's first token when it is ASCII (a decoder may strip it)


def token_texts(tokenizer, marker: str, vocab_size: int) -> list[TextToken | ByteToken | None]:
    """What each token id adds to the decoded text (``decode(ids, skip_special_tokens=True)``):
    None for nothing, the decode skips it (special tokens; ids the tokenizer does not have); a
    ``ByteToken`` for a byte-fallback token (``<0xNN>`` with a ByteFallback decoder); else a
    ``TextToken``.

    Bytes, not characters: a byte-level BPE token (every character in the byte alphabet) is its
    bytes, which can hold part of a character. Any other token adds ``decode([x, t])`` minus
    ``decode([x])``, and ``decode([t])`` first. Computed without clean_up_tokenization
    (``check_marker`` refuses the markers it could change).
    """
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    byte_fallback = "ByteFallback" in kinds
    known = min(vocab_size, len(tokenizer))
    options = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
    alone = tokenizer.batch_decode([[token_id] for token_id in range(known)], **options)
    skipped = {token_id for token_id, (piece, text) in enumerate(zip(pieces, alone))  # no text with, some without
               if piece is None or (not text and tokenizer.decode([token_id], clean_up_tokenization_spaces=False))}
    prefix = _neutral_prefix(tokenizer, marker, skipped)
    head = tokenizer.decode([prefix], **options)
    pairs = tokenizer.batch_decode([[prefix, token_id] for token_id in range(known)], **options)
    out: list[TextToken | ByteToken | None] = []
    for token_id, (piece, first, pair) in enumerate(zip(pieces, alone, pairs)):
        byte = _byte_fallback_byte(piece) if byte_fallback else None
        if token_id in skipped:
            out.append(None)
        elif byte is not None:
            out.append(ByteToken(byte, first.encode("utf-8") if byte < 0x80 else bytes([byte])))
        elif alphabet is not None and piece and all(c in alphabet for c in piece):
            text = bytes(alphabet[c] for c in piece)
            out.append(TextToken(text, text))
        else:
            after = pair[len(head):] if pair.startswith(head) else first
            out.append(TextToken(after.encode("utf-8"), first.encode("utf-8")))
    return out + [None] * (vocab_size - known)


class AnswerMarkerAutomaton:
    """The answer marker's automaton over token ids: ``table[state, token]`` (int64, on the device).

    States, with F the marker's length in UTF-8 bytes: 0..F, how many bytes of the marker the
    text ends with (F: found, final); F + 1, no text yet (``start``); and, for a tokenizer with
    byte-fallback tokens, an open run of them: (the state through the run's bytes, their UTF-8
    class) or invalid.
    """

    def __init__(self, tokenizer, marker: str, vocab_size: int, device=None):
        check_marker(tokenizer, marker)
        self.marker = marker
        pattern = marker.encode("utf-8")
        final = self.final = len(pattern)
        start = self.start_state = final + 1
        fail = _failure(pattern)
        marker_bytes = set(pattern)
        no_marker_bytes = [0] * final + [final]

        def advanced(text: bytes) -> list[int]:
            """The state after ``text`` from each of 0..F."""
            if not text:
                return list(range(final + 1))
            if not marker_bytes & set(text):
                return no_marker_bytes
            return [_advance(pattern, fail, state, text) for state in range(final + 1)]

        texts = token_texts(tokenizer, marker, vocab_size)
        has_runs = any(isinstance(text, ByteToken) for text in texts)
        run_base = final + 2
        invalid = run_base + (final + 1) * UTF8_CLASSES
        states = invalid + 1 if has_runs else run_base
        runs = [(v, utf8) for v in range(final + 1) for utf8 in range(UTF8_CLASSES)] if has_runs else []
        # The state a token other than a byte continues from. A run it closes is its bytes when
        # they are valid and complete UTF-8, one U+FFFD per byte otherwise (after which a marker
        # without U+FFFD has not begun: state 0).
        continues_from = [*range(final + 1), 0, *(v if utf8 == 0 else 0 for v, utf8 in runs)]
        continues_from += [0] if has_runs else []

        def run_state(v: int, utf8: int) -> int:
            return invalid if utf8 == UTF8_INVALID else run_base + v * UTF8_CLASSES + utf8

        columns = []
        for text in texts:
            if text is None:  # skipped: every state stays
                columns.append(list(range(states)))
            elif isinstance(text, TextToken):
                after = advanced(text.after)
                column = [after[state] for state in continues_from]
                column[start] = advanced(text.first)[0]
                columns.append(column)
            else:  # a byte: opens a run (from 0..F-1 and from no text yet) or goes on with one
                through, opened = advanced(bytes([text.byte])), utf8_next(0, text.byte)
                column = [run_state(through[v], opened) for v in range(final)] + [final]
                column.append(run_state(advanced(text.first)[0], opened))
                column += [run_state(through[v], utf8_next(utf8, text.byte)) for v, utf8 in runs]
                columns.append(column + [invalid])
        self.table = torch.tensor(columns, dtype=torch.int64, device=device).T.contiguous()

    @classmethod
    def cached(cls, tokenizer, marker: str, vocab_size: int, device) -> "AnswerMarkerAutomaton":
        """One table per marker, vocabulary size and device, kept on the tokenizer (built once)."""
        tables = tokenizer.__dict__.setdefault("_hrpo_answer_marker_automata", {})
        key = (len(tokenizer), marker, vocab_size, str(device))
        if key not in tables:
            tables[key] = cls(tokenizer, marker, vocab_size, device)
        return tables[key]

    def start(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.start_state, dtype=torch.int64, device=device)

    def step(self, state: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Each active row's state after its token; rows not active keep theirs."""
        return torch.where(active, self.table[state, tokens], state)

    def found(self, state: torch.Tensor) -> torch.Tensor:
        return state == self.final

