#!/usr/bin/env python3
"""Materialize, export and install the forks kept as patch series.

A fork folder (``transformers/``, ``unsloth/``) holds ``upstream.toml`` (the pinned
release and the sha256 of its archive), ``.patches`` (the series order, one file name a
line) and ``patches/*.patch`` (``git format-patch`` output, zeroed "From" hash).

  materialize  download the pinned archive once into a cache, verify its hash, unpack it
               into a git repository (commit "upstream", tag ``upstream``) and apply the
               series with ``git am``; on failure name the patch and the file, and leave
               no tree behind. An existing tree is kept when it matches the series, made
               again when the series changed since it was made (after a pull), and refused
               when it holds work that is not in the series.
  export       turn the commits (and uncommitted edits to files the series already
               touches) of a materialized tree back into the series; byte-stable.
  install      ``pip install -e`` each materialized fork into the running interpreter.

Only the registry is reached, through pip, and only when the cache lacks the archive.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("HRPO_FORK_CACHE", Path.home() / ".cache" / "hrpo-forks"))
# Fixed identity and dates keep the base commit, and so every export, reproducible.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "upstream",
    "GIT_AUTHOR_EMAIL": "upstream@invalid",
    "GIT_COMMITTER_NAME": "upstream",
    "GIT_COMMITTER_EMAIL": "upstream@invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+00:00",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+00:00",
}
SERIES_FILE = ".patches"
# in a materialized tree's .git: the digests of the patches it was made from
MATERIALIZED_RECORD = "hrpo-materialized.json"
PATCH_DIR = "patches"


class ForkError(RuntimeError):
    """A failure the user must act on; the message says what and where."""


@dataclass
class Fork:
    folder: Path
    name: str
    version: str
    kind: str  # "sdist" or "wheel"
    archive: str
    sha256: str
    packages: tuple[str, ...] = ()

    @property
    def tree(self) -> Path:
        return self.folder / "tree"

    @property
    def series(self) -> list[str]:
        path = self.folder / SERIES_FILE
        if not path.exists():
            return []
        return [line.strip() for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    @classmethod
    def load(cls, folder: Path) -> "Fork":
        spec_path = folder / "upstream.toml"
        try:
            spec = tomllib.loads(spec_path.read_text())
        except FileNotFoundError:
            raise ForkError(f"{spec_path}: no upstream.toml; expected a fork folder") from None
        missing = [k for k in ("name", "version", "kind", "archive", "sha256") if k not in spec]
        if missing:
            raise ForkError(f"{spec_path}: missing keys {missing}")
        if spec["kind"] not in ("sdist", "wheel"):
            raise ForkError(f"{spec_path}: kind must be 'sdist' or 'wheel', got {spec['kind']!r}")
        return cls(folder=folder, name=spec["name"], version=spec["version"], kind=spec["kind"],
                   archive=spec["archive"], sha256=spec["sha256"].lower(),
                   packages=tuple(spec.get("packages", ())))


def discover(root: Path = REPO_ROOT) -> list[Fork]:
    return [Fork.load(p.parent) for p in sorted(root.glob("*/upstream.toml"))]


def select(names: list[str], root: Path) -> list[Fork]:
    if not names:
        return discover(root)
    return [Fork.load((root / n).resolve() if not Path(n).is_absolute() else Path(n)) for n in names]


def git(tree: Path, *args: str, env: dict | None = None, check: bool = True,
        capture: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(["git", "-C", str(tree), *args], env=full_env, text=True,
                          capture_output=capture)
    if check and proc.returncode != 0:
        raise ForkError(f"git {' '.join(args)} failed in {tree}:\n{proc.stderr.strip()}")
    return proc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(fork: Fork, cache: Path) -> Path:
    """Return the verified archive, downloading it through pip only if the cache lacks it."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / fork.archive
    if not path.exists():
        binary = ["--no-binary", ":all:"] if fork.kind == "sdist" else ["--only-binary", ":all:"]
        print(f"[forks] downloading {fork.name}=={fork.version} ({fork.kind}) into {cache}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *binary,
                               "--disable-pip-version-check", "-q", "-d", str(cache),
                               f"{fork.name}=={fork.version}"], text=True, capture_output=True)
        if proc.returncode != 0 or not path.exists():
            raise ForkError(f"could not download {fork.archive} for {fork.name}=={fork.version}:\n"
                            f"{proc.stderr.strip()[-2000:]}")
    actual = sha256_of(path)
    if actual != fork.sha256:
        raise ForkError(f"{path}: sha256 is {actual}, but {fork.folder / 'upstream.toml'} pins "
                        f"{fork.sha256}. The archive is corrupted or not the pinned release; "
                        f"delete it to download it again.")
    return path


def unpack(fork: Fork, archive: Path, dest: Path) -> None:
    if fork.kind == "sdist":
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        top = [p for p in dest.iterdir()]
        if len(top) == 1 and top[0].is_dir():  # sdists hold one folder, NAME-VERSION/
            for item in top[0].iterdir():
                item.rename(dest / item.name)
            top[0].rmdir()
        return
    with zipfile.ZipFile(archive) as whl:
        members = [m for m in whl.namelist()
                   if not fork.packages or m.split("/", 1)[0] in fork.packages]
        whl.extractall(dest, members=members)
    write_wheel_pyproject(fork, archive, dest)


def write_wheel_pyproject(fork: Fork, archive: Path, dest: Path) -> None:
    """A wheel has no build metadata: generate a pyproject.toml so ``pip install -e`` works."""
    with zipfile.ZipFile(archive) as whl:
        meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta_name).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    python_req = next((line.split(":", 1)[1].strip() for line in metadata.splitlines()
                       if line.startswith("Requires-Python:")), ">=3.9")
    packages = fork.packages or tuple(sorted(p.name for p in dest.iterdir() if (p / "__init__.py").exists()))
    deps = "".join(f"    {req!r},\n".replace("'", '"') if '"' not in req else f"    '{req}',\n" for req in requires)
    (dest / "pyproject.toml").write_text(
        "# Generated by tools/forks.py: the upstream wheel carries no build metadata.\n"
        "[build-system]\nrequires = [\"setuptools>=61\"]\nbuild-backend = \"setuptools.build_meta\"\n\n"
        f"[project]\nname = \"{fork.name}\"\nversion = \"{fork.version}\"\n"
        f"requires-python = \"{python_req}\"\ndependencies = [\n{deps}]\n\n"
        "[tool.setuptools.packages.find]\n"
        f"include = [{', '.join(repr(p + '*').replace(chr(39), chr(34)) for p in packages)}]\n\n"
        "[tool.setuptools.package-data]\n\"*\" = [\"*\"]\n")


def failing_file(am_output: str) -> str:
    for pattern in (r"error: patch failed: ([^:\n]+)", r"error: ([^:\n]+): does not exist in index",
                    r"error: ([^:\n]+): already exists in working directory",
                    r"error: ([^:\n]+): patch does not apply"):
        match = re.search(pattern, am_output)
        if match:
            return match.group(1)
    return "(see git's output below)"


def materialize(fork: Fork, cache: Path = DEFAULT_CACHE, force: bool = False) -> Path:
    if fork.tree.exists():
        if force:
            check_no_unexported_work(fork)
        elif not needs_rebuild(fork):
            print(f"[forks] {fork.tree} matches the series; keeping it")
            return fork.tree
        shutil.rmtree(fork.tree)
    archive = fetch_archive(fork, cache)
    staging = Path(tempfile.mkdtemp(prefix=f".tree-{fork.name}-", suffix=".tmp", dir=fork.folder))
    try:
        unpack(fork, archive, staging)
        for stale in list(staging.glob("*.egg-info")) + list(staging.glob("src/*.egg-info")):
            shutil.rmtree(stale)  # build metadata, regenerated by every `pip install -e`
        git(staging, "init", "-q", "-b", "main")
        (staging / ".git" / "info" / "exclude").write_text("*.egg-info/\nbuild/\n__pycache__/\n*.pyc\n")
        git(staging, "config", "core.autocrlf", "false")
        git(staging, "config", "user.name", "HRPO fork")
        git(staging, "config", "user.email", "fork@hrpo.invalid")
        git(staging, "add", "-A", "-f")
        git(staging, "commit", "-q", "--no-verify", "-m", f"upstream {fork.name} {fork.version}", env=GIT_ENV)
        git(staging, "tag", "upstream")
        for name in fork.series:
            patch = fork.folder / PATCH_DIR / name
            if not patch.exists():
                raise ForkError(f"{fork.folder / SERIES_FILE} lists {name}, but {patch} does not exist")
            proc = git(staging, "am", "-q", "--keep-cr", "--committer-date-is-author-date", str(patch),
                       check=False)
            if proc.returncode != 0:
                out = proc.stdout + proc.stderr
                raise ForkError(f"patch {patch} does not apply to {fork.name} {fork.version}: "
                                f"file {failing_file(out)}\n{out.strip()}")
        (staging / ".git" / MATERIALIZED_RECORD).write_text(json.dumps(series_digest(fork)))
        staging.rename(fork.tree)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"[forks] materialized {fork.name} {fork.version} + {len(fork.series)} patches in {fork.tree}")
    return fork.tree


def series_digest(fork: Fork) -> list[str]:
    """sha256 of each patch of the series, in order."""
    return [hashlib.sha256((fork.folder / PATCH_DIR / name).read_bytes()).hexdigest() for name in fork.series]


def needs_rebuild(fork: Fork) -> bool:
    """An existing tree against the series: False when it is the series' tree (export gives the
    series back). True when it is the tree of an earlier series that nobody changed since (the
    series moved on, by a pull: a kept tree would run stale code). A tree with work of its own
    that is not in the series is an error: export it, or rebuild with --force."""
    if not (fork.tree / ".git").exists():
        return True
    dirty = git(fork.tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    bodies = [hashlib.sha256(body).hexdigest() for _, body in export_bytes(fork, include_dirty=False)]
    if not dirty and bodies == series_digest(fork):
        return False
    record = fork.tree / ".git" / MATERIALIZED_RECORD
    if not dirty and record.exists() and json.loads(record.read_text()) == bodies:
        print(f"[forks] the series of {fork.name} changed since {fork.tree} was made from it: rebuilding")
        return True
    raise ForkError(f"{fork.tree} does not match the series in {fork.folder / SERIES_FILE} and holds work of its "
                    f"own: run `forks.py export {fork.folder.name}` to keep it, or `forks.py materialize --force "
                    f"{fork.folder.name}` after that (or to discard it)")


def check_no_unexported_work(fork: Fork) -> None:
    if not (fork.tree / ".git").exists():
        return
    exported = {p.read_bytes() for p in (fork.folder / PATCH_DIR).glob("*.patch")}
    current = export_bytes(fork, include_dirty=False)
    dirty = git(fork.tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty or any(body not in exported for _, body in current):
        raise ForkError(f"{fork.tree} has work that is not in the series; run `forks.py export "
                        f"{fork.folder.name}` first (or delete the tree yourself to discard it)")


def slug(subject: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")[:72] or "patch"


def fold_dirty_edits(fork: Fork) -> None:
    """Fold uncommitted edits into the last series commit that touched each file."""
    dirty = [line[3:] for line in git(fork.tree, "status", "--porcelain", "--untracked-files=no")
             .stdout.splitlines() if line.strip()]
    if not dirty:
        return
    env = {"GIT_SEQUENCE_EDITOR": "true", "GIT_EDITOR": "true"}
    for path in dirty:
        owner = git(fork.tree, "log", "-1", "--format=%H", "upstream..HEAD", "--", path).stdout.strip()
        if not owner:
            raise ForkError(f"{fork.tree / path} is edited but no patch of the series touches it: "
                            f"commit it in {fork.tree} with a subject 'area: what it does' and a "
                            f"body saying why, then export again")
        git(fork.tree, "commit", "-q", "--no-verify", f"--fixup={owner}", "--", path)
    git(fork.tree, "-c", "rebase.autoSquash=true", "rebase", "-q", "-i",
        "--committer-date-is-author-date", "upstream", env=env)


def export_bytes(fork: Fork, include_dirty: bool = True) -> list[tuple[str, bytes]]:
    if include_dirty:
        fold_dirty_edits(fork)
    commits = git(fork.tree, "rev-list", "--reverse", "upstream..HEAD").stdout.split()
    out = []
    for sha in commits:
        subject = git(fork.tree, "log", "-1", "--format=%s", sha).stdout.strip()
        text = git(fork.tree, "format-patch", "-1", "--stdout", "--zero-commit", "--no-signature",
                   "--no-stat", "--keep-subject", "--no-numbered", sha).stdout
        # Drop blob hashes ("index ..." lines): they change with every upstream byte and
        # every edit, while the diff itself is what we review and replay.
        text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("index "))
        out.append((f"{slug(subject)}.patch", text.encode()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ForkError(f"two patches of {fork.tree} have the same subject: {names}")
    return out


def export(fork: Fork) -> list[str]:
    if not (fork.tree / ".git").exists():
        raise ForkError(f"{fork.tree} is not materialized; nothing to export")
    patches = export_bytes(fork)
    patch_dir = fork.folder / PATCH_DIR
    patch_dir.mkdir(exist_ok=True)
    keep = {name for name, _ in patches}
    for old in patch_dir.glob("*.patch"):
        if old.name not in keep:
            old.unlink()
    for name, body in patches:
        target = patch_dir / name
        if not target.exists() or target.read_bytes() != body:
            target.write_bytes(body)
    (fork.folder / SERIES_FILE).write_text("".join(f"{name}\n" for name, _ in patches))
    print(f"[forks] exported {len(patches)} patches of {fork.name} to {patch_dir}")
    return [name for name, _ in patches]


def install(forks: list[Fork], no_deps: bool) -> None:
    # compat mode: a plain path entry, so that the top-level patch folders (seen as
    # namespace packages from the repository root) never shadow the installed fork.
    # (pip applies --config-settings to every project of the command: give it once.)
    args = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--config-settings", "editable_mode=compat"]
    if no_deps:
        args.append("--no-deps")
    for fork in forks:
        if not fork.tree.exists():
            raise ForkError(f"{fork.tree} is not materialized; run `forks.py materialize` first")
        args += ["-e", str(fork.tree)]
    subprocess.run(args, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root holding the fork folders")
    sub = parser.add_subparsers(dest="verb", required=True)
    mat = sub.add_parser("materialize", help="download (once), verify, unpack and patch each fork")
    mat.add_argument("forks", nargs="*", help="fork folders (default: every folder with upstream.toml)")
    mat.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="archive cache (env HRPO_FORK_CACHE)")
    mat.add_argument("--force", action="store_true", help="rebuild trees that exist (refuses to drop unexported work)")
    exp = sub.add_parser("export", help="write a materialized tree's commits back into the series")
    exp.add_argument("forks", nargs="*")
    ins = sub.add_parser("install", help="pip install -e each materialized fork")
    ins.add_argument("forks", nargs="*")
    ins.add_argument("--no-deps", action="store_true", help="pass --no-deps to pip")
    args = parser.parse_args(argv)
    try:
        forks = select(args.forks, args.root.resolve())
        if args.verb == "materialize":
            for fork in forks:
                materialize(fork, args.cache, args.force)
        elif args.verb == "export":
            for fork in forks:
                export(fork)
        else:
            install(forks, args.no_deps)
    except ForkError as err:
        print(f"forks.py {args.verb}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
