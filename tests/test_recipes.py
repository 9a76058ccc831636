"""The recipes (configs/recipes/*.yaml) and task scripts (hrpo_*.py) that call themselves
HRPO's settings are exactly the published setting each names: every value of the table in
testing/published.py, read through our parser (HRPO's flag names are aliases of our fields).
A recipe is read on its own (no task script's defaults), as any entry script reads it."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

from hrpo import train
from hrpo.settings_parser import parse_settings, settings_parser
from testing.published import OURS, PUBLISHED

REPO = Path(__file__).resolve().parent.parent


def script_defaults(name: str, monkeypatch) -> dict:
    """The defaults ``python NAME`` gives hrpo.train.main (run as a user runs it, main stubbed)."""
    seen = {}
    monkeypatch.setattr(train, "main", lambda argv=None, description=None, **defaults: seen.update(defaults) or 0)
    monkeypatch.setattr(sys, "argv", [str(REPO / name)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / name), run_name="__main__")
    assert exit_.value.code == 0
    return seen


def settings_of(path: str, monkeypatch):
    if path.endswith(".yaml"):
        return parse_settings(["--config", str(REPO / path)])
    return parse_settings([], settings_parser(**script_defaults(path, monkeypatch)))


def setting(settings, name: str):
    for part in (settings.task, settings.model, settings.training, settings.thinking):
        if hasattr(part, name):
            value = getattr(part, name)
            return getattr(value, "value", value)  # transformers' enums (scheduler, optimizer)
    raise AssertionError(f"no field {name}")


def differences(settings, expected: dict) -> dict:
    fields = settings_parser().field_names()  # flag names and aliases -> fields
    wrong = {}
    for flag, published in expected.items():
        if flag == "optimizer" and not torch.cuda.is_available():
            continue  # paged 8-bit AdamW needs CUDA; the CPU's AdamW (fused once unsloth is imported) stands in
        got = setting(settings, fields[flag])
        same = got == pytest.approx(published, rel=1e-9) if isinstance(published, float) else got == published
        if not same:
            wrong[flag] = (got, published)
    return wrong


@pytest.mark.parametrize("ours", sorted(OURS))
def test_each_recipe_and_task_script_is_the_published_setting_it_names(ours, monkeypatch):
    source, changes = OURS[ours]
    wrong = differences(settings_of(ours, monkeypatch), {**PUBLISHED[source], **changes})
    assert not wrong, f"{ours} is not {source}: {{flag: (ours, published)}} {wrong}"


def test_every_recipe_is_checked_or_says_it_is_not_hrpos():
    recipes = {str(p.relative_to(REPO)) for p in (REPO / "configs" / "recipes").glob("*.yaml")}
    assert recipes - set(OURS) == {"configs/recipes/cpu_demo.yaml"}
    demo = (REPO / "configs" / "recipes" / "cpu_demo.yaml").read_text()
    assert "HRPO's published" not in demo and "HRPO's recipe" not in demo
    for path in recipes & set(OURS):
        first = (REPO / path).read_text().splitlines()[0]
        assert first.startswith("# HRPO's"), (path, first)  # names what it is


def test_the_published_table_tells_the_settings_apart(monkeypatch):
    """The check can fail: the GSM8K defaults are not HRPO's MATH setting, and the 3B recipe
    differs from the 1.5B one in exactly the README's three flags."""
    gsm8k = settings_of("hrpo_gsm8k.py", monkeypatch)
    assert set(differences(gsm8k, PUBLISHED["HRPO hrpo_math.py"])) == {"group_size", "per_device_train_batch_size"}
    assert set(differences(gsm8k, PUBLISHED["HRPO README, Qwen2.5-3B on GSM8K"])) == {
        "model_name", "residual_r_min", "group_size"}
