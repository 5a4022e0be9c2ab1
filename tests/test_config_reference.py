"""docs/config_reference.md is generated from the settings schemas; the committed file must match the code."""

from __future__ import annotations

from anima_trainer.cli import main
from anima_trainer.compat.reference import DOC_PATH, REGENERATE, render_reference
from anima_trainer.config import TrainConfig


def test_committed_reference_is_up_to_date():
    committed = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
    assert committed == render_reference(), (
        f"docs/config_reference.md is out of date with the TrainConfig / dataset schemas; regenerate it with\n"
        f"    {REGENERATE}\n(or: python -m anima_trainer.compat.reference --write)")


def test_every_setting_has_type_default_and_meaning():
    text = render_reference().split("## Training settings")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    for name, _info in TrainConfig.model_fields.items():
        cells = [c.strip() for c in rows[name].replace("\\|", "/").split("|")[1:-1]]
        assert cells[1] and cells[2], name  # type and default
        assert cells[3], f"{name}: add a Field description"
    assert "`anima_transformer`" in rows["pretrained_model_name_or_path"]  # sd-scripts-anima alias listed
    # the meanings live on the fields (no table beside the model): --help shows the same text
    undescribed = [n for n, info in TrainConfig.model_fields.items() if not (info.description or "").strip()]
    assert not undescribed, f"fields without a description: {undescribed}"


def test_cli_prints_the_reference(capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == render_reference()


def test_every_setting_is_in_exactly_one_section():
    from anima_trainer.config.sections import SECTIONS, section_of

    listed = [n for _, _, names in SECTIONS for n in names]
    assert sorted(listed) == sorted(TrainConfig.model_fields), "config/sections.py must list every setting once"
    assert section_of("network_dim") == "network" and section_of("blocks_to_swap") == "speed and memory"
    text = render_reference()
    assert [line for line in text.splitlines() if line.startswith("### ")][:2] == ["### Model files", "### Network"]
