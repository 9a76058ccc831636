"""Data plumbing shared by the tasks: local files or hub datasets, tokenizer padding,
and writing rows. Each task's own loading and checks are in ``hrpo/tasks/``."""
from __future__ import annotations

import json
from pathlib import Path

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset problem, found before any training starts."""


def load_rows(dataset_path: str, split: str, hub_config: str | None = None, expected: str = "task-format"):
    """A `datasets.Dataset` from a local .jsonl/.json/.parquet file, a folder of them
    (files whose name contains the split), or a hub dataset (``hub_config``)."""
    import datasets

    path = Path(dataset_path)
    if path.is_file():
        kind = LOCAL_FORMATS.get(path.suffix)
        if kind is None:
            raise DataError(f"--dataset_path {dataset_path}: expected a .jsonl, .json or .parquet file")
        if kind == "json" and not path.read_text(errors="replace").strip():
            raise DataError(f"dataset {dataset_path} (0 rows): it is empty")
        try:
            return datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
        except Exception as err:  # the datasets library's own errors name neither file nor row
            raise DataError(f"dataset {dataset_path}: cannot be read as {kind} ({type(err).__name__}: {err})") from err
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS and split in p.stem)
        if not files:
            raise DataError(f"--dataset_path {dataset_path}: no {split}*.jsonl/.json/.parquet file in this folder")
        kind = LOCAL_FORMATS[files[0].suffix]
        return datasets.load_dataset(kind, data_files={split: [str(f) for f in files]}, split=split)
    if dataset_path.startswith((".", "/")) or dataset_path.endswith(tuple(LOCAL_FORMATS)):
        raise DataError(f"--dataset_path {dataset_path}: no such file or folder")
    try:
        return datasets.load_dataset(dataset_path, hub_config, split=split)
    except Exception as err:  # offline, unknown name, no such split: say which input and what to do
        raise DataError(f"--dataset_path {dataset_path}: cannot load split {split!r} of this hub dataset "
                        f"({type(err).__name__}: {str(err)[:300]}); without hub access pass a local "
                        f"{expected} .jsonl/.json/.parquet file") from err


def left_padded(tokenizer):
    """Batched generation pads on the left; models without a pad token pad with EOS."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
