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


def left_padded(tokenizer, eos_token_ids=None):
    """Batched generation pads on the left, with a dedicated pad token (see dedicated_pad_token)."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token = dedicated_pad_token(tokenizer, eos_token_ids)
    return tokenizer


class PadTokenError(DataError):
    """The tokenizer has no token that can serve as a dedicated pad token."""


def tokens_the_chat_template_emits(tokenizer) -> set[int]:
    """The ids of a rendered two-turn conversation (system, user, assistant, user, generation prompt)."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    if getattr(tokenizer, "chat_template", None) is None:
        return set()
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, *turns], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template without a system role
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return set(tokenizer(text, add_special_tokens=True).input_ids)


def dedicated_pad_token(tokenizer, eos_token_ids=None) -> str:
    """A pad token that no chat template emits and that ends no completion.

    unsloth's GRPO loss (left packing) drops every pad-id token of a scored sequence. With
    pad = EOS (SmolLM2's export, many Llama models) and a template that puts EOS between
    turns, that drops prompt tokens, and a completion that stops on a pad-id token loses its
    last token. So the pad must differ from every stop id (``eos_token_ids``: the generation
    config's, one id or a list, plus the tokenizer's) and from every token of a rendered
    conversation. The tokenizer's own pad is kept when it qualifies; otherwise an existing
    special token is chosen (names with "pad" first, then "reserved"/"unused", then the
    lowest id), never one with another role (bos, unk, ...). No embedding resize: the
    chosen token is already in the model's vocabulary.
    """
    from .replay import stop_token_ids

    stop = set(stop_token_ids(eos_token_ids)) | set(stop_token_ids(tokenizer.eos_token_id))
    emitted = tokens_the_chat_template_emits(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stop | emitted:
        return tokenizer.pad_token
    roles = {getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "unk", "sep", "cls", "mask")}
    candidates = [(token_id, added.content) for token_id, added in sorted(tokenizer.added_tokens_decoder.items())
                  if added.special and token_id not in stop | emitted | roles]
    if not candidates:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PadTokenError(
            f"the tokenizer of {name} has no dedicated pad token: its pad {tokenizer.pad_token!r} is a stop id "
            f"{sorted(stop)} or appears in its chat template, and no other special token is free. Add one "
            f"(tokenizer.add_special_tokens({{'pad_token': '<|pad|>'}}) and model.resize_token_embeddings(len("
            f"tokenizer))), save both to a folder and pass that folder as --model_name")

    def preference(candidate):
        token_id, text = candidate
        lowered = text.lower()
        return (0 if "pad" in lowered else 1 if "reserved" in lowered or "unused" in lowered else 2, token_id)

    return min(candidates, key=preference)[1]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
