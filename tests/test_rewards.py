"""GSM8K answer parsing and the reward: real-looking cases and a no-execution property."""
import builtins
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrpo.rewards import correctness_reward, extract_answer, parse_number, reference_answer
from hrpo.tasks import get_task


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
    ("The answer is 7", "#### 7", 0.0),        # no marker
    ("#### 8", "#### 7", 0.0),                 # wrong
    ("#### seven", "#### 7", 0.0),             # no number after the marker
    ("Reasoning... #### 7\n\nThen I kept talking about 9", "#### 7", 1.0),
    ("#### 7", "#### not a number", 0.0),      # unusable reference
])
def test_correctness_reward(completion, reference, reward):
    assert correctness_reward(completion, reference) == reward


# The extraction policy (hrpo/rewards.py's docstring), as a table: completion -> answer read.
POLICY = [
    # an expression followed by "= result" takes the result
    ("#### 5 + 3 = 8", Fraction(8)),
    ("#### 2 * 9 = 18 dollars", Fraction(18)),
    ("#### 3^2 = 9", Fraction(9)),
    ("#### x = 3", Fraction(3)),
    # identical repeated answers count once; conflicting ones give no answer
    ("#### 22\n#### 22", Fraction(22)),
    ("so 4 * 4 = 16.\n#### 16\n#### 16\n#### 16", Fraction(16)),
    ("#### 7 #### 7", Fraction(7)),
    ("#### 8\n#### 4\n#### 2", None),
    ("#### 16\n#### 16\n#### 1", None),          # a repeat cut off by the length limit conflicts
    ("#### 31\n#### 31\n####", Fraction(31)),    # a marker with no number is passed over
    ("#### seven\n#### 7", Fraction(7)),
    # signs before currency
    ("#### -$5", Fraction(-5)),
    ("#### $-5", Fraction(-5)),
    ("#### \u2212$5.50", Fraction(-11, 2)),
    ("#### \\$12", Fraction(12)),
    # mixed numbers and fractions
    ("#### 1 1/2", Fraction(3, 2)),
    ("#### -2 3/4 cups", Fraction(-11, 4)),
    ("#### 3/4", Fraction(3, 4)),
    ("#### 12 apples and 3 pears", Fraction(12)),
    # LaTeX
    ("#### \\frac{3}{4}", Fraction(3, 4)),
    ("#### \\dfrac{10}{4}", Fraction(5, 2)),
    ("#### \\boxed{42}", Fraction(42)),
    ("#### \\boxed{\\frac{1}{2}}", Fraction(1, 2)),
    # the answer is on the marker's line, or the first non-empty line after it
    ("#### \n\n 42\nmore text 9", Fraction(42)),
    ("Reasoning 1, 2, 3.\n#### 1,000 students", Fraction(1000)),
    # no answer
    ("The answer is 7", None),
    ("####", None),
    ("#### seven", None),
]


@pytest.mark.parametrize("completion, expected", POLICY)
def test_answer_policy(completion, expected):
    assert extract_answer(completion) == expected


def test_repeated_and_conflicting_answers_in_the_reward():
    assert correctness_reward("#### 22\n#### 22", "#### 22") == 1.0
    assert correctness_reward("#### 22\n#### 23", "#### 22") == 0.0


def test_trl_reward_function_takes_chat_completions():
    completions = [[{"role": "assistant", "content": "2+2=4 #### 4"}], "#### 5"]
    assert get_task("gsm8k").reward_function()(completions, answer=["#### 4", "#### 4"]) == [1.0, 0.0]


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
