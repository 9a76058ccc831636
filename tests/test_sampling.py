"""hrpo.sampling: which generation settings reshape the sampling distribution, as generate() resolves them."""
import pytest
from transformers import GenerationConfig

from hrpo.sampling import NEUTRAL_SAMPLING, check_sampling_distribution, distribution_changes


def test_the_neutral_set_changes_nothing_whatever_the_model_ships():
    trainer = GenerationConfig(do_sample=True, temperature=0.5, **NEUTRAL_SAMPLING)
    model = GenerationConfig(top_k=20, top_p=0.8, repetition_penalty=1.1, min_p=0.2, no_repeat_ngram_size=2,
                             min_length=12, typical_p=0.9)
    assert distribution_changes(trainer, model) == {}


@pytest.mark.parametrize("model_settings, expected", [
    ({"min_p": 0.2}, {"min_p": 0.2}),
    ({"no_repeat_ngram_size": 2, "top_k": 20}, {"no_repeat_ngram_size": 2, "top_k": 20}),
    ({"min_length": 12}, {"min_length": 12}),  # in force: nothing sets min_new_tokens here
    ({"suppress_tokens": [5]}, {"suppress_tokens": [5]}),
    ({"suppress_tokens": []}, {}),
    ({"top_k": 0, "top_p": 1.0}, {}),
])
def test_a_model_setting_left_unset_by_the_caller_is_found(model_settings, expected):
    assert distribution_changes(GenerationConfig(do_sample=True), GenerationConfig(**model_settings)) == expected


def test_the_error_names_each_setting():
    trainer = GenerationConfig(do_sample=True, **NEUTRAL_SAMPLING)
    with pytest.raises(ValueError, match=r"GRPO training: .*forced_bos_token_id=3.*off-policy"):
        check_sampling_distribution(trainer, GenerationConfig(forced_bos_token_id=3), "GRPO training")
