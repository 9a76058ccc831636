"""GSM8K data: loading (hub name or local jsonl/json/parquet), checks, chat prompts, and a
generator of GSM8K-format sample problems for tests and the offline demo."""
from __future__ import annotations

import json
import random
from pathlib import Path

from .rewards import SYSTEM_PROMPT, reference_answer

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset problem, found before any training starts."""


def load_gsm8k(dataset_path: str, split: str = "train"):
    """A `datasets.Dataset` with `question` and `answer` columns, checked row by row.

    ``dataset_path``: a local .jsonl/.json/.parquet file, a folder of them, or a hub
    dataset name (``openai/gsm8k``, config ``main``).
    """
    import datasets

    path = Path(dataset_path)
    if path.is_file():
        kind = LOCAL_FORMATS.get(path.suffix)
        if kind is None:
            raise DataError(f"--dataset_path {dataset_path}: expected a .jsonl, .json or .parquet file")
        if kind == "json" and not path.read_text(errors="replace").strip():
            raise DataError(f"dataset {dataset_path} (0 rows): it is empty")
        try:
            dataset = datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
        except Exception as err:  # the datasets library's own errors name neither file nor row
            raise DataError(f"dataset {dataset_path}: cannot be read as {kind} ({type(err).__name__}: {err})") from err
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS and split in p.stem)
        if not files:
            raise DataError(f"--dataset_path {dataset_path}: no {split}*.jsonl/.json/.parquet file in this folder")
        kind = LOCAL_FORMATS[files[0].suffix]
        dataset = datasets.load_dataset(kind, data_files={split: [str(f) for f in files]}, split=split)
    elif dataset_path.startswith((".", "/")) or dataset_path.endswith(tuple(LOCAL_FORMATS)):
        raise DataError(f"--dataset_path {dataset_path}: no such file or folder")
    else:
        try:
            dataset = datasets.load_dataset(dataset_path, "main", split=split)
        except Exception as err:  # offline, unknown name, no such split: say which input and what to do
            raise DataError(f"--dataset_path {dataset_path}: cannot load split {split!r} of this hub dataset "
                            f"({type(err).__name__}: {str(err)[:300]}); without hub access pass a local "
                            f"GSM8K-format .jsonl/.json/.parquet file") from err
    check_gsm8k(dataset, dataset_path)
    return dataset


def check_gsm8k(dataset, name: str) -> None:
    if len(dataset) == 0:
        raise DataError(f"dataset {name} ({len(dataset)} rows): it is empty")
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise DataError(f"dataset {name}: missing column(s) {sorted(missing)}; expected 'question' and 'answer' "
                        f"(GSM8K format), found {dataset.column_names}")
    for index, row in enumerate(dataset):
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise DataError(f"dataset {name}, row {index}: the question is empty")
        if not isinstance(row["answer"], str) or not row["answer"].strip():
            raise DataError(f"dataset {name}, row {index}: the answer is missing")
        if reference_answer(row["answer"]) is None:
            raise DataError(f"dataset {name}, row {index}: the answer {row['answer'][-60:]!r} has no number "
                            f"after '####' (expected '... #### <number>')")


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


def to_prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def with_prompts(dataset):
    """Add TRL's conversational ``prompt`` column (system + user messages)."""
    return dataset.map(lambda row: {"prompt": to_prompt(row["question"])})


# ---------------------------------------------------------------- sample problems

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}")
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that?",
                f"{a} bags of {b} make {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n#### {a * b}")
    if kind == 2:
        b = rng.randint(2, 20)
        a = b + rng.randint(1, 40)
        return (f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
                f"{a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} are left.\n#### {a - b}")
    per, groups = rng.randint(2, 9), rng.randint(2, 9)
    total, price = per * groups, rng.randint(2, 5)
    return (f"{name} shares {total} {item} equally among {groups} friends and sells each friend's share "
            f"for ${price} per item. How many dollars does one friend's share cost?",
            f"Each friend gets {total} / {groups} = <<{total}/{groups}={per}>>{per} {item}. "
            f"That costs {per} * {price} = <<{per}*{price}={per * price}>>{per * price} dollars.\n"
            f"#### {per * price}")


def make_sample_problems(count: int, seed: int = 0) -> list[dict]:
    """Templated grade-school problems in GSM8K's format (ours, not dataset rows)."""
    rng = random.Random(seed)
    return [dict(zip(("question", "answer"), _problem(rng))) for _ in range(count)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
