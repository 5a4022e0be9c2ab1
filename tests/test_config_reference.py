"""docs/config_reference.md is generated from the settings schemas; the committed file must match the code."""

from __future__ import annotations

from anima_trainer.cli import main
from anima_trainer.config import TrainConfig
from anima_trainer.config.reference import DOC_PATH, FALLBACK_MEANINGS, REGENERATE, render_reference


def test_committed_reference_is_up_to_date():
    committed = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
    assert committed == render_reference(), (
        f"docs/config_reference.md is out of date with the TrainConfig / dataset schemas; regenerate it with\n"
        f"    {REGENERATE}\n(or: python -m anima_trainer.config.reference --write)")


def test_every_setting_has_type_default_and_meaning():
    text = render_reference().split("## Training settings")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    for name, _info in TrainConfig.model_fields.items():
        cells = [c.strip() for c in rows[name].replace("\\|", "/").split("|")[1:-1]]
        assert cells[1] and cells[2], name  # type and default
        assert cells[3], f"{name}: add a Field description (or a FALLBACK_MEANINGS entry)"
    assert "`anima_transformer`" in rows["pretrained_model_name_or_path"]  # sd-scripts-anima alias listed
    stale = set(FALLBACK_MEANINGS) - set(TrainConfig.model_fields)
    assert not stale, f"FALLBACK_MEANINGS names settings that no longer exist: {sorted(stale)}"


def test_cli_prints_the_reference(capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == render_reference()
