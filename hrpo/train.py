"""Train with HRPO (or plain GRPO), any task: the command line of a training run.

    python -m hrpo.train --config configs/recipes/cpu_demo.yaml
    python -m hrpo.train --task math --model_name_or_path ./my-model --output_dir runs/x
    python -m hrpo.train ... --resume                     # continue from the newest complete checkpoint

The settings are TRL's config dataclasses with HRPO's recipe as defaults (``hrpo.config``);
every flag is also a YAML key of ``--config``, and flags given after it win. Every input is
checked before the model loads. ``hrpo_gsm8k.py``, ``hrpo_math.py`` and ``hrpo_mmlu.py`` are
this command with their task's defaults.
"""
from __future__ import annotations

import sys

from .backend import import_unsloth
from .command_line import requested_backend


def main(argv=None, description: str | None = None, **task_defaults) -> int:
    """The command line of a training run (``task_defaults``: a task script's, e.g. task="math").
    unsloth is imported first (parsing imports transformers, whose classes unsloth patches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    asks_help = bool({"-h", "--help"} & set(argv))  # nothing runs: no unsloth banner before the usage
    if requested_backend(argv) != "transformers" and not asks_help:
        import torch

        import_unsloth(torch.cuda.is_available())
    from .errors import UsageError
    from .settings_parser import settings_parser
    from .data import DataError
    from .distributed import close_process_group
    from .run import prepare, train
    from .resume import finished_run

    parser = settings_parser(description or __doc__, **task_defaults)

    try:
        settings = prepare(argv, parser)
        finished = finished_run(settings)
        if finished:
            print(f"[hrpo] --resume: the run in {settings.training.output_dir} is finished: {finished}. Nothing was "
                  f"changed; to train on, pass a larger --max_steps with --extend_lr_schedule", flush=True)
            return 0
        train(settings)
        close_process_group()
    except (UsageError, DataError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
