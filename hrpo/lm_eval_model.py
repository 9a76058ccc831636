"""lm-evaluation-harness's ``hrpo`` model: a checkpoint decoded as ``hrpo-eval`` decodes it.

    hrpo-lm-eval --model_args checkpoint_path=runs/demo --held_out data/test.jsonl --task arith
    hrpo-lm-eval --model_args checkpoint_path=runs/demo,greedy=false --tasks my_task --include_path my_tasks/

``hrpo-lm-eval`` is lm-eval's own command line with the ``hrpo`` model registered (lm-eval has no
plugin discovery for models) and ``--model hrpo`` preset. ``--held_out FILE`` (with ``--task``, the
HRPO task that grades it, default gsm8k) writes an lm-eval task for a local held-out file of that
task's format into a temporary folder and evaluates it as ``hrpo_held_out``: greedy accuracy graded
by the task's own reward, which on the same rows equals ``hrpo-eval``'s (tests/test_lm_eval.py).

The model answers ``generate_until`` only: each request's context is the question, put into the
run's prompt (system prompt, chat template) as in training; decoding follows the run's settings
(thinking on or off, temperature, completion length), greedy unless ``greedy=false``, in batches of
``batch_size`` (``hrpo-eval``'s, 16, unless given) in the order lm-eval hands the requests. lm-eval's own generation arguments
(``until``, ``max_gen_toks``) are not used: the answer marker ends thinking and the run's length
ends the completion, as in training. Log-likelihood requests are refused.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from hrpo.evaluate import EVAL_BATCH_SIZE

HELD_OUT_TASK = "hrpo_held_out"


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("hrpo")
class HRPOLM(LM):
    def __init__(self, checkpoint_path: str, greedy=True, batch_size=EVAL_BATCH_SIZE, task: str | None = None,
                 system_prompt: str | None = None, temperature: float | None = None, thinking: str | None = None,
                 max_new_tokens: int | None = None, **_ignored):
        super().__init__()
        from hrpo.checkpoint import require_checkpoint_files, run_settings
        from hrpo.evaluate import decoding_settings, load_for_evaluation
        from hrpo.tasks import get_task

        require_checkpoint_files(checkpoint_path)
        run = run_settings(checkpoint_path)
        self.settings = decoding_settings(argparse.Namespace(
            system_prompt=system_prompt, temperature=None if temperature is None else float(temperature),
            thinking=thinking, max_new_tokens=None if max_new_tokens is None else int(max_new_tokens)), run)
        self.task = get_task(task or run.get("task", "gsm8k"))
        self.greedy = _flag(greedy)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else EVAL_BATCH_SIZE  # lm-eval's "auto"
        self.model, self.tokenizer = load_for_evaluation(checkpoint_path)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HRPOLM":
        """--model_args, then lm-eval's own options (--batch_size, --device) where model_args is silent."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HRPOLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from hrpo.held_out import complete_rows

        s = self.settings
        return complete_rows(self.model, self.tokenizer, self.task, [request.args[0] for request in requests],
                             system_prompt=s.system_prompt, thinking=s.thinking == "on", greedy=self.greedy,
                             temperature=s.temperature, max_new_tokens=s.max_new_tokens, batch_size=self.batch_size)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the hrpo model decodes (generate_until tasks); it scores no log-likelihoods")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the hrpo model decodes (generate_until tasks); it scores no log-likelihoods")


def grade(doc: dict, results: list[str], task: str) -> dict:
    """lm-eval's ``process_results`` for a held-out task: the HRPO task's grade of the completion."""
    from hrpo.tasks import get_task

    return {"accuracy": float(get_task(task).grade(results[0], doc)["correct"])}


def write_held_out_task(folder: Path, data_file: Path, task: str = "gsm8k") -> str:
    """An lm-eval task (YAML and its process_results) for a local held-out file in ``task``'s
    format, in ``folder`` (lm-eval's ``--include_path``); returns its name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hrpo_held_out_utils.py").write_text(
        "from hrpo.lm_eval_model import grade\n\n\n"
        f"def process_results(doc, results):\n    return grade(doc, results, {task!r})\n")
    (folder / f"{HELD_OUT_TASK}.yaml").write_text("\n".join([
        f"task: {HELD_OUT_TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {str(Path(data_file).resolve())!r}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{question}}"',
        'doc_to_target: ""',
        "generation_kwargs:",
        "  until: []",
        "process_results: !function hrpo_held_out_utils.process_results",
        "metric_list:",
        "  - metric: accuracy",
        "    aggregation: mean",
        "    higher_is_better: true",
        ""]))
    return HELD_OUT_TASK


def main(argv=None) -> int:
    """``hrpo-lm-eval``: lm-eval's command line with the hrpo model registered and preset."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--held_out", type=Path)
    pre.add_argument("--task", default="gsm8k")
    ours, rest = pre.parse_known_args(argv)
    if rest[:1] not in (["run"], ["ls"], ["validate"]):
        rest = ["run", *rest]
    if rest[0] == "run" and "--model" not in rest:
        rest = ["run", "--model", "hrpo", *rest[1:]]
    if rest[0] == "run" and not any(arg.split("=")[0] in ("--batch_size", "-b") for arg in rest):
        rest += ["--batch_size", str(EVAL_BATCH_SIZE)]  # hrpo-eval's, not lm-eval's 1
    with tempfile.TemporaryDirectory() as tmp:
        if ours.held_out is not None:
            if not ours.held_out.is_file():
                print(f"hrpo-lm-eval: error: --held_out {ours.held_out}: not a file", file=sys.stderr)
                return 2
            name = write_held_out_task(Path(tmp), ours.held_out, ours.task)
            rest += ["--include_path", tmp, "--tasks", name]
        sys.argv = ["lm-eval", *rest]
        cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
