"""The fork foundation: imports resolve to the forks, and the patch-series round trip."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORKS_PY = REPO / "tools" / "forks.py"
CACHE = Path(os.environ.get("HRPO_FORK_CACHE", Path.home() / ".cache" / "hrpo-forks"))

EXPECTED = {
    "transformers": (REPO / "transformers" / "tree" / "src" / "transformers", "5.17.0"),
    "unsloth": (REPO / "unsloth" / "tree" / "unsloth", "2026.10.9"),
}


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.parametrize("module", sorted(EXPECTED))
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_import_resolves_to_installed_fork(module, where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    proc = run_python(f"import {module}, {module}.hrpo_fork as m; "
                      f"print({module}.__file__); print(m.FORK_NAME, m.UPSTREAM_VERSION)", cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    file_line, marker_line = proc.stdout.strip().splitlines()[-2:]
    package_dir, version = EXPECTED[module]
    assert Path(file_line) == package_dir / "__init__.py"
    assert marker_line == f"hrpo {version}"


def test_unsloth_imports_in_cpu_fallback_mode(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the CPU-fallback mode is not what runs here")
    proc = run_python("import unsloth, torch; from unsloth import FastLanguageModel; "
                      "print('cuda', torch.cuda.is_available())", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda False" in proc.stdout
    assert "no GPU found" in proc.stdout + proc.stderr


def forks(*args: str, root: Path, cache: Path = CACHE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FORKS_PY), "--root", str(root), *args]
    if args[0] == "materialize":
        cmd += ["--cache", str(cache)]
    return subprocess.run(cmd, text=True, capture_output=True, timeout=600)


@pytest.fixture
def fork_copy(tmp_path):
    """A copy of the transformers fork folder (series only, no tree) in a scratch root."""
    root = tmp_path / "root"
    src = REPO / "transformers"
    dst = root / "transformers"
    dst.mkdir(parents=True)
    for name in ("upstream.toml", ".patches"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "patches", dst / "patches")
    return root


def series_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "patches").glob("*.patch"))}


def test_round_trip_one_line_edit(fork_copy):
    folder = fork_copy / "transformers"
    before = series_bytes(folder)
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    tree = folder / "tree"

    # Unchanged tree: export is byte-stable.
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode == 0, proc.stderr
    assert series_bytes(folder) == before

    marker = tree / "src" / "transformers" / "hrpo_fork.py"
    text = marker.read_text()
    assert 'FORK_NAME = "hrpo"' in text
    marker.write_text(text.replace('FORK_NAME = "hrpo"', 'FORK_NAME = "hrpo-edited"'))
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode == 0, proc.stderr
    after = series_bytes(folder)
    assert after.keys() == before.keys()
    changed = [name for name in after if after[name] != before[name]]
    assert len(changed) == 1
    old_lines = before[changed[0]].decode().splitlines()
    new_lines = after[changed[0]].decode().splitlines()
    removed = [l for l in old_lines if l not in new_lines]
    added = [l for l in new_lines if l not in old_lines]
    assert removed == ['+FORK_NAME = "hrpo"'] and added == ['+FORK_NAME = "hrpo-edited"']

    shutil.rmtree(tree)
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    assert 'FORK_NAME = "hrpo-edited"' in marker.read_text()


def test_a_tree_made_from_an_older_series_is_made_again(fork_copy):
    """After a pull that changes the series, setup must not keep running the old fork code; a
    tree with work of its own is never thrown away."""
    folder = fork_copy / "transformers"
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    tree = folder / "tree"
    commits = lambda: subprocess.run(["git", "-C", str(tree), "rev-list", "--count", "upstream..HEAD"],  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    series = (folder / ".patches").read_text().splitlines()
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode == 0 and "matches the series; keeping it" in proc.stdout
    (folder / ".patches").write_text("\n".join(series[:-1]) + "\n")  # the series moved on
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode == 0 and "changed since" in proc.stdout, proc.stdout + proc.stderr
    assert commits() == str(len(series) - 1)
    marker = tree / "src" / "transformers" / "hrpo_fork.py"
    marker.write_text(marker.read_text() + "# local work\n")
    subprocess.run(["git", "-C", str(tree), "commit", "-qam", "fork: local work"], check=True, capture_output=True)
    (folder / ".patches").write_text("\n".join(series) + "\n")
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode != 0 and "holds work of its own" in proc.stderr
    assert "# local work" in marker.read_text()


def no_leftovers(folder: Path) -> bool:
    return not (folder / "tree").exists() and not list(folder.glob(".tree-*"))


def test_corrupted_archive_fails_clearly(fork_copy, tmp_path):
    bad_cache = tmp_path / "bad-cache"
    bad_cache.mkdir()
    (bad_cache / "transformers-5.17.0.tar.gz").write_bytes(b"not the release")
    proc = forks("materialize", "transformers", root=fork_copy, cache=bad_cache)
    assert proc.returncode != 0
    assert "sha256" in proc.stderr and "transformers-5.17.0.tar.gz" in proc.stderr
    assert no_leftovers(fork_copy / "transformers")


def test_patch_that_no_longer_applies_fails_clearly(fork_copy):
    folder = fork_copy / "transformers"
    stale = folder / "patches" / "stale_context.patch"
    stale.write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: Test <test@invalid>\nDate: Sat, 1 Jan 2000 00:00:00 +0000\n"
        "Subject: test: a patch whose context is gone\n\n"
        "diff --git a/setup.py b/setup.py\n--- a/setup.py\n+++ b/setup.py\n"
        "@@ -1,3 +1,3 @@\n this line is not in upstream\n-nor this one\n+replacement\n"
        " and not this\n")
    with open(folder / ".patches", "a") as fh:
        fh.write("stale_context.patch\n")
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode != 0
    assert "stale_context.patch" in proc.stderr and "setup.py" in proc.stderr
    assert no_leftovers(folder)


def test_edit_outside_the_series_is_refused(fork_copy):
    folder = fork_copy / "transformers"
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    setup_py = folder / "tree" / "setup.py"
    setup_py.write_text(setup_py.read_text() + "\n# stray edit\n")
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode != 0
    assert "setup.py" in proc.stderr and "commit it" in proc.stderr


def test_unknown_fork_folder_is_named(tmp_path):
    proc = forks("materialize", "nonexistent", root=tmp_path)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr and "upstream.toml" in proc.stderr
