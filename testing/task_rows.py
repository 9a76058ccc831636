"""Small rows in the layouts of MATH, MMLU, ARC and OpenBookQA, for the task tests and the task scripts' runs."""
import json

PROBLEMS = [
    {"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Where is $f$ defined?", "solution": "First $\\boxed{0}$ is wrong; it is $\\boxed{(1,2]}$.",
     "level": "Level 3", "type": "Algebra"},
    {"problem": "What is $\\sin 60^\\circ$?", "solution": "So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$",
     "level": "Level 2", "type": "Precalculus"},
    {"problem": "Which set?", "solution": "The set is $\\boxed{\\{1,2\\}}$.", "level": "Level 2",
     "type": "Counting & Probability"},
]
REFERENCES = ["2", "\\frac{1}{2}", "(1,2]", "\\frac{\\sqrt{3}}{2}", "\\{1,2\\}"]


def write_math_folder(root, split="train", problems=PROBLEMS):
    for n, problem in enumerate(problems):
        folder = root / split / problem["type"].lower().replace(" & ", "_and_").replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n}.json").write_text(json.dumps(problem))
    return root


MMLU_ROWS = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Which is a noble gas?", "subject": "chemistry", "choices": ["Oxygen", "Neon", "Iron", "Carbon"],
     "answer": 1},
    {"question": "Unit of force?", "subject": "physics", "choices": ["Joule", "Watt", "Newton", "Pascal"],
     "answer": 2},
]
ARC_ROWS = [
    {"id": "arc1", "question": "Which part of a plant makes food?",
     "choices": {"text": ["root", "stem", "leaf", "flower"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "arc2", "question": "What do magnets attract?",
     "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]}, "answerKey": "2"},  # numeric labels
]
OBQA_ROWS = [
    {"id": "o1", "question_stem": "The sun is a", "choices": {"text": ["planet", "star", "moon", "comet"],
                                                             "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
]
