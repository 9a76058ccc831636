#!/usr/bin/env python3
"""Materialize, export, list and install the forks: an overlay of own files plus a patch series.

A fork folder (``transformers/``, ``unsloth/``) holds ``upstream.toml`` (the pinned
release and the sha256 of its archive), ``overlay/`` (the files the project owns in the fork,
at their paths in the tree, as plain files), ``.patches`` (the series order, one file name a
line; the one list of patches) and ``patches/*.patch`` (``git format-patch`` output, zeroed
"From" hash). The patches change only upstream's files; a file upstream does not have lives
in the overlay.

  materialize  download the pinned archive once into a cache, verify its hash, unpack it
               into a git repository (commit "upstream", tag ``upstream``), copy the overlay
               in (one commit) and apply the series with ``git am``; on failure name the
               patch and the file, and leave no tree behind. An existing tree is kept when it
               matches the overlay and series, made again when they changed since it was made
               (after a pull), and refused when it holds work that is not in them.
  export       turn a materialized tree back into the overlay (every file upstream does not
               have) and the series (each commit's hunks in upstream's files; uncommitted
               edits are folded into the commit that last touched the file); byte-stable.
  list         print the series: each patch's subject, reason category and files.
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
OVERLAY_DIR = "overlay"
OVERLAY_SUBJECT = "overlay: the project's own files"
# Each patch says why it exists (the categories of Electron's patch discipline) and why its
# change cannot live in the overlay, as trailers of its message.
CATEGORY_TRAILER = "Patch-Category"
CATEGORIES = {
    "for-upstream": "temporary: a fix or feature meant to be proposed upstream",
    "fork-only": "needed only here: HRPO's hooks in upstream's code",
    "incompatible": "changes upstream's behaviour in a way upstream would not take",
}
WHY_TRAILER = "Why-Not-Overlay"
SKIPPED_IN_OVERLAY = ("__pycache__", ".pyc")


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
    def overlay(self) -> Path:
        return self.folder / OVERLAY_DIR

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
        capture: bool = True, text: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(["git", "-C", str(tree), *args], env=full_env, text=text,
                          capture_output=capture)
    if check and proc.returncode != 0:
        stderr = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise ForkError(f"git {' '.join(args)} failed in {tree}:\n{stderr.strip()}")
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
            print(f"[forks] {fork.tree} matches the overlay and series; keeping it")
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
        apply_overlay(fork, staging)
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
        (staging / ".git" / MATERIALIZED_RECORD).write_text(json.dumps(state_digest(*repo_state(fork))))
        staging.rename(fork.tree)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"[forks] materialized {fork.name} {fork.version} + {len(overlay_files(fork))} overlay files "
          f"+ {len(fork.series)} patches in {fork.tree}")
    return fork.tree


def overlay_files(fork: Fork) -> dict[str, bytes]:
    """The overlay's files by their path in the tree."""
    if not fork.overlay.exists():
        return {}
    return {path.relative_to(fork.overlay).as_posix(): path.read_bytes()
            for path in sorted(fork.overlay.rglob("*"))
            if path.is_file() and not any(part.endswith(SKIPPED_IN_OVERLAY) for part in path.parts)}


def apply_overlay(fork: Fork, tree: Path) -> None:
    """Copy the overlay into a tree that holds upstream only, as one commit."""
    files = overlay_files(fork)
    if not files:
        return
    for path, body in files.items():
        target = tree / path
        if target.exists():
            raise ForkError(f"{fork.overlay / path} is a file of upstream {fork.name} {fork.version}: the overlay "
                            f"holds only files upstream does not have; a change to upstream's file is a patch")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    git(tree, "add", "-f", "--", *files)
    git(tree, "commit", "-q", "--no-verify", "-m", OVERLAY_SUBJECT, "-m",
        f"The files of the fork that upstream does not have, kept as plain files in "
        f"{fork.folder.name}/{OVERLAY_DIR}/ of the project.", env=GIT_ENV)


def repo_state(fork: Fork) -> tuple[dict[str, bytes], list[tuple[str, bytes]]]:
    """The overlay and the series as the repository holds them."""
    return overlay_files(fork), [(name, (fork.folder / PATCH_DIR / name).read_bytes()) for name in fork.series]


def state_digest(overlay: dict[str, bytes], patches: list[tuple[str, bytes]]) -> dict:
    """sha256 of the overlay (paths and bytes) and of each patch of the series, in order."""
    digest = hashlib.sha256()
    for path in sorted(overlay):
        digest.update(path.encode() + b"\0" + hashlib.sha256(overlay[path]).digest())
    return {"overlay": digest.hexdigest(), "patches": [hashlib.sha256(body).hexdigest() for _, body in patches]}


def dirty_files(fork: Fork) -> list[str]:
    return [line[3:] for line in git(fork.tree, "status", "--porcelain", "--untracked-files=no")
            .stdout.splitlines() if line.strip()]


def unchanged_since_made(fork: Fork, current: dict) -> bool:
    """Whether the tree is still what materialize made (``current``: its digest now)."""
    record = fork.tree / ".git" / MATERIALIZED_RECORD
    if not record.exists():
        return False
    made = json.loads(record.read_text())
    if isinstance(made, list):  # made before the overlay: the digests of whole-commit patches
        commits = git(fork.tree, "rev-list", "--reverse", "upstream..HEAD").stdout.split()
        return made == [hashlib.sha256(format_patch(fork.tree, sha)).hexdigest() for sha in commits]
    return made == current


def needs_rebuild(fork: Fork) -> bool:
    """An existing tree against the overlay and series: False when it is their tree (export gives
    them back). True when it is the tree of an earlier overlay and series that nobody changed
    since (they moved on, by a pull: a kept tree would run stale code). A tree with work of its
    own that is not in them is an error: export it, or rebuild with --force."""
    if not (fork.tree / ".git").exists():
        return True
    dirty = dirty_files(fork)
    current = state_digest(*tree_state(fork, include_dirty=False))
    if not dirty and current == state_digest(*repo_state(fork)):
        return False
    if not dirty and unchanged_since_made(fork, current):
        print(f"[forks] the overlay or series of {fork.name} changed since {fork.tree} was made from them: rebuilding")
        return True
    raise ForkError(f"{fork.tree} does not match the overlay and series of {fork.folder} and holds work of its "
                    f"own: run `forks.py export {fork.folder.name}` to keep it, or `forks.py materialize --force "
                    f"{fork.folder.name}` after that (or to discard it)")


def check_no_unexported_work(fork: Fork) -> None:
    if not (fork.tree / ".git").exists():
        return
    current = state_digest(*tree_state(fork, include_dirty=False))
    if dirty_files(fork) or (current != state_digest(*repo_state(fork)) and not unchanged_since_made(fork, current)):
        raise ForkError(f"{fork.tree} has work that is not in the overlay and series; run `forks.py export "
                        f"{fork.folder.name}` first (or delete the tree yourself to discard it)")


def slug(subject: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")[:72] or "patch"


def fold_dirty_edits(fork: Fork) -> None:
    """Fold uncommitted edits into the last series commit that touched each file."""
    dirty = dirty_files(fork)
    if not dirty:
        return
    env = {"GIT_SEQUENCE_EDITOR": "true", "GIT_EDITOR": "true"}
    for path in dirty:
        owner = git(fork.tree, "log", "-1", "--format=%H", "upstream..HEAD", "--", path).stdout.strip()
        if not owner:
            raise ForkError(f"{fork.tree / path} is edited but neither the overlay nor a patch of the series touches it: "
                            f"commit it in {fork.tree} with a subject 'area: what it does' and a "
                            f"body saying why, then export again")
        git(fork.tree, "commit", "-q", "--no-verify", f"--fixup={owner}", "--", path)
    git(fork.tree, "-c", "rebase.autoSquash=true", "rebase", "-q", "-i",
        "--committer-date-is-author-date", "upstream", env=env)


def format_patch(tree: Path, sha: str, paths: list[str] | None = None) -> bytes:
    """One commit as a patch (of ``paths`` only, if given), byte-stable."""
    text = git(tree, "format-patch", "-1", "--stdout", "--zero-commit", "--no-signature", "--no-stat",
               "--keep-subject", "--no-numbered", *(["--no-renames", sha, "--", *paths] if paths else [sha])).stdout
    # Drop blob hashes ("index ..." lines): they change with every upstream byte and
    # every edit, while the diff itself is what we review and replay.
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("index ")).encode()


def paths_of(tree: Path, *args: str) -> list[str]:
    """The paths a git command lists with -z."""
    return [path for path in git(tree, *args).stdout.split("\0") if path]


def tree_state(fork: Fork, include_dirty: bool = True) -> tuple[dict[str, bytes], list[tuple[str, bytes]]]:
    """A materialized tree as overlay and series: every file upstream does not have, and each
    commit's hunks in upstream's files (a commit that touches none gives no patch)."""
    if include_dirty:
        fold_dirty_edits(fork)
    upstream = set(paths_of(fork.tree, "ls-tree", "-r", "-z", "--name-only", "upstream"))
    own = [path for path in paths_of(fork.tree, "ls-tree", "-r", "-z", "--name-only", "HEAD") if path not in upstream]
    overlay = {path: git(fork.tree, "show", f"HEAD:{path}", text=False).stdout for path in sorted(own)}
    patches = []
    for sha in git(fork.tree, "rev-list", "--reverse", "upstream..HEAD").stdout.split():
        changed = paths_of(fork.tree, "diff-tree", "--no-commit-id", "--no-renames", "-r", "-z", "--name-only", sha)
        paths = [path for path in changed if path in upstream]
        if not paths:
            continue
        subject = git(fork.tree, "log", "-1", "--format=%s", sha).stdout.strip()
        patches.append((f"{slug(subject)}.patch", format_patch(fork.tree, sha, paths)))
    names = [n for n, _ in patches]
    if len(set(names)) != len(names):
        raise ForkError(f"two patches of {fork.tree} have the same subject: {names}")
    return overlay, patches


def export(fork: Fork) -> list[str]:
    if not (fork.tree / ".git").exists():
        raise ForkError(f"{fork.tree} is not materialized; nothing to export")
    overlay, patches = tree_state(fork)
    for path in set(overlay_files(fork)) - set(overlay):
        (fork.overlay / path).unlink()
    for folder in sorted((p for p in fork.overlay.rglob("*") if p.is_dir()), reverse=True) if fork.overlay.exists() else []:
        if not any(folder.iterdir()):
            folder.rmdir()
    for path, body in overlay.items():
        target = fork.overlay / path
        if not target.exists() or target.read_bytes() != body:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
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
    print(f"[forks] exported {fork.name}: {len(overlay)} overlay files to {fork.overlay}, "
          f"{len(patches)} patches to {patch_dir}")
    return [name for name, _ in patches]


@dataclass
class PatchInfo:
    name: str
    subject: str
    category: str | None
    why_not_overlay: str | None
    files: list[str]


def patch_info(fork: Fork, name: str) -> PatchInfo:
    text = (fork.folder / PATCH_DIR / name).read_text()

    def field(key: str) -> str | None:  # a header or trailer line, with its folded continuation lines
        match = re.search(rf"^{key}: (.*(?:\n[ \t].*)*)", text, flags=re.MULTILINE)
        return " ".join(match.group(1).split()) if match else None

    files = re.findall(r"^diff --git a/(\S+) b/", text, flags=re.MULTILINE)
    return PatchInfo(name, field("Subject"), field(CATEGORY_TRAILER), field(WHY_TRAILER), files)


def list_series(fork: Fork) -> None:
    print(f"{fork.name} {fork.version}: {len(overlay_files(fork))} overlay files in {fork.overlay}, "
          f"{len(fork.series)} patches ({fork.folder / SERIES_FILE})")
    for number, name in enumerate(fork.series, 1):
        info = patch_info(fork, name)
        print(f"  {number}. {info.subject}\n     {CATEGORY_TRAILER}: {info.category}; files: {', '.join(info.files)}")


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
    lst = sub.add_parser("list", help="print each fork's series: subject, reason category, files")
    lst.add_argument("forks", nargs="*")
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
        elif args.verb == "list":
            for fork in forks:
                list_series(fork)
        else:
            install(forks, args.no_deps)
    except ForkError as err:
        print(f"forks.py {args.verb}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
