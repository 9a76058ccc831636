"""Model loading for both backends: unsloth's loader and LoRA (its fast paths on CUDA, the fork's
forward on the CPU), or transformers' loader and PEFT's LoRA. Hybrid thinking is opt-in by
configuration: the thinking fields go onto the config before the model is built."""
from __future__ import annotations

import os

from .config import HYBRID_MODEL_TYPES, Settings
from .errors import UsageError

def resolve_backend(settings: Settings) -> str:
    """auto: unsloth, a dependency of the project, so it is always there. On CPU that is
    unsloth's CPU mode (the fork's own forward, TRL's own trainer); on CUDA its fast paths and
    GRPO rewrite, which the forks carry HRPO through."""
    return "unsloth" if settings.training.backend == "auto" else settings.training.backend


def load_model(settings: Settings, cuda: bool, config=None):
    """LoRA on the target modules, the thinking modules of the source trained in full.

    Hybrid thinking is opt-in by configuration: the thinking fields go onto the config before
    the model is built, so the fork builds the modules (only those the source uses). With
    --hybrid_thinking off the config is left as it is: upstream's model."""
    from transformers import set_seed

    set_seed(settings.training.seed)  # the thinking modules (gates, Lambda, projection) are drawn while the model is built
    config = model_config(settings) if config is None else config
    loader = load_with_transformers if resolve_backend(settings) == "transformers" else load_with_unsloth
    model, tokenizer = loader(settings, config, cuda)
    if settings.hybrid and os.environ.get("LOCAL_RANK", "0") == "0":
        from transformers.hybrid_thinking.modeling import thinking_module_names

        names = ", ".join(thinking_module_names(settings.thinking.thinking_latent_source))
        if settings.training.resume:
            print(f"[hrpo] thinking modules {names}: restored from the checkpoint when training starts", flush=True)
        else:
            print(f"[hrpo] new thinking modules, trained from here (seed {settings.training.seed}): {names}",
                  flush=True)
    return model, tokenizer


def model_config(settings: Settings):
    """The model's config, with the thinking fields when hybrid (a model type without the thinking
    modules is a UsageError)."""
    from transformers import AutoConfig

    model_args = settings.model
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                            trust_remote_code=settings.training.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load its config ({err})") from None
    if settings.hybrid:
        if config.model_type not in HYBRID_MODEL_TYPES:
            names = f" ({', '.join(config.architectures)})" if config.architectures else ""
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: a {config.model_type} "
                             f"model{names}; HRPO's thinking modules exist for "
                             f"{' and '.join(HYBRID_MODEL_TYPES)} models (Qwen2 / Qwen2.5, Llama). Use one of those, "
                             f"or --hybrid_thinking off for plain GRPO")
        settings.thinking.apply_to(config)
    return config


def _dtype(settings: Settings, cuda: bool):
    import torch

    name = settings.model.dtype
    if name in (None, "auto"):
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    return getattr(torch, name)


def load_with_unsloth(settings: Settings, config, cuda: bool):
    """unsloth's loader and LoRA (its fast paths on CUDA; the fork's forward on CPU)."""
    from unsloth import FastLanguageModel

    from .data import left_padded

    m, t = settings.model, settings.training
    model, tokenizer = FastLanguageModel.from_pretrained(
        m.model_name_or_path, config=config, max_seq_length=t.max_prompt_length + t.max_completion_length,
        load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit, revision=m.model_revision,
        trust_remote_code=settings.training.trust_remote_code, attn_implementation=m.attn_implementation,
        dtype=None if cuda and m.dtype in (None, "auto") else _dtype(settings, cuda))
    model = FastLanguageModel.get_peft_model(
        model, r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules,
        modules_to_save=modules_to_save(settings), use_rslora=m.use_rslora,
        use_gradient_checkpointing="unsloth" if cuda and t.gradient_checkpointing else False,
        random_state=t.seed)
    return model, left_padded(tokenizer, model.generation_config.eos_token_id)


def load_with_transformers(settings: Settings, config, cuda: bool):
    """transformers' loader and PEFT's LoRA; the thinking copies trained in float32 as unsloth trains them."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.hybrid_thinking.modeling import THINKING_MODULES
    from trl import get_quantization_config

    from .data import left_padded

    m = settings.model
    quantization = get_quantization_config(m)
    model = AutoModelForCausalLM.from_pretrained(
        m.model_name_or_path, config=config, dtype=_dtype(settings, cuda), revision=m.model_revision,
        trust_remote_code=settings.training.trust_remote_code, attn_implementation=m.attn_implementation,
        quantization_config=quantization)
    if cuda and quantization is None:
        model.to("cuda")
    model = get_peft_model(model, LoraConfig(
        r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules,
        modules_to_save=modules_to_save(settings), use_rslora=m.use_rslora, use_dora=m.use_dora,
        task_type=m.lora_task_type))
    for name, module in model.named_modules():  # thinking copies train in float32, as unsloth does
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in THINKING_MODULES:
            module.modules_to_save["default"].float().requires_grad_(True)
    tokenizer = AutoTokenizer.from_pretrained(m.model_name_or_path, revision=m.model_revision,
                                              trust_remote_code=settings.training.trust_remote_code)
    return model, left_padded(tokenizer, model.generation_config.eos_token_id)


def modules_to_save(settings: Settings) -> list[str] | None:
    """The thinking modules the source uses are trained in full with HRPO (the model has no
    others; plain GRPO builds none), with any --lora_modules_to_save."""
    from transformers.hybrid_thinking.modeling import thinking_module_names

    names = list(settings.model.lora_modules_to_save or [])
    if settings.hybrid:
        names += list(thinking_module_names(settings.thinking.thinking_latent_source))
    return names or None


def check_thinking_config(model, settings: Settings) -> None:
    """The loaded model must carry the thinking options asked for (they shape its modules)."""
    if not settings.hybrid:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, wanted in settings.thinking.to_dict().items():
        got = getattr(base.config, key, None)
        if got != wanted:
            raise UsageError(f"the loaded model has {key}={got!r}, but {wanted!r} was asked for: the loader "
                             f"dropped the config (--backend {settings.training.backend})")


def load_tokenizer(settings: Settings):
    from transformers import AutoTokenizer

    m = settings.model
    try:
        return AutoTokenizer.from_pretrained(m.model_name_or_path, revision=m.model_revision,
                                             trust_remote_code=settings.training.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {m.model_name_or_path}: cannot load its tokenizer ({err})") from None
