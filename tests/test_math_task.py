"""The MATH task: reference answers, the equivalence reward, bounded time, data layouts, bad data."""
import builtins
import contextlib
import time
from fractions import Fraction

import pytest

from hrpo.data import DataError, write_jsonl
from hrpo.tasks import get_task
from hrpo.tasks import math as M
from testing.task_rows import PROBLEMS, REFERENCES, write_math_folder


@pytest.fixture
def generous_timeouts(monkeypatch):
    """The equivalence tables check what is equal, not speed: on a loaded 2-core machine a
    cold sympy path can pass the 1 s production limit."""
    monkeypatch.setattr(M, "ANSWER_TIMEOUT_S", 20.0)
    monkeypatch.setattr(M, "REFERENCE_TIMEOUT_S", 20.0)


# ------------------------------------------------------------------ references

@pytest.mark.parametrize("solution, expected", [
    ("so $\\boxed{5}$.", "5"),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # the last one
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                          # escaped braces do not count
    ("\\boxed{\\boxed{3}}", "3"),                                  # a box in a box
    ("\\boxed{ \\text{(C)} }", "\\text{(C)}"),
    ("\\fbox{7}", "7"),
    ("is \\boxed 5$.", "5"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{}", None),
])
def test_boxed_answer(solution, expected):
    assert M.boxed_answer(solution) == expected


# ------------------------------------------------------------------ equivalence

EQUIVALENCE = [
    # (model answer, reference answer, equal)
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt2}{2}", True),
    ("(1, 2]", "(1,2]", True),
    ("x = 3", "3", True),
    ("3", "3", True),
    ("$3$", "3", True),
    ("\\boxed{3}", "3", True),
    ("3.0", "3", True),
    ("1,000", "1000", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\pi/3", "\\frac{\\pi}{3}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("2, 1", "1,2", True),
    ("\\text{(C)}", "\\text{(C)}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\left( 1, 2 \\right]", "(1,2]", True),
    ("$\\frac{1}{2}$.", "\\frac{1}{2}", True),
    # must not match
    ("0.5", "5", False),
    ("5", "0.5", False),
    ("1/3", "0.33", False),
    ("\\sqrt{2}", "2", False),
    ("(1, 2)", "(1,2]", False),
    ("[1,2]", "(1,2]", False),
    ("x = 4", "3", False),
    ("-3", "3", False),
    ("2", "\\frac{1}{2}", False),
    ("12", "1,2", False),
    ("\\frac{2}{1}", "\\frac{1}{2}", False),
    ("x^2+2x", "(x+1)^2", False),
    ("\\infty", "-\\infty", False),
    ("2\\pi", "\\pi", False),
    ("", "3", False),
    ("three", "3", False),
]


@pytest.mark.parametrize("answer, reference, equal", EQUIVALENCE)
def test_equivalence_table(generous_timeouts, answer, reference, equal):
    assert M.math_equivalent(answer, reference) is equal


@pytest.mark.parametrize("completion, reference, reward", [
    ("We get one half. #### \\frac{1}{2}", "0.5", 1.0),
    ("#### 1/2\nThe end.", "\\frac{1}{2}", 1.0),
    ("####\n\\[\n\\frac{1}{2}\n\\]\nso done", "\\frac{1}{2}", 1.0),  # a display block after the marker
    ("#### 1/2\n#### 0.5", "\\frac{1}{2}", 1.0),                       # equivalent repeated answers
    ("#### 1/2\n#### 3", "\\frac{1}{2}", 0.0),                         # conflicting ones
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 0.0),       # no marker
    ("#### x = 3.", "3", 1.0),
    ("#### 5", "0.5", 0.0),
    ("####", "3", 0.0),
])
def test_completion_rewards(generous_timeouts, completion, reference, reward):
    assert M.math_reward(completion, reference) == reward


def test_task_reward_function_grades_by_the_answer_column_and_logs_its_counters(generous_timeouts):
    reward = get_task("math").reward_function()
    assert reward.__name__ == "math_reward"
    logged = []
    completions = [[{"role": "assistant", "content": "#### 0.5"}], "#### 9^{9^{9^{9}}}", "#### 2"]
    got = reward(completions, answer=["\\frac{1}{2}", "3", "3"], log_metric=lambda k, v: logged.append((k, v)))
    assert got == [1.0, 0.0, 0.0]
    assert dict(logged) == {"math/timeouts": 0.0, "math/refused": 1.0}
    assert reward(["#### 3"], answer=["3"]) == [1.0]  # without log_metric (unsloth's rewrite): still grades


# ------------------------------------------------------------------ never executed, time bounded

MALICIOUS = [
    "9^{9^{9^{9}}}",
    "9^{9^9}",
    "x" * 100_000,
    "1" * 5_000,
    "(10^{9999})^{9999}",
    "((2^{99})^{99})^{99}",
    "10^{100000}",
    "2**10**10**10",
    "100000!",
    "(10^{5})!",
    "\\binom{100000}{50000}",
    "__import__('os').system('touch {target}')",
    "\\boxed{__import__('os').system('touch {target}')}",
    "$().__class__.__bases__[0].__subclasses__()$",
    "eval(\"open('{target}', 'w')\")",
    "lambda: exec('1')",
    "\\frac{" * 100 + "1" + "}" * 100,
    "1,000.5 + 2.5e3 + 50\\% + .5",  # numbers of every form: read without sympify
]


# sympy's own code generation: exec of a template for n variables (no text of ours in it)
CODEGEN_CALLERS = ("sympy/polys/monomials.py",)


@contextlib.contextmanager
def no_text_execution(monkeypatch):
    """sympy's parse_expr (sympify's reader of strings) refuses to run, and so do
    builtins.eval/exec/compile on text, except sympy's own template code generation; code
    objects (sympy's lazy module imports) pass. Yields the list of refused sources."""
    import sys

    import math_verify.parser
    import sympy.parsing.sympy_parser

    forbidden = []

    def refuse_parse_expr(text, *args, **kwargs):
        forbidden.append(f"parse_expr({str(text)[:60]!r})")
        raise AssertionError("model text must never reach parse_expr")

    def guard(original):
        def refuse_text(source, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if isinstance(source, str) and not caller.endswith(CODEGEN_CALLERS):
                forbidden.append(source[:80])
                raise AssertionError("model text must never be evaluated")
            return original(source, *args, **kwargs)
        return refuse_text

    M._answer_parsed.cache_clear()
    M._reference_parsed.cache_clear()
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", refuse_parse_expr)
    monkeypatch.setattr(math_verify.parser, "parse_expr", refuse_parse_expr)
    saved = builtins.eval, builtins.exec, builtins.compile
    builtins.eval, builtins.exec, builtins.compile = map(guard, saved)
    try:
        yield forbidden
    finally:
        builtins.eval, builtins.exec, builtins.compile = saved


def test_malicious_answers_are_refused_or_bounded_and_never_executed(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    M.math_equivalent("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}")  # warm: imports, sympy's lazy modules
    times = {}
    with no_text_execution(monkeypatch) as forbidden:
        for text in MALICIOUS:
            text = text.replace("{target}", str(target))
            for reference in ("3", "\\frac{1}{2}"):
                start = time.perf_counter()
                assert M.math_reward(f"#### {text}", reference) == 0.0
                times[text[:40], reference] = time.perf_counter() - start
    assert not forbidden
    assert not target.exists()
    assert max(times.values()) < 3.0, sorted(times.items(), key=lambda kv: -kv[1])[:3]


def test_the_equivalence_table_runs_without_eval(generous_timeouts, monkeypatch):
    with no_text_execution(monkeypatch) as forbidden:
        got = [M.math_equivalent(answer, reference) for answer, reference, _ in EQUIVALENCE]
    assert not forbidden
    assert got == [equal for _, _, equal in EQUIVALENCE]


@pytest.mark.parametrize("answer", ["9^{9^{9^{9}}}", "9^9^9", "2**10**10", "1000!^{1000}", "x" * 100_000,
                                    "(10^{9999})^{9999}", "100000!",
                                    "\\binom{100000}{50000}", "10^{100000}", "1" * 100])
def test_refusal_rules(answer):
    assert M.refusal(answer) is not None


@pytest.mark.parametrize("answer", ["2^{100}", "x^{10}+x^9+x^8+x^7+x^6", "e^{x^2}", "(2n)!", "10!", "\\binom{10}{3}",
                                    "(x^2)^3", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"])
def test_ordinary_answers_are_not_refused(answer):
    assert M.refusal(answer) is None


def test_a_timeout_scores_zero_and_is_counted(monkeypatch):
    """A comparison that runs past ANSWER_TIMEOUT_S is stopped by the deadline."""
    import math_verify

    def endless_verify(gold, target, **kwargs):
        while True:
            pass

    monkeypatch.setattr(math_verify, "verify", endless_verify)
    before = M.REWARD_STATS["timeouts"]
    start = time.perf_counter()
    assert M.math_equivalent("\\sqrt{7}+y", "\\sqrt{7}+x") is False
    assert time.perf_counter() - start < 3.0
    assert M.REWARD_STATS["timeouts"] == before + 1


def test_the_first_reference_parse_is_bounded_though_it_prepares_math_verify(monkeypatch):
    """The one-time preparation runs before the reference's deadline opens, so it neither
    uses up that budget nor, with its own deadline, switches it off: a slow first reference
    parse gets its full REFERENCE_TIMEOUT_S, and no more."""
    import math_verify

    real_parse, ran = math_verify.parse, []

    def slow_parse(text, **kwargs):
        # the warm-up's two parses take longer than the reference's budget, the reference 8 s
        reference, start = "slowref" in text, time.perf_counter()
        try:
            while time.perf_counter() - start < (8.0 if reference else 0.4):
                time.sleep(0.02)
        finally:
            if reference:
                ran.append(time.perf_counter() - start)
        return [] if reference else real_parse(text, **kwargs)

    monkeypatch.setattr(math_verify, "parse", slow_parse)
    monkeypatch.setattr(M, "_prepared", False)
    monkeypatch.setattr(M, "WARM_UP", (("\\frac{1}{2}", "0.5"),))
    monkeypatch.setattr(M, "REFERENCE_TIMEOUT_S", 0.5)
    before = M.REWARD_STATS["timeouts"]
    assert M.math_equivalent("\\sqrt{7}+y", "\\sqrt{7}+\\text{slowref}") is False
    assert M._prepared and len(ran) == 1 and 0.3 < ran[0] < 4.0
    assert M.REWARD_STATS["timeouts"] == before + 1


def test_a_nested_deadline_leaves_the_outer_one_running():
    from math_verify.errors import TimeoutException

    start = time.perf_counter()
    with pytest.raises(TimeoutException):
        with M.deadline(0.5):
            with M.deadline(60):
                pass
            while time.perf_counter() - start < 8.0:
                time.sleep(0.02)
    assert time.perf_counter() - start < 4.0


def test_outside_the_main_thread_no_alarm_is_set(generous_timeouts):
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(M.math_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}")))
    thread.start()
    thread.join(60)
    assert results == [True]


# ------------------------------------------------------------------ data


def test_math_folder_jsonl_parquet_and_math500_layouts(tmp_path):
    import datasets

    task = get_task("math")
    root = write_math_folder(tmp_path / "MATH")
    write_math_folder(tmp_path / "MATH", "test", PROBLEMS[:2])
    for path, split, count in ((root, "train", 5), (root, "test", 2), (root / "train", "train", 5)):
        dataset = task.load(str(path), split)
        assert len(dataset) == count and {"question", "answer"} <= set(dataset.column_names)
        assert sorted(dataset["answer"]) == sorted(REFERENCES[:count])
    write_jsonl(PROBLEMS, tmp_path / "train.jsonl")
    datasets.Dataset.from_list(PROBLEMS).to_parquet(str(tmp_path / "train.parquet"))
    for path in (tmp_path / "train.jsonl", tmp_path / "train.parquet"):
        dataset = task.load(str(path), "train")
        assert dataset["answer"] == REFERENCES and dataset["question"] == [p["problem"] for p in PROBLEMS]
    math500 = [{"problem": p["problem"], "solution": p["solution"], "answer": ref, "subject": p["type"],
                "level": 1, "unique_id": f"test/{n}.json"} for n, (p, ref) in enumerate(zip(PROBLEMS, REFERENCES))]
    math500[0]["answer"] = "2"
    write_jsonl(math500, tmp_path / "math500.jsonl")
    dataset = task.load(str(tmp_path / "math500.jsonl"), "test")
    assert dataset["answer"] == REFERENCES
    prompt = task.with_prompts(dataset)[0]["prompt"]
    assert prompt[0]["role"] == "system" and "####" in prompt[0]["content"]
    assert prompt[1]["content"] == PROBLEMS[0]["problem"]


def test_the_hub_loader_reads_every_subject(monkeypatch):
    import datasets

    import hrpo.tasks.math as module

    asked = []

    def fake_load_rows(path, split, hub_config=None, expected=""):
        asked.append((path, hub_config, split))
        return datasets.Dataset.from_list([PROBLEMS[0]])

    monkeypatch.setattr(module, "load_rows", fake_load_rows)
    dataset = get_task("math").load("EleutherAI/hendrycks_math", "train")
    assert asked == [("EleutherAI/hendrycks_math", s, "train") for s in M.MATH_SUBJECTS] and len(dataset) == 7
    asked.clear()
    get_task("math").load("math500", "test")
    assert asked == [("HuggingFaceH4/MATH-500", None, "test")]


def test_bad_math_data_is_named_with_file_and_row(tmp_path):
    task = get_task("math")
    rows = PROBLEMS[:2] + [{"problem": "No answer?", "solution": "It is 4."}]
    write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: the solution has no \\boxed"):
        task.load(str(tmp_path / "bad.jsonl"), "train")
    root = write_math_folder(tmp_path / "MATH", "train", PROBLEMS[:1] + [{**PROBLEMS[1], "solution": "no box"}])
    with pytest.raises(DataError, match=r"row 1 \(prealgebra/1\.json\): the solution has no"):
        task.load(str(root), "train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        task.load(str(tmp_path / "empty.jsonl"), "train")
    write_jsonl([{"text": "x"}], tmp_path / "other.jsonl")
    with pytest.raises(DataError, match="expected the columns 'problem'"):
        task.load(str(tmp_path / "other.jsonl"), "train")
    write_jsonl([{"problem": " ", "solution": "\\boxed{1}"}], tmp_path / "blank.jsonl")
    with pytest.raises(DataError, match=r"blank\.jsonl, row 0: the problem is empty"):
        task.load(str(tmp_path / "blank.jsonl"), "train")


def test_plain_numbers_take_the_exact_path():
    assert M.plain_number("1,000") == 1000 and M.plain_number("$-\\frac{3}{4}$") == Fraction(-3, 4)
    assert M.plain_number(".5") == Fraction(1, 2) and M.plain_number("2^{10}") is None
    assert M.plain_number("x = 3") is None and M.plain_number("1,2") is None


def test_time_math_reward_script_smoke_run():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "scripts.time_math_reward", "--count", "20"], capture_output=True,
                          text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median" in proc.stdout
