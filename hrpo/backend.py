"""Which library loads and trains the model, and unsloth's import, which must come first.

Light on purpose: the command lines call ``import_unsloth`` before anything imports
transformers, TRL or PEFT, whose classes unsloth patches when it is imported.
"""
from __future__ import annotations

import os


def import_unsloth(cuda: bool) -> None:
    # unsloth's GRPO loss may score each group's shared prompt once (PrefixGrouper), a layout
    # in which rollouts cannot be matched to their thinking inputs; sequence packing is fine.
    os.environ.setdefault("UNSLOTH_GRPO_PREFIX_GROUPER", "0")
    # Hybrid decode steps always run eagerly (a captured graph has no thinking inputs), so
    # the CUDA-graph decode unsloth turns on for RL rollouts would only hold buffers.
    os.environ.setdefault("UNSLOTH_DECODE_CUDA_GRAPHS", "0")
    import unsloth  # noqa: F401  (first: it patches transformers/TRL; CPU fallback on CPU)

    if cuda:  # its CPU mode has no PatchFastRL (it leaves TRL alone)
        from unsloth import FastLanguageModel, PatchFastRL

        PatchFastRL("GRPO", FastLanguageModel)


def requested_backend(argv: list[str]) -> str:
    """--backend as given on the command line or in the --config file, read before anything parses it."""
    for i, token in enumerate(argv):
        if token == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--backend="):
            return token.split("=", 1)[1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        try:
            with open(argv[argv.index("--config") + 1]) as file:
                return str((yaml.safe_load(file) or {}).get("backend", "auto"))
        except (OSError, yaml.YAMLError, AttributeError):
            return "auto"  # the parser reports it
    return "auto"
