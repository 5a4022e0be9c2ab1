"""An evaluation's results as one document: what `anima-trainer eval` writes to `results.json` and what
`report.html` is drawn from, so every number on the page can be checked against the file (and the file against
a training run's event log).

    EvalResults
      command            the command line that reproduces the folder
      settings           everything the numbers depend on (model files, seeds, σ, strengths, trigger, prompts)
      base_heldout       held-out loss of the base model (strength 0), None without held-out images
      checkpoints        one `CheckpointResult` per network, in training order (step, then epoch, then name)
        heldout_loss     at strength 1
        strengths        `StrengthMetrics` per strength: drift, response, leak score
        analysis         the weight analysis (`NetworkAnalysis.to_dict()`), None when not computed
      grids              the image grids (`GridImage`), paths relative to the results folder

Everything is plain JSON (NaN → null, via `SigmaMetric.as_dict`); `from_dict(as_dict())` gives an equal object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anima_trainer.evaluation.probe import StrengthMetrics
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.fileio import atomic_write_bytes

RESULTS_NAME = "results.json"
RESULTS_VERSION = 1


def _metric(data: dict | None) -> SigmaMetric | None:
    return None if data is None else SigmaMetric.from_dict(data)


@dataclass
class CheckpointResult:
    """One network file's numbers.  `label`: how tables and grids name it (the file's stem); `ema`: the file
    holds EMA weights (`<name>-ema.safetensors`); `step` / `epoch`: where training saved it (None: unknown)."""

    label: str
    path: str
    step: int | None = None
    epoch: int | None = None
    ema: bool = False
    heldout_loss: SigmaMetric | None = None
    strengths: list[StrengthMetrics] = field(default_factory=list)
    analysis: dict[str, Any] | None = None

    def at_strength(self, strength: float) -> StrengthMetrics | None:
        """The metrics measured at `strength`, or None."""
        return next((s for s in self.strengths if s.strength == strength), None)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.path, "step": self.step, "epoch": self.epoch, "ema": self.ema,
                "heldout_loss": None if self.heldout_loss is None else self.heldout_loss.as_dict(),
                "strengths": [s.as_dict() for s in self.strengths], "analysis": self.analysis}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointResult:
        return cls(str(data["label"]), str(data["path"]), data.get("step"), data.get("epoch"),
                   bool(data.get("ema", False)), _metric(data.get("heldout_loss")),
                   [StrengthMetrics.from_dict(s) for s in data.get("strengths", [])], data.get("analysis"))


@dataclass
class GridImage:
    """One grid PNG: `kind` "strengths" (rows = networks, columns = strengths, one prompt) or "prompts" (rows =
    prompts, columns = networks, at strength 1); `path` relative to the results folder."""

    path: str
    kind: str
    title: str
    rows: list[str]
    columns: list[str]
    prompt: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "title": self.title, "rows": self.rows,
                "columns": self.columns, "prompt": self.prompt}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridImage:
        return cls(str(data["path"]), str(data["kind"]), str(data["title"]), list(data["rows"]),
                   list(data["columns"]), data.get("prompt"))


@dataclass
class EvalResults:
    """The whole evaluation (module docstring)."""

    command: str
    settings: dict[str, Any]
    checkpoints: list[CheckpointResult]
    base_heldout: SigmaMetric | None = None
    grids: list[GridImage] = field(default_factory=list)
    created: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"version": RESULTS_VERSION, "created": self.created, "command": self.command,
                "settings": self.settings,
                "base_heldout": None if self.base_heldout is None else self.base_heldout.as_dict(),
                "checkpoints": [c.as_dict() for c in self.checkpoints], "grids": [g.as_dict() for g in self.grids]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        if data.get("version") != RESULTS_VERSION:
            raise ValueError(f"results version {data.get('version')!r}: this anima-trainer reads version "
                             f"{RESULTS_VERSION}")
        return cls(str(data["command"]), dict(data["settings"]),
                   [CheckpointResult.from_dict(c) for c in data["checkpoints"]], _metric(data.get("base_heldout")),
                   [GridImage.from_dict(g) for g in data.get("grids", [])], str(data.get("created", "")))

    def save(self, folder: str | Path) -> Path:
        """`<folder>/results.json` through the one atomic write path (an evaluation folder is the run's own)."""
        text = json.dumps(self.as_dict(), indent=1, ensure_ascii=False, allow_nan=False)
        return atomic_write_bytes(text.encode("utf-8"), Path(folder) / RESULTS_NAME, what="evaluation results ")

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        """Read a results.json (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_NAME
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
