"""Multiple-choice STEM questions (task ``mmlu``): the answer is a letter after ``####``.

Data (``--dataset_path``): a hub dataset, by name or alias, or a local ``.jsonl``/``.json``/
``.parquet`` in any of the layouts below (recognised by its columns).

    name (alias)                                  layout     split used
    cais/mmlu (mmlu)                              MMLU       train: config auxiliary_train; else config all
    TIGER-Lab/MMLU-STEM (mmlu-stem)               MMLU       test (its only split)
    allenai/ai2_arc (arc-challenge; arc-easy)     ARC        config ARC-Challenge (ARC-Easy)
    allenai/openbookqa (openbookqa)               OBQA       config main
    allenai/qasc (qasc)                           ARC        test -> validation (its test has no answers)

    MMLU  question, choices (a list), answer (index 0.., or a letter); auxiliary_train's rows
          wrapped in a ``train`` field are unwrapped
    ARC   question, choices {text, label}, answerKey (a label: "A".. or "1"..); QASC's fact1/fact2
          are not shown (the question alone, as in the other sets)
    OBQA  question_stem, choices {text, label}, answerKey

Every row becomes ``question`` (the question, then one line per choice: "A. ...", and the
instruction to answer with the letter), ``answer`` (the reference letter) and
``num_choices``. Bad rows (an empty question, fewer than two choices, a reference outside
the choices) are a DataError naming the dataset and row, before training.

Grading: the answer after a marker is read from its first non-empty line: the letter
alone, "(B)", "B.", "B)", "B:", "B) text", "B text", also inside ``**``, ``$``,
``\\boxed{}`` or ``\\text{}``; a lower-case letter only when it stands alone ("b", "(b)",
"b."). Only the question's choices count (its ``num_choices``; any letter where that is
not known). A line that starts otherwise is read as a sentence, and so is one that starts
with an English word: "A" or "I" before a lower-case word ("A good choice", "I think"; but
"A is", "A was", "A or", "A and" are the letter). A sentence's answer is its one standalone
capital choice letter ("A good choice would be C": C; "I think B": B), or else, when no
other letter stands there, the leading "A" or "I" itself ("A cat": A). Nothing ambiguous is
accepted: two different letters in one answer ("B or C", "A/B", "(B) and (C)", a sentence
naming two) or different letters after several markers give no answer (0). A letter
outside the question's choices is no answer (0).
"""
from __future__ import annotations

import re

from ..data import DataError, load_rows
from ..rewards import ANSWER_MARKER
from .base import Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the letter of the correct choice."

# --dataset_path name -> (hub name, config for a split, split actually read)
SOURCES = {
    "cais/mmlu": lambda split: ("cais/mmlu", "auxiliary_train" if split == "train" else "all", split),
    "TIGER-Lab/MMLU-STEM": lambda split: ("TIGER-Lab/MMLU-STEM", None, split),
    "allenai/ai2_arc": lambda split: ("allenai/ai2_arc", "ARC-Challenge", split),
    "allenai/ai2_arc:ARC-Easy": lambda split: ("allenai/ai2_arc", "ARC-Easy", split),
    "allenai/openbookqa": lambda split: ("allenai/openbookqa", "main", split),
    "allenai/qasc": lambda split: ("allenai/qasc", None, "validation" if split == "test" else split),
}
ALIASES = {"mmlu": "cais/mmlu", "mmlu-stem": "TIGER-Lab/MMLU-STEM", "arc-challenge": "allenai/ai2_arc",
           "arc-easy": "allenai/ai2_arc:ARC-Easy", "openbookqa": "allenai/openbookqa", "qasc": "allenai/qasc"}
EVAL_ONLY = {"TIGER-Lab/MMLU-STEM": "test"}


def format_question(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {str(text).strip()}" for i, text in enumerate(choices)]
    return "\n".join(lines + ["", INSTRUCTION])


# ------------------------------------------------------------------ layouts

def _layout(columns) -> str | None:
    columns = set(columns)
    if "question_stem" in columns and "choices" in columns and "answerKey" in columns:
        return "obqa"
    if {"question", "choices", "answerKey"} <= columns:
        return "arc"
    if {"question", "choices", "answer"} <= columns:
        return "mmlu"
    if columns == {"train"}:
        return "wrapped"
    return None


def _reference_index(value, labels: list[str], where: str) -> int:
    """The index of the reference in the choices, from a label ("B", "2"), a letter or an index."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: the answer is missing")
    if isinstance(value, int):
        index = value
    else:
        text = str(value).strip()
        if text in labels:
            index = labels.index(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
        elif text.lstrip("-").isdigit():
            index = int(text)
        else:
            raise DataError(f"{where}: the answer {value!r} is not one of the choices' labels {labels}")
    if not 0 <= index < len(labels):
        raise DataError(f"{where}: the answer {value!r} is outside the {len(labels)} choices "
                        f"({', '.join(labels)})")
    return index


def normalise_row(row: dict, layout: str, where: str) -> dict:
    """One row of any layout as {question, answer, num_choices}."""
    if layout == "wrapped":
        row = row["train"]
        if not isinstance(row, dict):
            raise DataError(f"{where}: the 'train' field is not a question record")
        layout = "mmlu"
    question = row.get("question_stem" if layout == "obqa" else "question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: the question is empty")
    choices = row.get("choices")
    if layout == "mmlu":
        if not isinstance(choices, (list, tuple)):
            raise DataError(f"{where}: 'choices' should be a list of answer texts, found {type(choices).__name__}")
        texts = list(choices)
        labels = list(LETTERS[:len(texts)])
        reference = row.get("answer")
    else:
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), (list, tuple)):
            raise DataError(f"{where}: 'choices' should be {{'text': [...], 'label': [...]}}, found {choices!r:.80}")
        texts = list(choices["text"])
        labels = [str(label).strip() for label in (choices.get("label") or LETTERS[:len(texts)])]
        if len(labels) != len(texts):
            raise DataError(f"{where}: {len(texts)} choice texts but {len(labels)} labels")
        reference = row.get("answerKey")
    if len(texts) > len(LETTERS):
        raise DataError(f"{where}: {len(texts)} choices, at most {len(LETTERS)} are supported")
    if len(texts) < 2:
        raise DataError(f"{where}: {len(texts)} choice(s); a multiple-choice question needs at least two")
    index = _reference_index(reference, labels, where)
    return {"question": format_question(question, texts), "answer": LETTERS[index], "num_choices": len(texts)}


def normalise_rows(dataset, name: str) -> list[dict]:
    if len(dataset) == 0:
        raise DataError(f"dataset {name} (0 rows): it is empty")
    layout = _layout(dataset.column_names)
    if layout is None:
        raise DataError(f"dataset {name}: unknown multiple-choice layout, columns {dataset.column_names}; expected "
                        f"MMLU's (question, choices, answer), ARC's or QASC's (question, choices {{text, label}}, "
                        f"answerKey) or OpenBookQA's (question_stem, choices {{text, label}}, answerKey)")
    return [normalise_row(row, layout, f"dataset {name}, row {index}") for index, row in enumerate(dataset)]


def load_mc(dataset_path: str, split: str = "train"):
    """A checked `datasets.Dataset` with ``question``, ``answer`` (a letter) and ``num_choices``."""
    import datasets

    name = ALIASES.get(dataset_path, dataset_path)
    if name in SOURCES:
        hub, config, read_split = SOURCES[name](split)
        only = EVAL_ONLY.get(name)
        if only is not None and split != only:
            raise DataError(f"--dataset_path {dataset_path}: an evaluation set with only the {only!r} split "
                            f"(asked for {split!r}); train on cais/mmlu or a local file")
        if read_split != split:
            print(f"[hrpo] {hub}: reading split {read_split!r} for {split!r} (its {split} split has no answers)")
        dataset = load_rows(hub, read_split, hub_config=config, expected="multiple-choice")
        label = hub + (f" (config {config})" if config else "")
    else:
        dataset = load_rows(dataset_path, split, expected="multiple-choice (MMLU, ARC, OpenBookQA or QASC layout)")
        label = dataset_path
    return datasets.Dataset.from_list(normalise_rows(dataset, label))


# ------------------------------------------------------------------ answers

_WRAPPERS = re.compile(r"\*\*|__|`|\$|\\boxed\{|\\text(?:bf)?\{|\\mathrm\{|[{}]")
_PREFIX = re.compile(r"^(?:the\s+)?(?:(?:final|correct)\s+)*(?:answer|choice|option)\s*(?:is\s*)?:?\s*", re.I)
_LEAD = re.compile(r"[(\[]([A-Za-z])[)\]]|([A-Za-z])(?=[.):,]|\s|$)")
_OTHER = re.compile(r"[(\[]([A-Z])[)\]]|(?:\bor|\band|/|,|&)\s*([A-Z])(?![A-Za-z])")
_WORD = re.compile(r"(?:A\s+(?!(?:is|was)\b)|I\s+)(?!(?:or|and)\b)[a-z]")  # "A good choice", "I think": words
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’])[A-Z](?![A-Za-z0-9'’])")


def _sentence_letter(text: str, valid: str) -> str | None:
    """A sentence's one standalone choice letter, else its leading word-like "A" or "I" (see the module's rules)."""
    letters = {m.group() for m in _STANDALONE.finditer(text) if m.group() in valid and not _WORD.match(text, m.start())}
    if not letters and _WORD.match(text):
        letters = {text[0]} & set(valid)
    return letters.pop() if len(letters) == 1 else None


def _letter_of(segment: str, valid: str = LETTERS) -> str | None:
    """The letter of one answer (its first non-empty line) among the ``valid`` letters, or None
    (see the module's rules)."""
    lines = [line.strip() for line in segment.splitlines() if line.strip()]
    if not lines:
        return None
    text = _PREFIX.sub("", _WRAPPERS.sub("", lines[0]).strip())
    lead = _LEAD.match(text)
    letter = lead and (lead.group(1) or lead.group(2))
    rest = text[lead.end():] if lead else ""
    if (letter is None or _WORD.match(text) or letter.upper() not in valid
            or (letter.islower() and rest.strip(" .):"))):  # a lower-case letter counts only alone: "b", "(b)"
        return _sentence_letter(text, valid)
    letter = letter.upper()
    for match in _OTHER.finditer(rest):  # another choice named: "B or C", "(B) and (C)", "B, C"
        if (match.group(1) or match.group(2)) in set(valid) - {letter}:
            return None
    return letter


def extract_letter(completion: str, marker: str = ANSWER_MARKER, num_choices: int | None = None) -> str | None:
    """The choice letter after the marker(s), among the first ``num_choices`` letters (all
    when None); None when there is none, or answers disagree."""
    if not isinstance(completion, str) or marker not in completion:
        return None
    valid = LETTERS[:num_choices] if num_choices else LETTERS
    letters = {_letter_of(segment, valid) for segment in completion.split(marker)[1:]} - {None}
    return letters.pop() if len(letters) == 1 else None


def mc_reward(completion: str, reference: str) -> float:
    letter = extract_letter(completion)
    return 1.0 if letter is not None and letter == str(reference).strip().upper() else 0.0


class ChoiceTask(Task):
    """A Task whose grading reads the answer among the row's choices (``extract`` alone
    cannot know how many there are)."""

    def grade(self, completion: str, row: dict) -> dict:
        letter = extract_letter(completion, self.answer_marker, row.get("num_choices"))
        expected = self.reference(row)
        return {"predicted": letter, "reference": expected, "correct": letter is not None and letter == expected}


TASK = ChoiceTask(
    name="mmlu",
    answer_marker=ANSWER_MARKER,
    default_dataset="cais/mmlu",
    load=load_mc,
    extract=extract_letter,
    reference=lambda row: row["answer"],
    reference_columns=("answer", "num_choices"),
)
