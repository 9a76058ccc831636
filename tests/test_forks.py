"""The fork foundation: imports resolve to the forks, and the patch-series round trip."""
import hashlib
import importlib.util
import json
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
    """A copy of the transformers fork folder (overlay and series, no tree) in a scratch root."""
    root = tmp_path / "root"
    src = REPO / "transformers"
    dst = root / "transformers"
    dst.mkdir(parents=True)
    for name in ("upstream.toml", ".patches"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "patches", dst / "patches")
    shutil.copytree(src / "overlay", dst / "overlay", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def series_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "patches").glob("*.patch"))}


def fork_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a fork folder but its tree: upstream.toml, .patches, patches, overlay."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != "tree"}


def changed_lines(before: bytes, after: bytes) -> tuple[list[str], list[str]]:
    old, new = before.decode().splitlines(), after.decode().splitlines()
    return [l for l in old if l not in new], [l for l in new if l not in old]


def git_in(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout


def test_round_trip_edits_go_to_the_overlay_or_the_patch(fork_copy):
    folder = fork_copy / "transformers"
    before = fork_bytes(folder)
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    tree = folder / "tree"

    # Unchanged tree: export is byte-stable.
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode == 0, proc.stderr
    assert fork_bytes(folder) == before

    # An uncommitted edit of the project's own file goes to the overlay, nothing else changes.
    marker = "src/transformers/hrpo_fork.py"
    text = (tree / marker).read_text()
    assert 'FORK_NAME = "hrpo"' in text
    (tree / marker).write_text(text.replace('FORK_NAME = "hrpo"', 'FORK_NAME = "hrpo-edited"'))
    # An uncommitted edit of an upstream file the series patches goes into that patch.
    llama = tree / "src/transformers/models/llama/modeling_llama.py"
    llama.write_text(llama.read_text() + "# edited\n")
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode == 0, proc.stderr
    after = fork_bytes(folder)
    assert after.keys() == before.keys()
    changed = sorted(name for name in after if after[name] != before[name])
    llama_patch = next(n for n in changed if n.startswith("patches/llama_"))
    assert changed == sorted([f"overlay/{marker}", llama_patch])
    assert changed_lines(before[f"overlay/{marker}"], after[f"overlay/{marker}"]) == (
        ['FORK_NAME = "hrpo"'], ['FORK_NAME = "hrpo-edited"'])
    removed, added = changed_lines(before[llama_patch], after[llama_patch])
    assert removed == [] and [line for line in added if line.startswith("+")] == ["+# edited"]
    assert git_in(tree, "status", "--porcelain", "--untracked-files=no") == ""  # folded into commits

    # A new commit over both kinds of file: its overlay part to the overlay, its upstream part to a
    # new patch at the end of the series (the patches change only upstream's files).
    (tree / "src/transformers/hybrid_thinking/new_module.py").write_text("ANSWER = 42\n")
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "# new patch\n")
    git_in(tree, "add", "src/transformers/hybrid_thinking/new_module.py", "setup.py")
    git_in(tree, "commit", "-q", "-m", "fork: a test change", "-m", "Patch-Category: fork-only")
    proc = forks("export", "transformers", root=fork_copy)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "overlay/src/transformers/hybrid_thinking/new_module.py").read_text() == "ANSWER = 42\n"
    assert (folder / ".patches").read_text().splitlines()[-1] == "fork_a_test_change.patch"
    new_patch = (folder / "patches" / "fork_a_test_change.patch").read_text()
    assert "diff --git a/setup.py b/setup.py" in new_patch and "new_module" not in new_patch
    exported = fork_bytes(folder)

    # Made again from the overlay and series: the same tree, and export gives the same bytes.
    head_tree = git_in(tree, "rev-parse", "HEAD^{tree}")
    shutil.rmtree(tree)
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    assert git_in(tree, "rev-parse", "HEAD^{tree}") == head_tree
    assert 'FORK_NAME = "hrpo-edited"' in (tree / marker).read_text()
    assert forks("export", "transformers", root=fork_copy).returncode == 0
    assert fork_bytes(folder) == exported


def test_an_overlay_file_that_upstream_has_is_refused(fork_copy):
    folder = fork_copy / "transformers"
    (folder / "overlay" / "setup.py").write_text("# shadows upstream's file\n")
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode != 0
    assert "overlay/setup.py" in proc.stderr and "a change to upstream's file is a patch" in proc.stderr
    assert no_leftovers(folder)


def test_a_tree_made_from_an_older_series_is_made_again(fork_copy):
    """After a pull that changes the series or the overlay, setup must not keep running the old
    fork code; a tree with work of its own is never thrown away."""
    folder = fork_copy / "transformers"
    assert forks("materialize", "transformers", root=fork_copy).returncode == 0
    tree = folder / "tree"
    commits = lambda: subprocess.run(["git", "-C", str(tree), "rev-list", "--count", "upstream..HEAD"],  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    series = (folder / ".patches").read_text().splitlines()
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode == 0 and "matches the overlay and series; keeping it" in proc.stdout
    (folder / ".patches").write_text("\n".join(series[:-1]) + "\n")  # the series moved on
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode == 0 and "changed since" in proc.stdout, proc.stdout + proc.stderr
    assert commits() == str(1 + len(series) - 1)  # the overlay's commit and the patches
    overlay_marker = folder / "overlay" / "src" / "transformers" / "hrpo_fork.py"
    overlay_marker.write_text(overlay_marker.read_text() + "# edited in the overlay\n")  # the overlay moved on
    proc = forks("materialize", "transformers", root=fork_copy)
    assert proc.returncode == 0 and "changed since" in proc.stdout, proc.stdout + proc.stderr
    marker = tree / "src" / "transformers" / "hrpo_fork.py"
    assert marker.read_bytes() == overlay_marker.read_bytes()
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


def load_forks_tool():
    spec = importlib.util.spec_from_file_location("forks_tool", FORKS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_series_changes_only_upstream_files_and_each_patch_says_why(name):
    tool = load_forks_tool()
    fork = tool.Fork.load(REPO / name)
    upstream = set(git_in(fork.tree, "ls-tree", "-r", "--name-only", "upstream").splitlines())
    overlay = tool.overlay_files(fork)
    assert overlay and not set(overlay) & upstream
    patched = set()
    for patch in fork.series:
        info = tool.patch_info(fork, patch)
        assert info.files and set(info.files) <= upstream, (patch, set(info.files) - upstream)
        assert info.category in tool.CATEGORIES, (patch, info.category)
        assert info.why_not_overlay and len(info.why_not_overlay) > 20, patch
        patched |= set(info.files)
    # the suite's tree is the release plus exactly these files, the overlay's byte for byte
    assert set(git_in(fork.tree, "diff", "--name-only", "upstream", "HEAD").splitlines()) == set(overlay) | patched
    assert all((fork.tree / path).read_bytes() == body for path, body in overlay.items())


def test_the_patches_are_listed_only_in_the_series_file():
    tool = load_forks_tool()
    subjects = [tool.patch_info(fork, patch).subject for fork in tool.discover(REPO) for patch in fork.series]
    assert len(subjects) >= 5
    for doc in ("docs/forks.md", "transformers/README.md", "unsloth/README.md"):
        text = (REPO / doc).read_text()
        assert ".patches" in text, doc
        assert not [s for s in subjects if s in text], doc


def unpack_forks(commit: str, root: Path) -> None:
    """The fork folders of one commit of this repository into ``root``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *EXPECTED],
                             capture_output=True, check=True).stdout
    root.mkdir(exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)


def test_the_move_to_the_overlay_changed_no_byte(tmp_path):
    """The fork trees made from the overlay and series, at the commit that introduced the overlay,
    are the trees of the patch-only series before it (same git tree ids: same files, same bytes).
    A tree made before the move is kept as it is, and made again once the overlay moves on."""
    log = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--",
                          "transformers/overlay"], capture_output=True, text=True)
    if log.returncode != 0 or not log.stdout.split():
        pytest.skip("the repository's history is not available here (not a git checkout, or a shallow one)")
    move = log.stdout.split()[-1]
    tree_ids = lambda root: {name: git_in(root / name / "tree", "rev-parse", "HEAD^{tree}")  # noqa: E731
                             for name in EXPECTED}

    before, after = tmp_path / "before", tmp_path / "after"
    unpack_forks(f"{move}^", before)
    assert not (before / "transformers" / "overlay").exists()
    assert forks("materialize", root=before).returncode == 0
    for name in EXPECTED:  # the record the tool wrote before the move: the patch files' digests
        series = (before / name / ".patches").read_text().split()
        digests = [hashlib.sha256((before / name / "patches" / patch).read_bytes()).hexdigest() for patch in series]
        (before / name / "tree" / ".git" / "hrpo-materialized.json").write_text(json.dumps(digests))
    unpack_forks(move, after)
    assert forks("materialize", root=after).returncode == 0
    assert tree_ids(before) == tree_ids(after)

    # the pull that brings the move: the old tree (its history split differently) is made again,
    # not refused as work of its own, and is the same tree
    for name in EXPECTED:
        shutil.rmtree(before / name / "patches")
        (before / name / ".patches").unlink()
    unpack_forks(move, before)
    proc = forks("materialize", root=before)
    assert proc.returncode == 0 and proc.stdout.count("changed since") == 2, proc.stdout + proc.stderr
    assert tree_ids(before) == tree_ids(after)
    # a later pull that changes the overlay: the old tree is made again
    marker = before / "transformers" / "overlay" / "src" / "transformers" / "hrpo_fork.py"
    marker.write_text(marker.read_text() + "# a later change\n")
    proc = forks("materialize", "transformers", root=before)
    assert proc.returncode == 0 and "changed since" in proc.stdout, proc.stdout + proc.stderr
    assert "# a later change" in (before / "transformers" / "tree" / "src" / "transformers" / "hrpo_fork.py").read_text()
