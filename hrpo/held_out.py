"""Held-out evaluation: decode as training did, grade with the task's reward.

Decoding is the training distribution, built explicitly so that nothing comes from a
checkpoint's generation_config (Qwen2.5 ships repetition_penalty 1.1, top_k 20, top_p
0.8): temperature T, every other logits processor off (``hrpo.sampling``), and the same stop
ids as TRL's trainer (the tokenizer's eos plus every eos id of the model). Greedy means
HRPO's inference mode: argmax tokens, while the embedding-method latent is still formed
from the temperature-T distribution that training used. A run with ``--use_vllm`` decodes its
held-out rows with its vLLM engine (the same greedy tokens; ``HeldOutEvaluation._held_out_engine``
says when it cannot), every row in one call, so that no row waits for the longest of a batch.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import DataError
from .replay import stop_token_ids
from .sampling import NEUTRAL_SAMPLING
from .tasks import Task


def held_out_source(dataset_path: str, split: str, *, training_path: str | None = None,
                    allow_training_data: bool = False) -> tuple[str, str]:
    """(where held-out rows come from, the split they really are).

    ``dataset_path`` None means the training data's own source (``training_path``). A hub set
    or a folder of split files has a held-out split; a single local file has none: its "test
    split" is the file itself, the training rows, so that is refused unless
    ``allow_training_data``, and then recorded as "train"."""
    if dataset_path is not None and not _same_file(dataset_path, training_path):
        return dataset_path, split
    if dataset_path is not None:
        if not allow_training_data:
            raise DataError(f"the held-out data {dataset_path} is the training file: evaluating it would score the "
                            f"training rows. Name a held-out file, or pass --eval_on_train_data to score the training "
                            f"rows knowingly")
        return dataset_path, "train"
    if training_path is not None and Path(training_path).is_file():
        if not allow_training_data:
            raise DataError(f"the training data {training_path} is a single file, which has no held-out split: "
                            f"evaluating it would score the training rows. Name a held-out file (--eval_dataset_path "
                            f"in training, --dataset_path in evaluation), or pass --eval_on_train_data to score the "
                            f"training rows knowingly")
        return training_path, "train"
    return training_path, split


def _same_file(path: str, other: str | None) -> bool:
    return other is not None and Path(path).is_file() and Path(other).is_file() and Path(path).samefile(other)


def check_not_training_rows(held_out_rows: list[dict], training_rows, where: str, allowed: bool) -> int:
    """How many held-out rows are training rows (the same question). All of them (a copy of the
    training data under another name) is an error unless ``allowed``; some is said."""
    seen = set(training_rows["question"])
    shared = sum(row["question"] in seen for row in held_out_rows)
    if shared and shared == len(held_out_rows) and not allowed:
        raise DataError(f"{where}: all {shared} held-out rows evaluated are training rows (the same questions): "
                        f"evaluating them would score the training data. Name a held-out file, or pass "
                        f"--eval_on_train_data to score the training rows knowingly")
    if shared and not allowed:
        print(f"[hrpo] {where}: {shared} of the {len(held_out_rows)} held-out rows evaluated are also training rows",
              flush=True)
    return shared


def result_file_name(dataset_path: str, split: str) -> str:
    """eval_<dataset>_<split>.json: one result file per held-out set, none overwriting another."""
    name = Path(dataset_path).stem if Path(dataset_path).exists() else dataset_path
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-") or "data"
    return f"eval_{slug}_{split}.json"


def trainer_stop_ids(model, tokenizer) -> list[int]:
    """TRL's rule: the tokenizer's eos first, then every eos id the model's generation config declares."""
    ids = stop_token_ids(model.generation_config.eos_token_id)
    return ids if tokenizer.eos_token_id in ids else [tokenizer.eos_token_id, *ids]


def decoding_config(model, tokenizer, *, temperature: float, greedy: bool, max_new_tokens: int):
    """The full GenerationConfig of an evaluation (see the module docstring)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, **NEUTRAL_SAMPLING,
        num_beams=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=trainer_stop_ids(model, tokenizer),
        disable_compile=True)


def prompt_texts(tokenizer, task: Task, questions: list[str], system_prompt: str) -> list[str]:
    """Each question's prompt as the model reads it (the chat template, the generation prompt added)."""
    return [tokenizer.apply_chat_template(task.to_prompt(question, system_prompt), tokenize=False,
                                          add_generation_prompt=True) for question in questions]


@torch.no_grad()
def complete_rows(model, tokenizer, task: Task, questions: list[str], *, system_prompt: str, thinking: bool,
                  greedy: bool, temperature: float, max_new_tokens: int, batch_size: int = 32, done=None,
                  engine=None) -> list[str]:
    """The completion of each question, decoded as trained (the module docstring), ``batch_size`` at a
    time in order; ``done(completions of a batch)`` after each batch. What every evaluation decodes
    with: ``evaluate_rows``, and lm-evaluation-harness's ``hrpo`` model (``hrpo.lm_eval_model``).
    ``engine``: greedy decoding by a run's vLLM engine instead (``HeldOutEvaluation``)."""
    if engine is not None:
        return engine_complete_rows(engine, model, tokenizer, task, questions, system_prompt=system_prompt,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, done=done)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = decoding_config(model, tokenizer, temperature=temperature, greedy=greedy, max_new_tokens=max_new_tokens)
    completions = []
    try:
        for first in range(0, len(questions), batch_size):
            texts = prompt_texts(tokenizer, task, questions[first:first + batch_size], system_prompt)
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            hybrid = {"processing_class": tokenizer, "is_inference": greedy} if thinking else {}
            if greedy and not thinking:
                config.do_sample = False
            out = model.generate(**enc, generation_config=config, **hybrid)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            decoded = tokenizer.batch_decode(sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            completions.extend(decoded)
            if done is not None:
                done(decoded)
    finally:
        model.train(was_training)
    return completions


def engine_complete_rows(engine, model, tokenizer, task: Task, questions: list[str], *, system_prompt: str,
                         max_new_tokens: int, batch_size: int, done=None) -> list[str]:
    """``complete_rows``, greedy, by a vLLM engine (``hrpo.vllm_rollouts.EngineRollouts``): every prompt in one
    call (the engine batches them continuously, no row waits for another's end), the same stop ids and the
    same decoding of the tokens to text; ``done`` per ``batch_size`` completions."""
    prompts = tokenizer(prompt_texts(tokenizer, task, questions, system_prompt), add_special_tokens=False)["input_ids"]
    tokens = engine.greedy_completions(prompts, max_new_tokens, trainer_stop_ids(model, tokenizer))
    completions = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    if done is not None:
        for first in range(0, len(completions), batch_size):
            done(completions[first:first + batch_size])
    return completions


def evaluate_rows(model, tokenizer, task: Task, rows: list[dict], *, system_prompt: str, thinking: bool,
                  greedy: bool, temperature: float, max_new_tokens: int, batch_size: int = 32,
                  progress=None, engine=None) -> dict:
    """Accuracy over ``rows`` and every example ({question, completion, predicted, reference, correct})."""
    examples, start = [], time.time()

    def graded(completions: list[str]) -> None:
        for row, completion in zip(rows[len(examples):], completions):
            grade = task.grade(completion, row)
            examples.append({"question": row["question"], "completion": completion,
                             "predicted": None if grade["predicted"] is None else str(grade["predicted"]),
                             "reference": str(grade["reference"]), "correct": grade["correct"]})
        if progress is not None:
            progress(len(examples), sum(e["correct"] for e in examples))

    complete_rows(model, tokenizer, task, [row["question"] for row in rows], system_prompt=system_prompt,
                  thinking=thinking, greedy=greedy, temperature=temperature, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, done=graded, engine=engine)
    correct = sum(e["correct"] for e in examples)
    metrics = {"accuracy": correct / max(len(examples), 1), "correct": correct, "total": len(examples),
               "thinking": thinking, "greedy": greedy, "temperature": temperature, "max_new_tokens": max_new_tokens,
               "system_prompt": system_prompt, "decoder": "fork generate" if engine is None else "vllm",
               "seconds": round(time.time() - start, 1)}
    return {"metrics": metrics, "examples": examples}


class HeldOutEvaluation:
    """A trainer mixin: ``evaluate()`` is the greedy held-out accuracy of the model being trained
    (decoding as trained), so the trainer's own schedule runs it (``--eval_on_start``,
    ``--eval_strategy steps --eval_steps N``), its metrics are logged with the training ones
    (``eval_accuracy``), and each result is written to ``eval_step<N>.json`` in the output folder.

    Set ``held_out`` (a ``HeldOut``) after building the trainer; without it there is nothing to
    evaluate."""

    held_out: HeldOut | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval",
                 file_name: str | None = None) -> dict:
        import json

        if self.held_out is None or not self.held_out.rows:
            return {}
        spec = self.held_out
        model = self.accelerator.unwrap_model(self.model)
        result = evaluate_rows(model, self.processing_class, spec.task, spec.rows, system_prompt=spec.system_prompt,
                               thinking=spec.thinking, greedy=True, temperature=self.args.temperature,
                               max_new_tokens=self.args.max_completion_length,
                               batch_size=self.args.per_device_train_batch_size * 4, engine=self._held_out_engine())
        step = self.state.global_step
        result["metrics"].update(step=step, **spec.source)
        m = result["metrics"]
        answered = sum(example["predicted"] is not None for example in result["examples"])
        metrics = {f"{metric_key_prefix}_accuracy": m["accuracy"],
                   f"{metric_key_prefix}_answered": answered / max(m["total"], 1),
                   f"{metric_key_prefix}_runtime": m["seconds"]}
        if self.args.should_save:  # every rank evaluates (sharded forwards are collectives), one writes
            folder = Path(self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / (file_name or f"eval_step{step}.json")).write_text(json.dumps(result, indent=2))
            print(f"[hrpo] held-out accuracy at step {step}: {m['accuracy']:.3f} ({m['correct']}/{m['total']}, "
                  f"greedy, {m['seconds']:.0f} s)", flush=True)
        # TRL's log() merges (and clears) the pending metrics of the model's mode: logged in eval mode, the
        # training metrics not yet logged stay for their own step's line
        was_training = self.model.training
        self.model.eval()
        try:
            self.log(metrics)
        finally:
            self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _held_out_engine(self):
        """With ``--use_vllm``, the run's engine, its weights synced to the policy's, where it decodes the held-out
        rows as the fork's greedy generate does (hybrid thinking through the plugin, whose greedy tokens are the
        fork's: tests/test_vllm_plugin.py); else None, and the fork's generate decodes them (the reason said once)."""
        engine = getattr(self, "vllm_generation", None)
        if not getattr(self, "use_vllm", False) or not hasattr(engine, "greedy_completions"):
            return None
        why = engine.why_not_greedy(self._longest_held_out_prompt(), self.args.max_completion_length)
        if why is not None:
            if not getattr(self, "_said_why_not_engine", False) and self.args.should_save:
                print(f"[hrpo] held-out evaluation decodes with the fork's generate, not vLLM: {why}", flush=True)
            self._said_why_not_engine = True
            return None
        if self.state.global_step != self._last_loaded_step:  # TRL's rule: sync once per optimizer step
            engine.sync_weights()
            self._last_loaded_step = self.state.global_step
        return engine

    def _longest_held_out_prompt(self) -> int:
        """The held-out prompts' longest length in tokens (the rows and the prompt stay: counted once)."""
        spec = self.held_out
        if getattr(self, "_longest_prompt_of", None) is not spec:
            texts = prompt_texts(self.processing_class, spec.task, [row["question"] for row in spec.rows],
                                 spec.system_prompt)
            ids = self.processing_class(texts, add_special_tokens=False)["input_ids"]
            self._longest_prompt, self._longest_prompt_of = max(len(row) for row in ids), spec
        return self._longest_prompt


class HeldOut:
    """The held-out rows of a run and how to grade them ({"dataset_path", "split"}: the real split)."""

    def __init__(self, rows: list[dict], source: dict, task: Task, system_prompt: str, thinking: bool):
        self.rows, self.source, self.task = rows, source, task
        self.system_prompt, self.thinking = system_prompt, thinking
