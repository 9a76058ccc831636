"""Run a script against pristine upstream transformers (the ``upstream_transformers`` fixture's sources)."""
import os
import subprocess
import sys
from pathlib import Path


def run_upstream(upstream_root: Path, script: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(upstream_root / "src")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
