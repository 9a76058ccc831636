"""Tiny models and a tokenizer built in-process (no hub, no network)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<eos>", "<unk>"]
# "#", "##" and "###" let a random model write the marker in pieces.
PIECES = ["#", "##", "###", " ", "\n", "+", "=", "?", ".", ","] + list("abcdefghij") + list("0123456789")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Role-less and short: the tiny tokenizer is per character, so training prompts stay short.
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
# Questions written in the tiny tokenizer's characters.
QUESTIONS = ["a+b?", "1+2=?", "abc def", "9", "c,d.e+f=?", "j", "12+3", "hello"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer whose decoder concatenates pieces exactly."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + PIECES + ["s", "y", "t", "m", "u", "r", "o", "n", "l", "p"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 32, **thinking):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=None,
               tie_word_embeddings=False, **thinking)


def tiny_model(arch: str, tokenizer=None, seed: int = 0, hidden_size: int = 32, hybrid: bool = True, **thinking):
    """hybrid: built with hybrid thinking (thinking_latent_source default "embedding");
    False: upstream's plain model, as a base model from the hub (thinking fields not allowed)."""
    if hybrid:
        thinking.setdefault("thinking_latent_source", "embedding")
    elif thinking:
        raise ValueError(f"hybrid=False with thinking fields {sorted(thinking)}")
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    model = cls(tiny_config(arch, len(tokenizer), hidden_size, **thinking)).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def encode_prompts(tokenizer, questions):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def save_tiny_chat_model(folder, arch: str = "qwen2", hidden_size: int = 64, chat_template: str | None = None,
                         tie_word_embeddings: bool = False):
    """A tiny plain model and its tokenizer saved to ``folder``, for runs of the training script
    and the benches. chat_template: default CHAT_TEMPLATE (with roles)."""
    tokenizer = tiny_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = tiny_model(arch, tokenizer, hidden_size=hidden_size, hybrid=False)
    if tie_word_embeddings:  # the LM head becomes the embedding matrix
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
