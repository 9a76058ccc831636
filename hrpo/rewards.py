"""GSM8K answers: extraction after the answer marker, normalisation, and the reward.

Model text is only ever parsed, never evaluated: numbers are read with a regular
expression and compared as exact fractions.
"""
from __future__ import annotations

import re
from fractions import Fraction

ANSWER_MARKER = "####"
SYSTEM_PROMPT = (
    "You are a careful math tutor. Work through the problem step by step, then write the "
    f"final answer as a single number after the marker {ANSWER_MARKER}, in the form: "
    f"<your reasoning> {ANSWER_MARKER} <number>"
)

# An optional sign, digits with optional thousands separators, an optional decimal part,
# or a fraction a/b. Unicode minus signs are folded to "-" first.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})
_MAX_DIGITS = 200  # longer digit strings are not answers; refuse them rather than build huge numbers


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact Fraction, or None.

    Handles "1,234", "$5", "5.0", "-3", "7.", "3/4", "50%", "€12.50" and surrounding words.
    """
    if not isinstance(text, str):
        return None
    match = _NUMBER.search(text.translate(_MINUS_SIGNS))
    if match is None:
        return None
    token = match.group(0).replace(",", "").replace(" ", "")
    if sum(ch.isdigit() for ch in token) > _MAX_DIGITS:
        return None
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            if int(denominator) == 0:
                return None
            return Fraction(int(numerator), int(denominator))
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str, marker: str = ANSWER_MARKER) -> Fraction | None:
    """The number after the (single) marker in a completion; None when the marker is
    missing or repeated, or no number follows it."""
    if not isinstance(completion, str) or completion.count(marker) != 1:
        return None
    return parse_number(completion.split(marker, 1)[1])


def reference_answer(gsm8k_answer: str, marker: str = ANSWER_MARKER) -> Fraction | None:
    """The reference number of a GSM8K ``answer`` field ("... #### 72")."""
    if not isinstance(gsm8k_answer, str) or marker not in gsm8k_answer:
        return None
    return parse_number(gsm8k_answer.rsplit(marker, 1)[1])


def correctness_reward(completion: str, reference: str, marker: str = ANSWER_MARKER) -> float:
    """1.0 when the completion has exactly one marker and its answer equals the reference."""
    expected = reference_answer(reference, marker) if marker in str(reference) else parse_number(str(reference))
    got = extract_answer(completion, marker)
    return 1.0 if expected is not None and got is not None and got == expected else 0.0


def completion_text(completion) -> str:
    """TRL hands completions as text, or as chat messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def gsm8k_reward(completions, answer, **_) -> list[float]:
    """TRL reward function: the dataset's ``answer`` column is passed by name."""
    return [correctness_reward(completion_text(c), a) for c, a in zip(completions, answer)]
