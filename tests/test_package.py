"""The installed package (pyproject.toml, installed editable by ./setup.sh): its console scripts
run from any folder, and its dependencies are requirements.txt's."""
import os
import sys
import tomllib
from pathlib import Path

import pytest

from testing.processes import run_child

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, prog, usage", [("hrpo-train", "hrpo-train", "--model_name_or_path"),
                                                 ("hrpo-eval", "hrpo-eval", "--checkpoint_path"),
                                                 ("hrpo-lm-eval", "lm-eval run", "--model_args")])
def test_console_scripts_run_from_another_folder(tmp_path, script, prog, usage):
    executable = Path(sys.executable).parent / script
    assert executable.exists(), f"{executable} is missing: ./setup.sh installs the project (pip install -e .)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_child([str(executable), "--help"], cwd=tmp_path, env=env, timeout=300, what=f"{script} --help")
    assert result.stdout.startswith(f"usage: {prog}") and usage in result.stdout


def test_the_dependencies_are_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
