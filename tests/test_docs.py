"""Docs stay true: every training setting is documented, and the README starts with the two commands."""

from pathlib import Path

from anima_trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_train_setting_is_documented():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [name for name in TrainConfig.model_fields if f"`{name}`" not in text]
    assert not missing, f"docs/training.md lacks {missing}"


def test_readme_starts_with_demo_and_test_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "```bash"
    assert lines[1].startswith("./dev.sh demo") and lines[2].startswith("./dev.sh test")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./dev.sh test" in ci


def test_every_package_docstring_lists_what_it_holds():
    """Each package's `__init__` docstring is its table of contents (issue 16): it names every module and
    sub-package it holds (as `name.py`, `name/` or `` `name` ``) and no module that is gone."""
    import ast
    import re

    src = ROOT / "src" / "anima_trainer"
    problems = []
    for init in sorted(src.rglob("__init__.py")):
        package = init.parent
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        held = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
        held |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
        for name in sorted(held):
            if not re.search(rf"(?<![\w.]){re.escape(name)}(\.py\b|/|`)", doc):
                problems.append(f"{init.relative_to(ROOT)} does not list {name}")
        for name in re.findall(r"(?<![\w./])(\w+)\.py\b", doc):
            if name not in held and not (src / f"{name}.py").is_file() and not (ROOT / f"{name}.py").is_file():
                problems.append(f"{init.relative_to(ROOT)} lists {name}.py, which is not in the package")
    assert not problems, "\n".join(problems)
