"""Support for the tests and the benches: tiny models, rollouts and their replay, task rows,
and the entry points the tests run in subprocesses (``python -m testing.<module>``).

Import it from the repository root (pytest does, see pytest.ini; run a bench as
``python -m bench.<name>``).
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def module_env(**extra: str) -> dict:
    """The environment for ``python -m testing.<module>`` run in another folder: the repository
    root importable (unsloth writes its compile cache into the working folder)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
