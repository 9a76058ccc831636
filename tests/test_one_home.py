"""Each setting is declared once: the thinking fields only in the fork's ThinkingConfig."""
from pathlib import Path

from transformers.hybrid_thinking.config import LATENT_SOURCES, THINKING_FIELDS

REPO = Path(__file__).resolve().parent.parent
# the library and the entry points (tests and benches use the fields; they declare none)
PROJECT_CODE = sorted([*REPO.glob("*.py"), *(REPO / "hrpo").rglob("*.py")])


def test_the_thinking_fields_are_declared_only_in_the_forks_thinking_config():
    assert PROJECT_CODE and "thinking_latent_source" in THINKING_FIELDS
    found = []
    for path in PROJECT_CODE:
        text = path.read_text()
        for name in THINKING_FIELDS:
            if name == "answer_marker":  # the task's (hrpo/tasks): the model config takes it from there
                continue
            for declaration in (f'"--{name}"', f"'--{name}'", f'"{name}": ', f"'{name}': ", f"{name}: "):
                if declaration in text:
                    found.append(f"{path.relative_to(REPO)}: {declaration}")
        if repr(LATENT_SOURCES)[1:-1] in text or repr(list(LATENT_SOURCES))[1:-1] in text:
            found.append(f"{path.relative_to(REPO)}: the latent sources retyped")
    assert not found, found
