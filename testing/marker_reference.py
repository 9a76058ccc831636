"""The answer marker found on the host by decoding text: the text-level reference of the fork's
device automaton (``transformers.hybrid_thinking.marker``), the incremental detector that it
replaced in the sampling loop. ``bench/marker.py`` times the two; the tests check the detector
against the decode of the whole completion."""
from __future__ import annotations

from transformers.hybrid_thinking.marker import REPLACEMENT_CHARACTER


class AnswerMarkerDetector:
    """Tells, per row, whether the answer marker has appeared in the completion's text so far
    (``decode(ids, skip_special_tokens=True)``, as the reward reads it), on the host.

    The incremental detector the automaton replaced in the sampling loop (``bench/marker.py``
    times both): a row's check decodes a window of its last tokens that add text (the special
    tokens the decode skips are left out), and only when the newest token may end the marker
    (its text holds the marker's last character, or is part of a character). The window holds
    as many tokens as the marker has UTF-8 bytes, plus two: a byte-level token can add a single
    byte, so a marker of n bytes can take n tokens.

    Exact where the decode of a window ends as the decode of the whole completion does: not
    where a window starts inside a run of byte-fallback tokens (the run decodes as a whole),
    nor for a marker that starts with whitespace (a decoder strips it at a window's start).
    """

    def __init__(self, tokenizer, marker: str, batch_size: int):
        if not marker:
            raise ValueError("answer_marker must be a non-empty string")
        self.tokenizer = tokenizer
        self.marker = marker
        self.window_size = len(marker.encode("utf-8")) + 2
        self.windows: list[list[int]] = [[] for _ in range(batch_size)]
        self.found = [False] * batch_size
        self._token_cache: dict[int, tuple[bool, bool]] = {}

    def _skipped_and_may_end(self, token_id: int) -> tuple[bool, bool]:
        """(whether the decode skips the token, whether its text may end the marker)."""
        cached = self._token_cache.get(token_id)
        if cached is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            skipped = not text and bool(self.tokenizer.decode([token_id]))
            cached = (skipped, self.marker[-1] in text or REPLACEMENT_CHARACTER in text)
            self._token_cache[token_id] = cached
        return cached

    def update(self, token_ids: list[int], active: list[bool]) -> list[bool]:
        """Add one token per row (rows not active are skipped); return ``found`` per row."""
        to_check = []
        for row, (token_id, is_active) in enumerate(zip(token_ids, active)):
            if not is_active or self.found[row]:
                continue
            skipped, may_end = self._skipped_and_may_end(token_id)
            if skipped:
                continue
            window = self.windows[row]
            window.append(token_id)
            if len(window) > self.window_size:
                del window[0]
            if may_end:
                to_check.append(row)
        if to_check:
            texts = self.tokenizer.batch_decode([self.windows[row] for row in to_check], skip_special_tokens=True)
            for row, text in zip(to_check, texts):
                if self.marker in text:
                    self.found[row] = True
        return list(self.found)
