"""What a task is: its prompt format, its data and how an answer is graded.

A task module builds one ``Task``. The trainer, evaluation and benches only use this
interface, so a new task (MATH, multiple choice) is a new module in this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# HRPO's system prompt (the paper's prompt format, with the task's answer marker).
HRPO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The final answer is provided after the {marker} tag, i.e., {{reasoning process}} {marker} {{answer}}."
)
# The prompt of this project's earlier releases, kept as a named choice.
TUTOR_SYSTEM_PROMPT = (
    "You are a careful math tutor. Work through the problem step by step, then write the final answer as a "
    "single number after the marker {marker}, in the form: <your reasoning> {marker} <number>"
)
SYSTEM_PROMPTS = {"hrpo": HRPO_SYSTEM_PROMPT, "tutor": TUTOR_SYSTEM_PROMPT}


def system_prompt_text(choice: str, marker: str) -> str:
    """A named prompt ("hrpo", "tutor") with the marker filled in, or a literal prompt,
    which must name the marker (the model has to know how to give its answer)."""
    if choice in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[choice].format(marker=marker)
    if marker not in choice:
        raise ValueError(f"--system_prompt {choice[:60]!r}: expected one of {sorted(SYSTEM_PROMPTS)} or a prompt "
                         f"text that contains the answer marker {marker!r}")
    return choice


@dataclass(frozen=True)
class Task:
    """name: the --task value. answer_marker: ends the thinking phase. default_dataset:
    what --dataset_path means when not given. load(dataset_path, split): a checked
    `datasets.Dataset` with a ``question`` column plus the columns ``reference`` reads.
    extract(completion): the answer, or None. reference(row): the expected answer.
    equivalent(answer, reference): graded equal. counters: a Counter the grading updates
    (for instance timeouts); the reward function logs each batch's increase of the keys in
    logged_counters as ``<task>/<key>`` through TRL's ``log_metric``, when TRL passes it."""

    name: str
    answer_marker: str
    default_dataset: str
    load: Callable[[str, str], Any]
    extract: Callable[[str], Any]
    reference: Callable[[dict], Any]
    equivalent: Callable[[Any, Any], bool] = lambda answer, reference: answer == reference
    reference_columns: tuple[str, ...] = ("answer",)
    counters: Any = field(default=None, compare=False)
    logged_counters: tuple[str, ...] = ()

    def to_prompt(self, question: str, system_prompt: str = "hrpo") -> list[dict]:
        """TRL's conversational prompt: system + user messages."""
        return [{"role": "system", "content": system_prompt_text(system_prompt, self.answer_marker)},
                {"role": "user", "content": question}]

    def with_prompts(self, dataset, system_prompt: str = "hrpo"):
        """Add the ``prompt`` column the trainer samples from."""
        return dataset.map(lambda row: {"prompt": self.to_prompt(row["question"], system_prompt)})

    def grade(self, completion: str, row: dict) -> dict:
        """The answer read, the reference and whether they agree (what evaluation records)."""
        answer, expected = self.extract(completion), self.reference(row)
        correct = answer is not None and expected is not None and self.equivalent(answer, expected)
        return {"predicted": answer, "reference": expected, "correct": bool(correct)}

    def reward_function(self) -> Callable:
        """TRL reward function, logged as ``rewards/<task>_reward``: 1.0 for a correct
        answer, else 0.0 (TRL passes the dataset's columns by name)."""
        from ..rewards import completion_text

        def reward(completions, **columns) -> list[float]:
            rows = [dict(zip(self.reference_columns, values))
                    for values in zip(*(columns[c] for c in self.reference_columns))]
            before = {key: self.counters[key] for key in self.logged_counters} if self.counters is not None else {}
            rewards = [float(self.grade(completion_text(c), row)["correct"]) for c, row in zip(completions, rows)]
            log_metric = columns.get("log_metric")
            if callable(log_metric):
                for key, count in before.items():
                    log_metric(f"{self.name}/{key}", float(self.counters[key] - count))
            return rewards

        reward.__name__ = reward.__qualname__ = f"{self.name}_reward"
        return reward
