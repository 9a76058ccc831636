"""Numeric answers (GSM8K format): extraction after the answer marker and the reward.

Model text is only ever parsed, never evaluated: numbers are read with regular
expressions and compared as exact fractions.

The policy, for a completion:

- Every occurrence of the marker starts an answer: the first non-empty line of the text
  up to the next marker. A marker followed by no number (nothing, or only words) gives no
  answer and is passed over.
- In an answer, an expression followed by ``= result`` counts as its result: the part
  after the last ``=`` is read ("#### 5 + 3 = 8" is 8). ``\\boxed{...}`` is unwrapped and
  ``\\frac{a}{b}`` read as a/b.
- The number read is the first one: thousands separators, decimals, a/b fractions, mixed
  numbers ("1 1/2" is 3/2), a sign before or after a currency symbol ("-$5" is -5), and
  trailing units or "%" are accepted.
- All answers must agree: identical repeated answers ("#### 22 ... #### 22") count once,
  conflicting ones give no answer (reward 0). A completion with no answer scores 0.
"""
from __future__ import annotations

import re
from fractions import Fraction

ANSWER_MARKER = "####"

_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})
_CURRENCY = re.compile(r"\\?[$€£¥]")
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# sign, then: a mixed number, a fraction, or a plain number (decimal, thousands separators)
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-+]?)\s*(?:(?P<whole>\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)(?![\d.])"
    rf"|(?P<num>{_PLAIN})(?:\s*/\s*(?P<den>{_PLAIN}))?)")
_MAX_DIGITS = 200  # longer digit strings are not answers; refuse them rather than build huge numbers


def _normalise(text: str) -> str:
    text = text.translate(_MINUS_SIGNS)
    text = _BOXED.sub(r"\1", text)
    text = _FRAC.sub(r"\1/\2", text)
    return _CURRENCY.sub("", text)


def _fraction(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact Fraction, or None.

    Handles "1,234", "$5", "-$5", "5.0", "-3", "7.", "3/4", "1 1/2", "50%", "€12.50",
    ``\\frac{3}{4}``, ``\\boxed{7}`` and surrounding words.
    """
    if not isinstance(text, str):
        return None
    match = _NUMBER.search(_normalise(text))
    if match is None:
        return None
    if sum(ch.isdigit() for ch in match.group(0)) > _MAX_DIGITS:
        return None
    try:
        if match.group("whole") is not None:
            value = int(match.group("whole")) + Fraction(int(match.group("mnum")), int(match.group("mden")))
        elif match.group("den") is not None:
            value = _fraction(match.group("num")) / _fraction(match.group("den"))
        else:
            value = _fraction(match.group("num"))
    except (ValueError, ZeroDivisionError):
        return None
    return -value if match.group("sign") == "-" else value


def parse_answer(segment: str) -> Fraction | None:
    """One answer: the first non-empty line; an expression with ``= result`` reads the result."""
    lines = [line for line in segment.splitlines() if line.strip()]
    if not lines:
        return None
    line = _normalise(lines[0])
    return parse_number(line.rsplit("=", 1)[-1] if "=" in line else line)


def extract_answer(completion: str, marker: str = ANSWER_MARKER) -> Fraction | None:
    """The answer after the marker(s) of a completion (see the module's policy): None when
    there is no marker, no number after any marker, or the answers conflict."""
    if not isinstance(completion, str) or marker not in completion:
        return None
    answers = {parse_answer(segment) for segment in completion.split(marker)[1:]} - {None}
    return answers.pop() if len(answers) == 1 else None


def reference_answer(gsm8k_answer: str, marker: str = ANSWER_MARKER) -> Fraction | None:
    """The reference number of a GSM8K ``answer`` field ("... #### 72")."""
    if not isinstance(gsm8k_answer, str) or marker not in gsm8k_answer:
        return None
    return parse_answer(gsm8k_answer.rsplit(marker, 1)[1])


def correctness_reward(completion: str, reference: str, marker: str = ANSWER_MARKER) -> float:
    """1.0 when the completion's answer (see the policy) equals the reference, else 0.0."""
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

