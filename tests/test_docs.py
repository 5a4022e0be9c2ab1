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
