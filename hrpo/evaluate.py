"""Evaluate a trained HRPO checkpoint on held-out problems of its task, decoding as trained.

    python eval_gsm8k.py --checkpoint_path experiments/run --greedy
    python eval_gsm8k.py --checkpoint_path runs/demo --dataset_path generated --greedy --thinking off
    python eval_gsm8k.py --base_model HuggingFaceTB/SmolLM2-135M-Instruct --task reasoning_gym \
        --dataset_path gsm_symbolic --greedy --max_new_tokens 256 --output_dir runs/base

The task, system prompt, temperature and whether hybrid thinking was on come from the
run's saved settings (hrpo_run.json); a flag overrides them. Decoding is the training
distribution (top_k 0, top_p 1, no repetition penalty), never the checkpoint's
generation_config; --greedy is HRPO's inference mode (argmax tokens, latents at the
training temperature). Writes eval_<dataset>_<split>.json (metrics and every example) into
the checkpoint folder, one file per held-out set. Without --dataset_path it evaluates the
held-out split of the run's data source; a run trained on a single local file has none, so
that is refused unless --eval_on_train_data (recorded as split "train"). A completion is correct when the task's reward gives it 1.

--base_model scores a model that HRPO has not trained (a hub name or a local folder), the
reference a trained run is compared with: the same prompt, grading and decoding, with plain
token decoding (it has no thinking modules). It needs --task, and writes into --output_dir.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hrpo.tasks import TASK_NAMES

# Problems decoded at once, here and by lm-eval's hrpo model (batch composition moves floats).
EVAL_BATCH_SIZE = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint_path", help="an HRPO output folder or a checkpoint-N folder in it")
    model.add_argument("--base_model", help="a model HRPO has not trained (hub name or local folder), scored with "
                                            "plain decoding as the reference for trained runs; needs --task")
    p.add_argument("--output_dir", default=None, help="where the result file goes (default: the checkpoint folder; "
                                                      "needed with --base_model)")
    p.add_argument("--task", default=None, choices=TASK_NAMES, help="default: the run's task")
    p.add_argument("--dataset_path", default=None,
                   help="held-out data (default: the run's --dataset_path): a local file, or a hub set of the "
                        "task: HuggingFaceH4/MATH-500 (math500) for math; TIGER-Lab/MMLU-STEM (mmlu-stem), "
                        "allenai/ai2_arc (arc-challenge), allenai/openbookqa (openbookqa), allenai/qasc (qasc) "
                        "for mmlu")
    p.add_argument("--split", default="test")
    p.add_argument("--eval_on_train_data", action="store_true",
                   help="without --dataset_path, let a run's single local training file be evaluated (it then scores "
                        "training rows, recorded as split train)")
    p.add_argument("--batch_size", type=int, default=EVAL_BATCH_SIZE)
    p.add_argument("--greedy", action="store_true", help="HRPO's inference mode: argmax tokens")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, and the latent's temperature when --greedy (default: the run's)")
    p.add_argument("--system_prompt", default=None, help="default: the run's")
    p.add_argument("--num_samples", type=int, default=None, help="evaluate the first N problems (default: all)")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="on: hybrid latent reasoning; off: plain token decoding (default: as trained)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's --max_completion_length")
    p.add_argument("--seed", type=int, default=42)
    return p


def resolved(args) -> argparse.Namespace:
    """The flags given, else the run's saved settings (a base model's are the defaults of training)."""
    from hrpo.checkpoint import require_checkpoint_files, run_settings
    from hrpo.tasks import get_task

    if args.base_model is not None:
        run = base_model_settings(args)
    else:
        require_checkpoint_files(args.checkpoint_path)
        run = run_settings(args.checkpoint_path)
    out = argparse.Namespace(**vars(args))
    out.output_dir = args.output_dir or args.checkpoint_path
    out.task = args.task or run.get("task", "gsm8k")
    from hrpo.held_out import held_out_source

    out.dataset_path, out.split = held_out_source(
        args.dataset_path, args.split, training_path=run.get("dataset_path") or get_task(out.task).default_dataset,
        allow_training_data=args.eval_on_train_data)
    return decoding_settings(out, run)


def base_model_settings(args) -> dict:
    """What a run's saved settings would say, for a model without one: training's defaults, no thinking."""
    from hrpo.config import TaskArguments
    from hrpo.errors import UsageError

    missing = [flag for flag, value in (("--task", args.task), ("--output_dir", args.output_dir)) if value is None]
    if missing:
        raise UsageError(f"--base_model {args.base_model}: give {' and '.join(missing)} (a base model has no run "
                         f"settings to take them from)")
    if args.thinking == "on":
        raise UsageError(f"--base_model {args.base_model} --thinking on: a base model has no trained thinking "
                         f"modules; score it with --thinking off, or a training run's step 0 (--eval_on_start)")
    return {"system_prompt": TaskArguments.system_prompt, "hybrid_thinking": "off"}


def decoding_settings(out: argparse.Namespace, run: dict) -> argparse.Namespace:
    """The decoding flags given in ``out``, else the run's saved settings (``run``)."""
    out.system_prompt = out.system_prompt or run.get("system_prompt", "tutor")
    out.temperature = out.temperature if out.temperature is not None else run.get("temperature", 0.5)
    out.thinking = out.thinking or run.get("hybrid_thinking", "on")
    out.max_new_tokens = out.max_new_tokens or run.get("max_completion_length", 1024)
    return out


def load_for_evaluation(checkpoint_path=None, base_model=None):
    """The checkpoint's (or base model's) model and tokenizer: bf16 on a CUDA device that has it, else float32."""
    import torch

    from hrpo.checkpoint import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if checkpoint_path is not None:
        return load_checkpoint(checkpoint_path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hrpo.data import left_padded

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
    return model.eval(), left_padded(AutoTokenizer.from_pretrained(base_model))


def evaluate(args) -> dict:
    import torch
    from tqdm import tqdm

    from hrpo.held_out import evaluate_rows, result_file_name
    from hrpo.tasks import get_task

    args = resolved(args)
    task = get_task(args.task)
    dataset = task.load(args.dataset_path, args.split)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    model, tokenizer = load_for_evaluation(args.checkpoint_path, args.base_model)
    torch.manual_seed(args.seed)
    bar = tqdm(total=len(dataset), desc="eval", unit="problem")

    def progress(done, correct):
        bar.update(done - bar.n)
        bar.set_postfix(accuracy=f"{correct / done:.3f}")

    result = evaluate_rows(model, tokenizer, task, dataset.to_list(), system_prompt=args.system_prompt,
                           thinking=args.thinking == "on", greedy=args.greedy, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress)
    bar.close()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    result["metrics"].update(task=args.task, dataset_path=args.dataset_path, split=args.split,
                             model=args.base_model or args.checkpoint_path,
                             latent_source=getattr(base.config, "thinking_latent_source", None))
    target = Path(args.output_dir) / result_file_name(args.dataset_path, args.split)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    print(f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['total']}); wrote {target}")
    return result


def main(argv=None) -> int:
    from hrpo.checkpoint import CheckpointError
    from hrpo.data import DataError
    from hrpo.errors import UsageError

    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (CheckpointError, DataError, UsageError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
