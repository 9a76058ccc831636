"""Evaluate a trained HRPO checkpoint on held-out problems of its task, decoding as trained.

    python eval_gsm8k.py --checkpoint_path experiments/run --greedy
    python eval_gsm8k.py --checkpoint_path runs/demo --dataset_path generated --greedy --thinking off

The task, system prompt, temperature and whether hybrid thinking was on come from the
run's saved settings (hrpo_run.json); a flag overrides them. Decoding is the training
distribution (top_k 0, top_p 1, no repetition penalty), never the checkpoint's
generation_config; --greedy is HRPO's inference mode (argmax tokens, latents at the
training temperature). Writes eval_<dataset>_<split>.json (metrics and every example) into
the checkpoint folder, one file per held-out set. Without --dataset_path it evaluates the
held-out split of the run's data source; a run trained on a single local file has none, so
that is refused unless --eval_on_train_data (recorded as split "train"). A completion is correct when the task's reward gives it 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hrpo.tasks import TASK_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help="an HRPO output folder or a checkpoint-N folder in it")
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
    p.add_argument("--batch_size", type=int, default=16)
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
    """The flags given, else the run's saved settings."""
    from hrpo.checkpoint import require_checkpoint_files, run_settings
    from hrpo.tasks import get_task

    require_checkpoint_files(args.checkpoint_path)
    run = run_settings(args.checkpoint_path)
    out = argparse.Namespace(**vars(args))
    out.task = args.task or run.get("task", "gsm8k")
    from hrpo.held_out import held_out_source

    out.dataset_path, out.split = held_out_source(
        args.dataset_path, args.split, training_path=run.get("dataset_path") or get_task(out.task).default_dataset,
        allow_training_data=args.eval_on_train_data)
    return decoding_settings(out, run)


def decoding_settings(out: argparse.Namespace, run: dict) -> argparse.Namespace:
    """The decoding flags given in ``out``, else the run's saved settings (``run``)."""
    out.system_prompt = out.system_prompt or run.get("system_prompt", "tutor")
    out.temperature = out.temperature if out.temperature is not None else run.get("temperature", 0.5)
    out.thinking = out.thinking or run.get("hybrid_thinking", "on")
    out.max_new_tokens = out.max_new_tokens or run.get("max_completion_length", 1024)
    return out


def load_for_evaluation(checkpoint_path):
    """The checkpoint's model and tokenizer: bf16 on a CUDA device that has it, else float32."""
    import torch

    from hrpo.checkpoint import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return load_checkpoint(checkpoint_path, dtype=dtype, device=device)


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
    model, tokenizer = load_for_evaluation(args.checkpoint_path)
    torch.manual_seed(args.seed)
    bar = tqdm(total=len(dataset), desc="eval", unit="problem")

    def progress(done, correct):
        bar.update(done - bar.n)
        bar.set_postfix(accuracy=f"{correct / done:.3f}")

    result = evaluate_rows(model, tokenizer, task, dataset.to_list(), system_prompt=args.system_prompt,
                           thinking=args.thinking == "on", greedy=args.greedy, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress)
    bar.close()
    result["metrics"].update(task=args.task, dataset_path=args.dataset_path, split=args.split,
                             latent_source=getattr(model.get_base_model().config, "thinking_latent_source", None))
    target = Path(args.checkpoint_path) / result_file_name(args.dataset_path, args.split)
    target.write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    print(f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['total']}); wrote {target}")
    return result


def main(argv=None) -> int:
    from hrpo.checkpoint import CheckpointError
    from hrpo.data import DataError

    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (CheckpointError, DataError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
