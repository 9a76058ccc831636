"""GSM8K answer parsing and the reward: real-looking cases and a no-execution property."""
import builtins
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrpo.rewards import correctness_reward, extract_answer, gsm8k_reward, parse_number, reference_answer


@pytest.mark.parametrize("text, expected", [
    ("72", Fraction(72)),
    ("1,234", Fraction(1234)),
    ("$5", Fraction(5)),
    ("5.0", Fraction(5)),
    ("5.", Fraction(5)),
    ("-3", Fraction(-3)),
    ("\u22123 degrees", Fraction(-3)),
    ("€12.50 per hour", Fraction(25, 2)),
    ("3/4", Fraction(3, 4)),
    ("50%", Fraction(50)),
    (" The answer is 18 apples.", Fraction(18)),
    ("0.5", Fraction(1, 2)),
    (".5", Fraction(1, 2)),
    ("no number here", None),
    ("", None),
    ("1/0", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("completion, reference, reward", [
    ("She has 3 + 4 = 7 apples. #### 7", "3 + 4 = <<3+4=7>>7\n#### 7", 1.0),
    ("Total is 1000 dollars #### $1,000.", "#### 1000", 1.0),
    ("So 5.0 #### 5.0", "#### 5", 1.0),
    ("#### -4", "#### -4", 1.0),
    ("#### 7 #### 7", "#### 7", 0.0),          # two markers
    ("The answer is 7", "#### 7", 0.0),        # no marker
    ("#### 8", "#### 7", 0.0),                 # wrong
    ("#### seven", "#### 7", 0.0),             # no number after the marker
    ("Reasoning... #### 7\n\nThen I kept talking about 9", "#### 7", 1.0),
    ("#### 7", "#### not a number", 0.0),      # unusable reference
])
def test_correctness_reward(completion, reference, reward):
    assert correctness_reward(completion, reference) == reward


def test_trl_reward_function_takes_chat_completions():
    completions = [[{"role": "assistant", "content": "2+2=4 #### 4"}], "#### 5"]
    assert gsm8k_reward(completions, answer=["#### 4", "#### 4"]) == [1.0, 0.0]


def test_reference_answer_of_gsm8k_rows():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == Fraction(72)
    assert reference_answer("no marker") is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"[#0-9$,./%\- ()a-z_'\"]{0,60}", fullmatch=True))
def test_no_input_is_executed_and_none_raises(text):
    forbidden = []

    def refuse(*args, **kwargs):
        forbidden.append(args)
        raise AssertionError("model text must never be evaluated")

    saved = builtins.eval, builtins.exec, builtins.compile
    builtins.eval = builtins.exec = builtins.compile = refuse
    try:
        for candidate in (text, "#### " + text, text + " #### " + text):
            extract_answer(candidate)
            parse_number(candidate)
            reference_answer(candidate)
            correctness_reward(candidate, "#### 1")
    finally:
        builtins.eval, builtins.exec, builtins.compile = saved
    assert not forbidden


def test_code_looking_answers_are_not_run(tmp_path):
    target = tmp_path / "pwned"
    payload = f"#### __import__('pathlib').Path({str(target)!r}).touch() or 1"
    result = extract_answer(payload)  # whatever number it reads, it only reads
    assert result is None or isinstance(result, Fraction)
    assert not target.exists()
    assert correctness_reward("#### 2**10", "#### 1024") == 0.0  # read as 2, not computed
