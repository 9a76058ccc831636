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


ENTRY_SCRIPTS = ("hrpo_gsm8k", "hrpo_math", "hrpo_mmlu", "eval_gsm8k", "patch")


def absolute_imports() -> list[tuple[str, str]]:
    """(module path, imported name) for every absolute import of the project's Python files."""
    import ast

    found = []
    for path in sorted(REPO.glob("*.py")) + sorted(p for d in ("hrpo", "testing", "tests", "bench", "scripts")
                                                   for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [(str(path.relative_to(REPO)), name) for name in names]
    return found


def test_no_module_imports_an_entry_script():
    """The top-level scripts are shims over hrpo/; the library, the tests, the benches and the
    scripts import hrpo, never a script."""
    found = [f"{path}: {name}" for path, name in absolute_imports() if name in ENTRY_SCRIPTS]
    assert not found, found


def test_no_module_imports_a_test_module():
    """What tests share lives in testing/: no module imports tests/ or one of its modules."""
    test_modules = {path.stem for path in (REPO / "tests").glob("*.py")}
    found = [f"{path}: {name}" for path, name in absolute_imports() if name.split(".")[0] in ("tests", *test_modules)]
    assert not found, found


def test_the_entry_scripts_are_thin():
    for name in ENTRY_SCRIPTS:
        lines = (REPO / f"{name}.py").read_text().splitlines()
        assert len(lines) < 80, (name, len(lines))


def test_the_run_settings_file_has_one_name():
    from hrpo.checkpoint import RUN_SETTINGS

    code = [p for p in PROJECT_CODE if p.name != "checkpoint.py"] + sorted((REPO / "testing").rglob("*.py"))
    assert not [str(p) for p in code if f'"{RUN_SETTINGS}"' in p.read_text()]
