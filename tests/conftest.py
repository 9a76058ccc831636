import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def upstream_transformers(tmp_path_factory) -> Path:
    """Pristine transformers 5.17.0 sources (the materialized tree's `upstream` tag),
    importable with PYTHONPATH=<returned>/src: the unpatched reference for parity tests."""
    tree = REPO / "transformers" / "tree"
    if not (tree / ".git").exists():
        pytest.skip("transformers/tree is not materialized (run ./setup.sh)")
    dest = tmp_path_factory.mktemp("upstream-transformers")
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(tree), "archive", "-o", str(archive), "upstream", "src/transformers"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest

