#!/usr/bin/env python3
"""unsloth's CUDA fast paths against the transformers fork, on one set of weights (GPU).

Builds a Llama or Qwen2 from a config (hidden 1024, 4 layers; no hub), saves it with a
small tokenizer, then:

  reference  (a subprocess that never imports unsloth): the transformers fork in bf16 on
             CUDA: logits, one seeded hybrid rollout, its replay log-probs.
  unsloth    FastLanguageModel.from_pretrained on the same folder (real Triton kernels):
             logits; the replay of the reference rollout through the fast training path;
             its own hybrid rollout and that rollout's replay (sampling vs replay);
             decoding tokens/s of hybrid sampling against plain unsloth sampling.

Prints a summary and writes JSON. bf16 tolerances are stated in the output.

    python -m bench.unsloth_gpu --arch llama --json gpu-results/unsloth_llama.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BF16_LOGIT_TOL = 0.1      # max |logit difference| between two bf16 implementations
BF16_LOGPROB_TOL = 0.05   # max |log-prob difference| of the sampled tokens
TEMPERATURE = 0.7


def build(arch: str, folder: Path, source: str) -> None:
    from testing.tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    import torch

    tokenizer = tiny_tokenizer()
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, tie_word_embeddings=False, thinking_latent_source=source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def rollout(model, tokenizer, enc):
    from testing.rollouts import hybrid_rollout

    return hybrid_rollout(model, tokenizer, enc, seed=3, temperature=TEMPERATURE, max_new_tokens=32)


def replay(model, tokenizer, enc, out):
    from testing.rollouts import replay_rollout

    logprobs, mask, _ = replay_rollout(model, tokenizer, enc, out, TEMPERATURE)
    return logprobs, mask


def dtype_for(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reference(folder: Path, result: Path, device: str) -> None:
    """The transformers fork alone (run in its own process, unsloth never imported)."""
    import torch
    from testing.tiny import QUESTIONS, encode_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.hybrid_thinking.modeling import THINKING_INPUTS

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype_for(device)).to(device).eval()
    enc = encode_prompts(tokenizer, QUESTIONS).to(device)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    out = rollout(model, tokenizer, enc)
    logprobs, mask = replay(model, tokenizer, enc, out)
    thinking = {key: None if getattr(out, key) is None else getattr(out, key).cpu() for key in THINKING_INPUTS}
    torch.save({"input_ids": enc.input_ids.cpu(), "attention_mask": enc.attention_mask.cpu(),
                "logits": logits.cpu(), "sequences": out.sequences.cpu(), **thinking,
                "sampled": out.sampled_token_logprobs.cpu(), "replay": logprobs.cpu(), "mask": mask.cpu()}, result)


def tokens_per_second(model, tokenizer, enc, hybrid: bool, new_tokens: int, device: str, repeats: int = 3) -> float:
    import statistics

    import torch

    kwargs = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens)
    if hybrid:
        kwargs.update(processing_class=tokenizer, return_thinking_embeds=True, answer_marker="##")
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, **kwargs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return enc.input_ids.shape[0] * new_tokens / statistics.median(times)


def fast(folder: Path, reference_file: Path, new_tokens: int, device: str) -> dict:
    os.environ.setdefault("UNSLOTH_GRPO_PREFIX_GROUPER", "0")
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    import torch
    from transformers import BatchEncoding
    from transformers.hybrid_thinking.modeling import THINKING_INPUTS

    ref = torch.load(reference_file)
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=1024, dtype=dtype_for(device),
                                                         load_in_4bit=False)
    base = model.model
    forwards = (type(model).forward.__name__, type(base).forward.__name__)
    # the reference's own prompts, padding included (unsloth may change the tokenizer's padding side)
    enc = BatchEncoding({"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}).to(device)
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        logits = model(**enc).logits.float().cpu()
    attended = enc.attention_mask.bool().cpu()
    report = {"forwards": forwards,
              "logits_max_abs_diff": (logits - ref["logits"]).abs()[attended].max().item()}

    # the reference rollout replayed through the fast training forward
    FastLanguageModel.for_training(model)
    reference_out = type("Rollout", (), {k: (ref[k].to(device) if ref[k] is not None else None)
                                         for k in ("sequences", *THINKING_INPUTS)})()
    logprobs, mask = replay(model, tokenizer, enc, reference_out)
    mask = mask.bool().cpu()
    report["replay_of_reference_rollout_vs_reference_replay"] = (logprobs.cpu() - ref["replay"]).abs()[mask].max().item()
    prompt_len = enc.input_ids.shape[1]
    report["replay_of_reference_rollout_vs_reference_sampling"] = (
        (logprobs.cpu() - ref["sampled"][:, prompt_len:]).abs()[mask].max().item())

    # unsloth's own hybrid rollout, and its replay
    FastLanguageModel.for_inference(model)
    out = rollout(model, tokenizer, enc)
    FastLanguageModel.for_training(model)
    logprobs, mask = replay(model, tokenizer, enc, out)
    mask = mask.bool()
    report["unsloth_replay_vs_unsloth_sampling"] = (
        (logprobs - out.sampled_token_logprobs[:, prompt_len:]).abs()[mask].max().item())
    report["thinking_positions"] = int(out.thinking_mask.sum())

    FastLanguageModel.for_inference(model)
    plain = tokens_per_second(model, tokenizer, enc, hybrid=False, new_tokens=new_tokens, device=device)
    hybrid = tokens_per_second(model, tokenizer, enc, hybrid=True, new_tokens=new_tokens, device=device)
    report.update(decoding_tokens_per_s_plain=plain, decoding_tokens_per_s_hybrid=hybrid,
                  decoding_hybrid_time_ratio=plain / hybrid,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--source", default="projection",
                        choices=["embedding", "projection", "embedding_plus_projection"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of this script (float32; unsloth's CPU mode has no fast paths, so "
                             "the 'fast paths in place' check fails there by design)")
    parser.add_argument("--reference-only", nargs=2, type=Path, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build-only", type=Path, metavar="FOLDER",
                        help="only write the model and tokenizer to FOLDER (for the GRPO run of gpu_checks.sh)")
    args = parser.parse_args()
    if args.build_only:
        build(args.arch, args.build_only, args.source)
        return
    if args.reference_only:
        reference(*args.reference_only, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, ref_file = Path(tmp) / "model", Path(tmp) / "reference.pt"
        build(args.arch, folder, args.source)
        subprocess.run([sys.executable, "-m", "bench.unsloth_gpu", "--reference-only", str(folder), str(ref_file),
                        "--device", args.device], check=True)
        report = {"arch": args.arch, "source": args.source, "tolerances": {
            "logits_max_abs_diff": BF16_LOGIT_TOL, "replay_*": BF16_LOGPROB_TOL,
            "unsloth_replay_vs_unsloth_sampling": BF16_LOGPROB_TOL}, **fast(folder, ref_file, args.new_tokens, args.device)}
    checks = {
        "fast paths in place": report["forwards"] == ("_CausalLM_fast_forward", "LlamaModel_fast_forward"),
        "logits": report["logits_max_abs_diff"] <= BF16_LOGIT_TOL,
        "replay of the reference rollout": report["replay_of_reference_rollout_vs_reference_replay"] <= BF16_LOGPROB_TOL,
        "unsloth replay vs its sampling": report["unsloth_replay_vs_unsloth_sampling"] <= BF16_LOGPROB_TOL,
        "rollout had thinking positions": report["thinking_positions"] > 0,
    }
    report["checks"] = checks
    print(json.dumps(report, indent=1))
    print("ALL PASS" if all(checks.values()) else f"FAILED: {[k for k, v in checks.items() if not v]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
