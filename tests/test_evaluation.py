"""Evaluation decodes as training did: the full decoding config is explicit (nothing from
the checkpoint's generation_config), greedy forms the latent at the training temperature,
and a checkpoint without its saved config is refused."""
import json

import pytest
import torch

from hrpo.held_out import decoding_config, evaluate_rows, trainer_stop_ids
from hrpo.tasks import get_task
from testing.tiny import tiny_model, tiny_tokenizer


def rows(count=3):
    return get_task("arith").load("generated", "test").select(range(count)).to_list()


def test_decoding_ignores_the_checkpoints_generation_config():
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer)
    # what Qwen2.5-1.5B-Instruct ships
    model.generation_config.update(repetition_penalty=1.1, top_k=20, top_p=0.8, temperature=0.7, do_sample=True)
    config = decoding_config(model, tokenizer, temperature=0.5, greedy=True, max_new_tokens=7)
    merged, _ = model._prepare_generation_config(config)  # what generate() will actually use
    assert (merged.temperature, merged.top_k, merged.top_p, merged.repetition_penalty) == (0.5, 0, 1.0, 1.0)
    assert merged.max_new_tokens == 7 and not merged.min_p


def test_stop_ids_are_the_trainers():
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", tokenizer)
    model.generation_config.eos_token_id = [5, tokenizer.eos_token_id]
    assert trainer_stop_ids(model, tokenizer) == [5, tokenizer.eos_token_id]
    model.generation_config.eos_token_id = 5
    assert trainer_stop_ids(model, tokenizer) == [tokenizer.eos_token_id, 5]


def test_greedy_forms_the_embedding_latent_at_the_training_temperature(monkeypatch):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model = tiny_model("qwen2", tokenizer, thinking_latent_source="embedding")
    base = model.model
    seen = []
    original = type(base).embedding_method_latent
    monkeypatch.setattr(type(base), "embedding_method_latent",
                        lambda self, probs, *rest: seen.append(probs.detach().clone()) or original(self, probs, *rest))
    task = get_task("arith")
    row = rows(1)
    evaluate_rows(model, tokenizer, task, row, system_prompt="Answer after ####.", thinking=True, greedy=True,
                  temperature=0.5, max_new_tokens=3)
    text = tokenizer.apply_chat_template(task.to_prompt(row[0]["question"], "Answer after ####."), tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    assert torch.allclose(seen[0][0], torch.softmax(logits / 0.5, dim=-1), atol=1e-6)
    assert not torch.allclose(seen[0][0], torch.softmax(logits, dim=-1), atol=1e-3)


def test_plain_and_hybrid_greedy_evaluation_grade_every_row():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, thinking_latent_source="projection")
    for thinking in (True, False):
        result = evaluate_rows(model, tokenizer, get_task("arith"), rows(), system_prompt="hrpo", thinking=thinking,
                               greedy=True, temperature=0.5, max_new_tokens=4, batch_size=2)
        assert result["metrics"]["total"] == 3 and result["metrics"]["thinking"] is thinking
        assert {"completion", "predicted", "reference", "correct"} <= set(result["examples"][0])
    assert model.training is False


def test_a_checkpoint_without_its_config_is_refused(tmp_path):
    from hrpo.checkpoint import CheckpointError, load_checkpoint, run_settings

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(CheckpointError, match="no config.json.*thinking options"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="hrpo_run.json"):
        run_settings(tmp_path)
