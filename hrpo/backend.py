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


UNSLOTH_GRPO_TRAINER = "UnslothGRPOTrainer"  # the class unsloth's PatchFastRL generates from TRL's


def grpo_trainer_base(backend: str, cuda: bool) -> type:
    """The GRPOTrainer a run's trainer derives from, chosen by the backend, never by what was
    imported first: unsloth's rewrite of TRL's on CUDA with the unsloth backend (``PatchFastRL``,
    run by ``import_unsloth``), else TRL's own (unsloth's CPU mode leaves TRL alone). Either
    one found in its place is an error naming what was found."""
    rewrite = backend == "unsloth" and cuda
    if rewrite:
        import_unsloth(cuda)
    import trl

    if (trl.GRPOTrainer.__name__ == UNSLOTH_GRPO_TRAINER) != rewrite:
        found = f"{trl.GRPOTrainer.__module__}.{trl.GRPOTrainer.__name__}"
        wanted = "unsloth's rewrite of TRL's GRPOTrainer" if rewrite else "TRL's own GRPOTrainer"
        raise RuntimeError(f"--backend {backend}{' on CUDA' if cuda else ''} trains on {wanted}, but trl.GRPOTrainer "
                           f"is {found} in this process (unsloth imported and patched before?); start a fresh "
                           f"process")
    return trl.GRPOTrainer
