"""MATH: competition mathematics, answer after ``####``, graded by mathematical equivalence.

Data (``--dataset_path``):

- ``EleutherAI/hendrycks_math`` (alias ``math``): the seven subject configs, concatenated;
  splits train and test. ``HuggingFaceH4/MATH-500`` (alias ``math500``): split test.
- a local copy of MATH as released: a folder ``<root>/<split>/<subject>/<n>.json`` (each
  with ``problem``, ``solution``, ``level``, ``type``); ``--dataset_path`` is ``<root>``
  (or ``<root>/<split>`` itself).
- a local ``.jsonl``/``.json``/``.parquet`` with ``problem`` (or ``question``) and
  ``solution`` and/or ``answer``.

Rows become ``question`` (the problem) and ``answer`` (the reference answer: the ``answer``
column where there is one, else the content of the solution's last ``\\boxed{...}``).

Grading. The model's answer is the first non-empty line after a ``####`` (a display block
opened on that line, ``\\[``, ``$$`` or ``\\(``, runs to its end); several markers must all
give answers equivalent to the reference. An answer equals the reference when:

1. both are plain numbers ("0.5", "1/2", "-3", "1,000", ``\\frac{1}{2}``) with equal exact
   values (``hrpo.rewards.parse_number``, no sympy), or
2. their normalised texts are identical, or
3. math-verify finds them equivalent, parsing both as LaTeX only (``LatexExtractionConfig``;
   its ``ExprExtractionConfig`` path runs sympy's ``parse_expr``, i.e. ``eval``, on model text).

Model text is never executed: latex2sympy's number reading, which goes through sympy's
``eval``-based ``sympify``, is replaced by a direct conversion. Time per answer is bounded:
answers longer than ``MAX_ANSWER_CHARS``, with digit runs longer than ``MAX_DIGITS``, powers
whose exponents multiply past ``MAX_EXPONENT``, a power tower with digits in its exponent,
or a factorial or binomial of a large number are refused before parsing (score 0, counted as ``refused``):
those are the inputs whose evaluation is one long big-integer operation that no signal can
interrupt. What is left runs under one wall-time budget per answer, ``ANSWER_TIMEOUT_S``
(1 s) for parsing it and comparing, enforced by a real-time interval timer (``deadline``;
math-verify's own limits are whole seconds per call, so parse + compare could take 2 s or
more); a reference is parsed once, within ``REFERENCE_TIMEOUT_S``. A timeout scores 0 and
is counted as ``timeouts``. Signals reach the main thread only (where TRL calls reward
functions); in another thread the refusal rules are the only bound. ``REWARD_STATS`` holds
the counts; the reward function logs each batch's counts as ``math/timeouts`` and
``math/refused`` through TRL's ``log_metric``.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from ..data import DataError, load_rows
from ..rewards import ANSWER_MARKER, parse_number
from .base import Task

HUB_MATH = "EleutherAI/hendrycks_math"
HUB_MATH500 = "HuggingFaceH4/MATH-500"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
ALIASES = {"math": HUB_MATH, "math500": HUB_MATH500, "math-500": HUB_MATH500}

MAX_ANSWER_CHARS = 300     # MATH's longest reference answers are matrices of ~100 characters
MAX_DIGITS = 60            # a longer run of digits is not an answer
MAX_EXPONENT = 10_000      # product of the exponents along a chain of powers: ((a^b)^c) -> b*c
MAX_FACTORIAL = 1_000      # n! and binomials of larger numbers are refused
MAX_DISTINCT_ANSWERS = 3   # more different answers after markers: no answer
ANSWER_TIMEOUT_S = 1.0     # wall time to parse a model answer and compare it (deadline())
REFERENCE_TIMEOUT_S = 5.0  # to parse a reference answer, once per distinct reference (cached)

REWARD_STATS: Counter = Counter()  # "graded", "timeouts", "refused": since the process started


# ------------------------------------------------------------------ references

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (escaped ``\\{``, ``\\}`` do not
    count), or None when it is never closed."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxed_answer(solution: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` (or ``\\fbox{...}``, or
    ``\\boxed x``) of a solution, nested braces included; None when there is none."""
    if not isinstance(solution, str):
        return None
    found, i = None, 0
    while True:
        starts = [(solution.find(c, i), c) for c in _BOX_COMMANDS]
        starts = [(s, c) for s, c in starts if s >= 0]
        if not starts:
            return found
        start, command = min(starts)
        j = start + len(command)
        if j < len(solution) and (solution[j].isalpha()):  # \boxedsomething: another command
            i = j
            continue
        while j < len(solution) and solution[j] == " ":
            j += 1
        if j < len(solution) and solution[j] == "{":
            end = match_brace(solution, j)
            if end is None:
                return found
            content, i = solution[j + 1:end], end + 1
        elif command == "\\boxed" and j > start + len(command):  # "\boxed 5": up to the next space or "$"
            match = re.match(r"[^\s$]+", solution[j:])
            if match is None:
                i = j
                continue
            content, i = match.group(0), j + match.end()
        else:
            i = j
            continue
        content = content.strip()
        while content.startswith(_BOX_COMMANDS) and "{" in content:  # \boxed{\boxed{3}}
            brace = content.index("{")
            if content[:brace].strip() not in _BOX_COMMANDS or match_brace(content, brace) != len(content) - 1:
                break
            content = content[brace + 1:-1].strip()
        if content:
            found = content


# ------------------------------------------------------------------ the model's answer

_DISPLAY_CLOSERS = {"\\[": "\\]", "$$": "$$", "\\(": "\\)"}


def _answer_of(segment: str) -> str | None:
    """One answer: the first non-empty line of the text after a marker; a display block
    opened at its start runs to its closing delimiter."""
    lines = [line.strip() for line in segment.splitlines() if line.strip()]
    if not lines:
        return None
    first = lines[0]
    for opener, closer in _DISPLAY_CLOSERS.items():
        if first.startswith(opener) and closer not in first[len(opener):]:
            block = [first]
            for line in lines[1:]:
                block.append(line)
                if closer in line:
                    break
            first = " ".join(block)
            break
    return first.rstrip(".").strip() or None


def extract_math_answer(completion: str, marker: str = ANSWER_MARKER) -> str | tuple[str, ...] | None:
    """The answer after the marker(s): one string, or a tuple of the distinct answers when
    several markers gave different texts (each must then equal the reference); None when
    there is no marker, no answer, or more than MAX_DISTINCT_ANSWERS different ones."""
    if not isinstance(completion, str) or marker not in completion:
        return None
    answers = []
    for segment in completion.split(marker)[1:]:
        answer = _answer_of(segment)
        if answer is not None and answer not in answers:
            answers.append(answer)
    if not answers or len(answers) > MAX_DISTINCT_ANSWERS:
        return None
    return answers[0] if len(answers) == 1 else tuple(answers)


# ------------------------------------------------------------------ refusal rules

_DIGIT_RUN = re.compile(r"\d{%d,}" % (MAX_DIGITS + 1))
_INTEGER = re.compile(r"\d+")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_VARIABLE = re.compile(r"[A-Za-z]")
_OPENERS = {")": "(", "}": "{", "]": "["}


def _group_start(text: str, close_at: int) -> int:
    """Start of the bracket group that ends at ``close_at`` (or ``close_at`` when unmatched)."""
    closer = text[close_at]
    opener, depth = _OPENERS[closer], 0
    for i in range(close_at, -1, -1):
        if text[i] == closer:
            depth += 1
        elif text[i] == opener:
            depth -= 1
            if depth == 0:
                return i
    return close_at


def _exponent_span(text: str, caret: int) -> tuple[int, int]:
    """(start, end) of the exponent after the ``^`` at ``caret``: a brace group, a command
    name, or one character."""
    i = caret + 1
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = match_brace(text, i)
        return i + 1, (len(text) if end is None else end)
    if i < len(text) and text[i] == "\\":
        match = re.match(r"\\[A-Za-z]+", text[i:])
        return i, i + (match.end() if match else 1)
    digits = re.match(r"\d+", text[i:])  # "2^10": LaTeX reads 2^1 0, a model may mean 2^10; count 10
    return i, i + (digits.end() if digits else min(1, len(text) - i))


def _literal_product(text: str) -> int:
    """Product of the integers written in ``text`` (at least 1): an upper bound on what they
    can make, capped just above MAX_EXPONENT."""
    product = 1
    for token in _INTEGER.findall(text):
        product *= max(int(token), 1)
        if product > MAX_EXPONENT:
            return MAX_EXPONENT + 1
    return product


def refusal(answer: str) -> str | None:
    """Why this answer is refused before any parsing, or None (see the module's rules)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _DIGIT_RUN.search(answer):
        return f"a number of more than {MAX_DIGITS} digits"
    text = answer.replace("**", "^")
    loads: dict[int, int] = {}  # caret position -> product of the exponents of its chain
    for caret in (i for i, ch in enumerate(text) if ch == "^"):
        start, end = _exponent_span(text, caret)
        exponent = text[start:end]
        if "^" in exponent and not _VARIABLE.search(_COMMAND.sub("", exponent)):
            return "a power tower"  # a numeric exponent that is itself a power: 9^{9^{9}}
        after = end + 1 if end < len(text) and text[end] == "}" else end
        if text[after:].lstrip().startswith("^"):
            return "a power tower"  # chained superscripts: 9^9^9
        load = _literal_product(exponent)
        base_end = caret - 1
        while base_end >= 0 and text[base_end] == " ":
            base_end -= 1
        if base_end >= 0 and text[base_end] == "!" and load > 100:
            return "a large power of a factorial"
        if base_end >= 0 and text[base_end] in _OPENERS:
            base_start = _group_start(text, base_end)
            inner = max((v for k, v in loads.items() if base_start <= k < base_end), default=1)
            load *= inner
        if load > MAX_EXPONENT:
            return f"exponents multiplying past {MAX_EXPONENT}"
        loads[caret] = load
    for match in _FACTORIAL.finditer(text):
        if int(match.group(1)) > MAX_FACTORIAL:
            return f"the factorial of a number above {MAX_FACTORIAL}"
    for bang in (i for i, ch in enumerate(text) if ch == "!" and i > 0):
        before = bang - 1
        while before >= 0 and text[before] == " ":
            before -= 1
        if before >= 0 and text[before] in _OPENERS:
            group = text[_group_start(text, before):before]
            if "^" in group or _literal_product(group) > MAX_FACTORIAL:
                return "the factorial of a large expression"
    if ("binom" in text or "choose" in text) and any(int(t) > MAX_FACTORIAL for t in _INTEGER.findall(text)):
        return f"a binomial of a number above {MAX_FACTORIAL}"
    return None


# ------------------------------------------------------------------ equivalence

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_PLAIN_FRAC = re.compile(r"[-+]?\\[dt]?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\}")
_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|\s+")


def _unwrap(text: str) -> str:
    """Outer ``$...$``, ``\\(...\\)``, ``\\[...\\]`` and ``\\boxed{...}`` removed."""
    text = text.strip()
    for _ in range(3):
        before = text
        for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(text) > len(opener) + len(closer) and text.startswith(opener) and text.endswith(closer):
                text = text[len(opener):-len(closer)].strip()
        if text.startswith(_BOX_COMMANDS):
            inner = boxed_answer(text)
            if inner is not None and text.rstrip().endswith("}") and text.count("\\boxed") + text.count("\\fbox") == 1:
                text = inner
        text = text.rstrip(".").strip()
        if text == before:
            break
    return text


def plain_number(text: str) -> Fraction | None:
    """The exact value of an answer that is only a number, else None."""
    text = _unwrap(text)
    if _PLAIN_NUMBER.fullmatch(text) or _PLAIN_FRAC.fullmatch(text):
        return parse_number(text)
    return None


def _normalised(text: str) -> str:
    return _SPACING.sub("", _unwrap(text)).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _as_latex(text: str) -> str:
    """Text math-verify's LaTeX extraction reads: as is when it has a math delimiter or a
    box, else wrapped in ``\\boxed{}`` (so "1/2", "x = 3" and "0.5" parse as LaTeX)."""
    if any(d in text for d in ("$", "\\(", "\\[", "\\boxed", "\\fbox")):
        return text
    return "\\boxed{" + text + "}"


_NUMBER_TOKEN = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _install_eval_free_numbers() -> None:
    """latex2sympy reads a number token with ``sympy.Number(text)``, i.e. ``sympify`` ->
    ``parse_expr`` -> ``eval``. The token is digits by the lexer's rules, but nothing of
    the model's text is to reach ``eval``: read it as sympy's auto_number would (Integer for
    digits, Float otherwise), directly."""
    import sympy
    from latex2sympy2_extended import latex2sympy2

    converter = latex2sympy2._Latex2Sympy
    if getattr(converter.parse_number, "eval_free", False):
        return

    def parse_number(self, text):
        text = text.replace(",", "")
        if text.isdigit():
            return sympy.Integer(int(text))
        if not _NUMBER_TOKEN.fullmatch(text):
            raise ValueError(f"not a number token: {text[:20]!r}")
        return sympy.Float(text)

    parse_number.eval_free = True
    converter.parse_number = parse_number


WARM_UP = (("\\frac{1}{2}", "0.5"), ("(1, 2]", "(1,2]"), ("x = 3", "3"), ("(x+1)^2", "x^2+2x+1"),
           ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\{1,2\\}"))
_prepared = False


@contextmanager
def deadline(seconds: float):
    """Raise math-verify's TimeoutException (a BaseException: no ``except Exception`` in
    sympy or math-verify swallows it) when the block runs longer than ``seconds`` of wall
    time: a real-time interval timer (sub-second, unlike math-verify's whole-second
    ``signal.alarm``), one budget for everything inside, firing again every 0.1 s until
    the block is left. Nested in another deadline, the block gets at most the outer one's
    time left, and the outer timer runs on afterwards. Signals reach the main thread
    only: elsewhere the block runs unbounded (the refusal rules still apply)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from math_verify.errors import TimeoutException

    def expire(signum, frame):
        raise TimeoutException(f"over {seconds} s")

    outer, outer_interval = signal.getitimer(signal.ITIMER_REAL)  # (0, 0) when no timer is set
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    # and again every 0.1 s, should anything swallow it
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001), outer_interval)


def _prepare() -> None:
    """Once per process: the eval-free number reader, math-verify's own (whole-second,
    per-call) alarms off in favour of ``deadline``, then a few known answers parsed and
    compared, so that the first model answers do not pay for math-verify's and sympy's
    lazy set-up (parsers, modules) inside their time budget."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    _install_eval_free_numbers()
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True  # off on purpose
    from math_verify import verify

    for answer, reference in WARM_UP:
        try:
            with deadline(60):
                gold, target = _mv_parse(reference), _mv_parse(answer)
                if gold and target:
                    verify(gold[0], target[0], timeout_seconds=None)
        except BaseException as err:  # noqa: BLE001  (a warm-up only; let Ctrl-C through)
            if isinstance(err, KeyboardInterrupt):
                raise


def _mv_parse(text: str):
    """math-verify's parse, LaTeX only, no time limit of its own (the caller's deadline
    applies); [] when it cannot be read."""
    from math_verify import LatexExtractionConfig, parse

    _prepare()
    try:
        return parse(_as_latex(text), extraction_config=[LatexExtractionConfig()], fallback_mode="no_fallback",
                     parsing_timeout=None, raise_on_error=True)
    except Exception:  # noqa: BLE001  (anything but a timeout: not parseable)
        return []


@lru_cache(maxsize=4096)
def _reference_parsed(reference: str):
    _prepare()  # before the deadline: the warm-up has its own, and must not use up this one
    with deadline(REFERENCE_TIMEOUT_S):
        return tuple(_mv_parse(reference))


@lru_cache(maxsize=256)
def _answer_parsed(answer: str):
    return tuple(_mv_parse(answer))


def _mv_equivalent(answer: str, reference: str) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        gold = _reference_parsed(reference)
        with deadline(ANSWER_TIMEOUT_S):
            target = _answer_parsed(answer)
            return bool(gold and target) and verify(gold[0], target[0], timeout_seconds=None, raise_on_error=True)
    except TimeoutException:
        REWARD_STATS["timeouts"] += 1
        return False
    except Exception:  # noqa: BLE001  (sympy could not compare them)
        return False


def math_equivalent(answer, reference) -> bool:
    """Whether the model's answer (a string, or a tuple of several) equals the reference
    answer (see the module's grading rules)."""
    if isinstance(answer, tuple):
        return bool(answer) and all(math_equivalent(a, reference) for a in answer)
    if not isinstance(answer, str) or not isinstance(reference, str) or not answer.strip() or not reference.strip():
        return False
    REWARD_STATS["graded"] += 1
    if refusal(answer) is not None:
        REWARD_STATS["refused"] += 1
        return False
    expected, got = plain_number(reference), plain_number(answer)
    if expected is not None and got is not None:
        return expected == got
    if _normalised(answer) == _normalised(reference):
        return True
    return _mv_equivalent(answer, reference)


def math_reward(completion: str, reference: str) -> float:
    """1.0 when the completion's answer after ``####`` equals the reference answer, else 0.0."""
    answer = extract_math_answer(completion)
    return 1.0 if answer is not None and math_equivalent(answer, reference) else 0.0


# ------------------------------------------------------------------ data

def _question_column(columns) -> str | None:
    return "problem" if "problem" in columns else "question" if "question" in columns else None


def normalise_math_rows(rows, name: str, row_names=None) -> list[dict]:
    """Rows of any accepted layout as {question, answer, solution}; a row without a
    problem or without a reference answer is a DataError naming it."""
    out = []
    for index, row in enumerate(rows):
        where = f"dataset {name}, row {index}" + (f" ({row_names[index]})" if row_names else "")
        key = _question_column(row)
        question = row.get(key) if key else None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: the problem is empty or missing (expected a 'problem' or 'question' field)")
        solution = row.get("solution") if isinstance(row.get("solution"), str) else ""
        answer = row.get("answer")
        answer = answer.strip() if isinstance(answer, str) and answer.strip() else boxed_answer(solution)
        if not answer:
            what = "the solution has no \\boxed{...} answer" if solution else "there is no 'solution' or 'answer'"
            raise DataError(f"{where}: {what} (expected a MATH solution ending in \\boxed{{answer}})")
        out.append({"question": question, "answer": answer, "solution": solution})
    return out


def _json_folder(path: Path, split: str) -> Path | None:
    """The folder of per-problem JSON files for this split: ``<path>/<split>`` or ``path``."""
    for root in (path / split, path):
        if root.is_dir() and any(root.glob("*/*.json")):
            return root
    return None


def _problem_order(file: Path):
    return (file.parent.name, int(file.stem) if file.stem.isdigit() else 0, file.stem)


def _load_json_folder(root: Path) -> tuple[list[dict], list[str]]:
    rows, names = [], []
    for file in sorted(root.glob("*/*.json"), key=_problem_order):
        try:
            rows.append(json.loads(file.read_text()))
        except (OSError, ValueError) as err:
            raise DataError(f"dataset {file}: cannot be read as JSON ({err})") from err
        if not isinstance(rows[-1], dict):
            raise DataError(f"dataset {file}: expected a JSON object with 'problem' and 'solution'")
        names.append(str(file.relative_to(root)))
    return rows, names


def _load_hub_math(split: str) -> list[dict]:
    rows = []
    for subject in MATH_SUBJECTS:
        dataset = load_rows(HUB_MATH, split, hub_config=subject, expected="MATH-format")
        rows.extend(normalise_math_rows(dataset, f"{HUB_MATH} (config {subject})"))
    return rows


def load_math(dataset_path: str, split: str = "train"):
    """A checked `datasets.Dataset` with ``question``, ``answer`` and ``solution``."""
    import datasets

    dataset_path = ALIASES.get(dataset_path, dataset_path)
    path = Path(dataset_path)
    if dataset_path == HUB_MATH:
        rows = _load_hub_math(split)
    elif path.is_dir() and _json_folder(path, split) is not None:
        root = _json_folder(path, split)
        raw, names = _load_json_folder(root)
        rows = normalise_math_rows(raw, str(root), names)
    else:
        dataset = load_rows(dataset_path, split, expected="MATH-format (problem, solution)")
        if _question_column(dataset.column_names) is None or not {"solution", "answer"} & set(dataset.column_names):
            raise DataError(f"dataset {dataset_path}: expected the columns 'problem' (or 'question') and "
                            f"'solution' (or 'answer'), found {dataset.column_names}")
        rows = normalise_math_rows(dataset, dataset_path)
    if not rows:
        raise DataError(f"dataset {dataset_path} (0 rows): it is empty")
    return datasets.Dataset.from_list(rows)


TASK = Task(
    name="math",
    answer_marker=ANSWER_MARKER,
    default_dataset=HUB_MATH,
    load=load_math,
    extract=extract_math_answer,
    reference=lambda row: row["answer"],
    equivalent=math_equivalent,
    counters=REWARD_STATS,
    logged_counters=("timeouts", "refused"),
)
