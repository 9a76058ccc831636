"""The multiple-choice task (mmlu): letter answers, the layouts of MMLU, ARC, OpenBookQA and QASC, bad data."""
import pytest

from hrpo.data import DataError, write_jsonl
from hrpo.tasks import get_task
from hrpo.tasks import mc
from testing.task_rows import ARC_ROWS, MMLU_ROWS, OBQA_ROWS

QASC_ROWS = [
    {"id": "q1", "question": "What do plants need to grow?", "fact1": "Plants need light.", "fact2": "Sun gives light.",
     "combinedfact": "Plants need the sun.", "formatted_question": "...",
     "choices": {"text": ["darkness", "sand", "sunlight", "salt", "noise", "ice", "smoke", "plastic"],
                 "label": list("ABCDEFGH")}, "answerKey": "C"},
]


# ------------------------------------------------------------------ answers

LETTERS = [
    # (text after the marker, letter read)
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("B:", "B"),
    ("B) Newton", "B"),
    ("B Newton", "B"),
    ("B. A cat", "B"),          # an article in the choice text is not a second letter
    ("B, because it is", "B"),
    ("**B**", "B"),
    ("$\\boxed{B}$", "B"),
    ("\\text{(B)}", "B"),
    ("The answer is B", "B"),
    ("Answer: C", "C"),
    ("b", "B"),
    ("(b)", "B"),
    ("  \n\n D\nthen more text A", "D"),
    ("B or B", "B"),
    # "A" and "I" as English words: then the sentence's one standalone letter counts
    ("A good choice would be C", "C"),
    ("A good choice would be (C)", "C"),
    ("a good choice would be C", "C"),
    ("I think B", "B"),
    ("I think the answer is B.", "B"),
    ("I was thinking B", "B"),
    ("Newton, so B", "B"),
    ("A", "A"),
    ("A\nA good choice would be C", "A"),
    ("A is correct", "A"),          # "A is": the letter, not the article
    ("A is correct, not C", "A"),
    ("A cat", "A"),                 # a word-like "A" with no other letter reads as the letter
    ("A good choice would be B or C", None),
    # nothing ambiguous
    ("B or C", None),
    ("A/B", None),
    ("A and C", None),
    ("B, C", None),
    ("(B) and (C)", None),
    ("B (C)", None),
    ("b) newton", None),        # lower case only alone
    ("Newton", None),
    ("", None),
    ("42", None),
]


@pytest.mark.parametrize("text, letter", LETTERS)
def test_letter_table(text, letter):
    assert mc.extract_letter("Reasoning. #### " + text) == letter


@pytest.mark.parametrize("text, letter", [
    ("F = ma, so B", "B"),          # only the question's choices count: F is none of four
    ("B, I guess", "B"),
    ("B or E", "B"),
    ("I think A", "A"),
    ("E", None),
    ("D", "D"),
])
def test_letters_among_four_choices(text, letter):
    assert mc.extract_letter("Reasoning. #### " + text, num_choices=4) == letter


@pytest.mark.parametrize("completion, reference, reward", [
    ("#### B", "B", 1.0),
    ("#### (C) Newton", "C", 1.0),
    ("#### B", "C", 0.0),
    ("#### E", "D", 0.0),             # a letter outside four choices never equals the reference
    ("#### B\n#### B", "B", 1.0),     # the same answer twice
    ("#### B\n#### C", "B", 0.0),     # different answers
    ("The answer is B", "B", 0.0),    # no marker
])
def test_mc_rewards(completion, reference, reward):
    assert mc.mc_reward(completion, reference) == reward


def test_task_reward_function():
    reward = get_task("mmlu").reward_function()
    assert reward.__name__ == "mmlu_reward"
    completions = [[{"role": "assistant", "content": "#### B"}], "#### B or C", "#### (A)", "#### F = ma, so B",
                   "#### A good choice would be C"]
    rewards = reward(completions, answer=["B", "B", "B", "B", "C"], num_choices=[4, 4, 4, 4, 4])
    assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert get_task("mmlu").grade("#### F = ma, so B", {"answer": "B", "num_choices": 4})["predicted"] == "B"


# ------------------------------------------------------------------ layouts

def test_every_layout_becomes_one_row_format(tmp_path):
    import datasets

    task = get_task("mmlu")
    files = {
        "mmlu.jsonl": (MMLU_ROWS, ["B", "B", "C"]),
        "mmlu_letters.jsonl": ([{**r, "answer": "ABCD"[r["answer"]]} for r in MMLU_ROWS], ["B", "B", "C"]),
        "aux.jsonl": ([{"train": r} for r in MMLU_ROWS], ["B", "B", "C"]),  # cais/mmlu auxiliary_train
        "arc.jsonl": (ARC_ROWS, ["C", "B"]),
        "obqa.jsonl": (OBQA_ROWS, ["B"]),
        "qasc.jsonl": (QASC_ROWS, ["C"]),
    }
    for name, (rows, answers) in files.items():
        write_jsonl(rows, tmp_path / name)
        dataset = task.load(str(tmp_path / name), "test")
        assert dataset.column_names == ["question", "answer", "num_choices"], name
        assert dataset["answer"] == answers, name
    datasets.Dataset.from_list(ARC_ROWS).to_parquet(str(tmp_path / "arc.parquet"))
    assert task.load(str(tmp_path / "arc.parquet"), "test")["answer"] == ["C", "B"]

    arc = task.load(str(tmp_path / "arc.jsonl"), "test")[1]
    assert arc["question"] == ("What do magnets attract?\n\nA. wood\nB. iron\nC. glass\n\n" + mc.INSTRUCTION)
    assert arc["num_choices"] == 3
    qasc = task.load(str(tmp_path / "qasc.jsonl"), "test")[0]
    assert qasc["num_choices"] == 8 and "H. plastic" in qasc["question"] and "Plants need light" not in qasc["question"]
    obqa = task.load(str(tmp_path / "obqa.jsonl"), "test")[0]
    assert obqa["question"].startswith("The sun is a\n\nA. planet\nB. star")
    prompt = task.with_prompts(task.load(str(tmp_path / "obqa.jsonl"), "test"))[0]["prompt"]
    assert "####" in prompt[0]["content"] and prompt[1]["content"] == obqa["question"]


@pytest.mark.parametrize("name, split, expected", [
    ("mmlu", "train", ("cais/mmlu", "auxiliary_train", "train")),
    ("cais/mmlu", "test", ("cais/mmlu", "all", "test")),
    ("mmlu-stem", "test", ("TIGER-Lab/MMLU-STEM", None, "test")),
    ("TIGER-Lab/MMLU-STEM", "test", ("TIGER-Lab/MMLU-STEM", None, "test")),
    ("arc-challenge", "test", ("allenai/ai2_arc", "ARC-Challenge", "test")),
    ("allenai/ai2_arc", "test", ("allenai/ai2_arc", "ARC-Challenge", "test")),
    ("openbookqa", "test", ("allenai/openbookqa", "main", "test")),
    ("allenai/qasc", "test", ("allenai/qasc", None, "validation")),  # QASC's test split has no answers
    ("qasc", "validation", ("allenai/qasc", None, "validation")),
])
def test_named_sources_read_their_config_and_split(monkeypatch, name, split, expected):
    import datasets

    asked = []

    def fake_load_rows(path, split, hub_config=None, expected=""):
        asked.append((path, hub_config, split))
        rows = {"cais/mmlu": [{"train": MMLU_ROWS[0]}] if hub_config == "auxiliary_train" else MMLU_ROWS,
                "TIGER-Lab/MMLU-STEM": MMLU_ROWS, "allenai/ai2_arc": ARC_ROWS, "allenai/openbookqa": OBQA_ROWS,
                "allenai/qasc": QASC_ROWS}[path]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(mc, "load_rows", fake_load_rows)
    dataset = get_task("mmlu").load(name, split)
    assert asked == [expected] and len(dataset) > 0


def test_an_evaluation_only_set_is_not_a_training_set():
    with pytest.raises(DataError, match="only the 'test' split"):
        get_task("mmlu").load("mmlu-stem", "train")


# ------------------------------------------------------------------ bad data

@pytest.mark.parametrize("rows, message", [
    ([MMLU_ROWS[0], {**MMLU_ROWS[1], "choices": ["only one"], "answer": 0}], "row 1: 1 choice(s)"),
    ([{**MMLU_ROWS[0], "answer": 4}], "row 0: the answer 4 is outside the 4 choices"),
    ([MMLU_ROWS[0], MMLU_ROWS[1], {**MMLU_ROWS[2], "answer": "E"}], "row 2: the answer 'E' is outside"),
    ([{**ARC_ROWS[0], "answerKey": "E"}], "row 0: the answer 'E' is outside the 4 choices"),
    ([{**ARC_ROWS[1], "answerKey": "4"}], "row 0: the answer '4' is outside the 3 choices"),
    ([{**ARC_ROWS[0], "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "A"}], "row 0: 1 choice(s)"),
    ([{**OBQA_ROWS[0], "question_stem": " "}], "row 0: the question is empty"),
    ([{"question": "q", "options": ["a", "b"], "label": 0}], "unknown multiple-choice layout"),
    ([], "empty"),
])
def test_bad_mc_data_is_named_with_file_and_row(tmp_path, rows, message):
    (tmp_path / "bad.jsonl").write_text("")
    if rows:
        write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl") as err:
        get_task("mmlu").load(str(tmp_path / "bad.jsonl"), "train")
    assert message in str(err.value)
