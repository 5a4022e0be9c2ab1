"""The networks an evaluation measures, found from what the user names: network files, or a run's output folder.

A run's output folder gives every network file the run saved (step and epoch saves, the final file, and with
`ema_decay` each one's `<name>-ema.safetensors`):
  * with the run's event log (`<output_name>.events.jsonl`, exactly one in the folder): the files its "save"
    events name, with their step, epoch and `ema` flag (the newest event per file: a resumed run may save a
    name again); files the log names that retention removed since are simply gone;
  * without one: every network file in the folder, step and epoch from the metadata every save carries (kohya's
    `ss_steps` / `ss_epoch`), EMA from `ss_ema_decay` or the `-ema` suffix.
Everything else in the folder — state folders, other .safetensors (models, other runs' networks), logs — is
skipped with a note.  A fine-tune's whole-DiT checkpoint (training_mode = "finetune") is no network: naming
one is an error that says to turn it into a LoRA with `anima-trainer extract` first.  Checkpoints are ordered
by (step, epoch, name), unknown steps last; a label is the file's stem, made unique with its folder's name when
two inputs share a stem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anima_trainer.config.run_files import EVENTS_SUFFIX, read_events
from anima_trainer.models.model_files import inspect_file
from anima_trainer.models.safetensors_file import ModelFileError, read_header

EMA_SUFFIX = "-ema"
NETWORK_SUFFIX = ".safetensors"
DIT_KINDS = ("anima_dit", "anima_bundle", "diffusers_dit")  # whole-DiT files: a fine-tune's output, a base model
EXTRACT_HINT = ("evaluation takes adapter files: turn a fine-tune into a LoRA with `anima-trainer extract --base "
                "<base DiT> --tuned {path} --rank R` and evaluate that file")


class CheckpointError(ValueError):
    """A path that names no network to evaluate (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class Checkpoint:
    """One network file to evaluate: where training saved it (step / epoch, None when unknown) and whether it
    holds EMA weights."""

    path: Path
    label: str
    step: int | None = None
    epoch: int | None = None
    ema: bool = False

    def sort_key(self) -> tuple:
        return (self.step is None, self.step or 0, self.epoch is None, self.epoch or 0, self.path.stem)


@dataclass
class CheckpointSearch:
    """What `find_checkpoints` found: the checkpoints in training order, notes on what was skipped, and the run
    folders / event logs they came from (a run folder's log gives the run's settings too)."""

    checkpoints: list[Checkpoint]
    notes: list[str] = field(default_factory=list)
    run_folders: list[Path] = field(default_factory=list)
    event_logs: list[Path] = field(default_factory=list)


def _int(value: object) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def network_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a network file, or None when `path` is not a network file (a model, a broken file)."""
    try:
        if inspect_file(path).kind != "network":
            return None
        return dict(read_header(path)[1] or {})
    except (ModelFileError, OSError, ValueError):
        return None


def is_dit_checkpoint(path: Path) -> bool:
    """Whether `path` is a whole DiT checkpoint (a fine-tune's output or a base model), not a network."""
    try:
        return inspect_file(path).kind in DIT_KINDS
    except (ModelFileError, OSError, ValueError):
        return False


def is_ema_file(path: Path, metadata: dict[str, str]) -> bool:
    """EMA weights: the file's `ss_ema_decay` key (train/file_metadata.ema_metadata), else the `-ema` name."""
    return "ss_ema_decay" in metadata or path.stem.endswith(EMA_SUFFIX)


def _from_metadata(path: Path, metadata: dict[str, str]) -> Checkpoint:
    return Checkpoint(path, path.stem, _int(metadata.get("ss_steps")), _int(metadata.get("ss_epoch")),
                      is_ema_file(path, metadata))


def _saved_by_log(log: Path) -> dict[str, dict]:
    """The log's newest "save" event per file name (the folder may have moved since: names, not paths)."""
    saves: dict[str, dict] = {}
    for event in read_events(log):
        if event.get("type") == "save" and event.get("path"):
            saves[Path(str(event["path"])).name] = event
    return saves


def _scan_folder(folder: Path, notes: list[str]) -> tuple[list[Checkpoint], Path | None]:
    logs = sorted(folder.glob(f"*{EVENTS_SUFFIX}"))
    if len(logs) > 1:
        raise CheckpointError(f"{folder}: {len(logs)} runs' event logs ({', '.join(p.name for p in logs)}); "
                              "name the network files to evaluate instead of the folder")
    log = logs[0] if logs else None
    saves = _saved_by_log(log) if log is not None else None
    found, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            skipped.append(f"{path.name}/ (a folder)")
            continue
        if path.suffix != NETWORK_SUFFIX:
            continue
        metadata = network_metadata(path)
        if metadata is None:
            skipped.append(f"{path.name} (a whole DiT checkpoint)" if is_dit_checkpoint(path)
                           else f"{path.name} (not a network file)")
        elif saves is not None and path.name not in saves:
            skipped.append(f"{path.name} (not saved by the run of {log.name})")
        elif saves is not None:
            event = saves[path.name]
            found.append(Checkpoint(path, path.stem, _int(event.get("step")), _int(event.get("epoch")),
                                    bool(event.get("ema", False)) or is_ema_file(path, metadata)))
        else:
            found.append(_from_metadata(path, metadata))
    if skipped:
        notes.append(f"{folder}: skipped {len(skipped)}: {'; '.join(skipped)}")
    if not found:
        dits = [s.split(" (")[0] for s in skipped if s.endswith("(a whole DiT checkpoint)")]
        hint = f"; {len(dits)} whole DiT checkpoint(s) (a fine-tune's): " + EXTRACT_HINT.format(
            path=folder / dits[-1]) if dits else ""
        raise CheckpointError(f"{folder}: no network file to evaluate (a run's output folder holds "
                              f"<output_name>*.safetensors; found {len(skipped)} other entr"
                              f"{'y' if len(skipped) == 1 else 'ies'}){hint}")
    return found, log


def _unique_labels(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    stems: dict[str, int] = {}
    for c in checkpoints:
        stems[c.label] = stems.get(c.label, 0) + 1
    out, taken = [], set()
    for c in checkpoints:
        label = c.label if stems[c.label] == 1 else f"{c.path.parent.name}/{c.label}"
        base, n = label, 2
        while label in taken:
            label, n = f"{base}#{n}", n + 1
        taken.add(label)
        out.append(Checkpoint(c.path, label, c.step, c.epoch, c.ema))
    return out


def find_checkpoints(paths: Sequence[str | Path]) -> CheckpointSearch:
    """The checkpoints `paths` name (network files and run output folders), in training order; a missing path,
    a file that is not a network or a folder without one is a CheckpointError naming it."""
    if not paths:
        raise CheckpointError("name at least one network file or run output folder to evaluate")
    found: list[Checkpoint] = []
    search = CheckpointSearch([])
    for given in paths:
        path = Path(given).expanduser().resolve()
        if not path.exists():
            raise CheckpointError(f"{given}: no such file or folder")
        if path.is_dir():
            checkpoints, log = _scan_folder(path, search.notes)
            found += checkpoints
            search.run_folders.append(path)
            if log is not None:
                search.event_logs.append(log)
            continue
        metadata = network_metadata(path)
        if metadata is None and is_dit_checkpoint(path):
            raise CheckpointError(f"{given}: a whole DiT checkpoint (a fine-tune's output), not a network file; "
                                  + EXTRACT_HINT.format(path=given))
        if metadata is None:
            raise CheckpointError(f"{given}: not a network file (LoRA, LoKr, LoHa); `anima-trainer inspect` says "
                                  "what it is")
        found.append(_from_metadata(path, metadata))
    seen: set[Path] = set()
    unique = [c for c in found if not (c.path in seen or seen.add(c.path))]
    search.checkpoints = _unique_labels(sorted(unique, key=Checkpoint.sort_key))
    return search
