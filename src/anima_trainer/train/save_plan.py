"""Where network files go: kohya's names for intermediate and final saves, retention, refusing to clobber.

Names: `<output_name>.safetensors` (final), `<output_name>-step<NNNNNNNN>.safetensors` (every N steps),
`<output_name>-<NNNNNN>.safetensors` (every N epochs, as kohya).  `save_last_n_*` deletes only files
this run wrote itself, never anything else in the folder.  With `ema_decay` every network file has an EMA file
beside it, `<name>-ema.safetensors` for `<name>.safetensors` (train/ema.py), under the same rules and removed
together with it.  Training states (train/training_state.py) follow the
same rules with folders: `<output_name>-step<NNNNNNNN>-state`, `<output_name>-<NNNNNN>-state`, `<output_name>-state`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from anima_trainer.fileio import OutputExistsError


def ema_file_path(path: Path) -> Path:
    """The EMA network file saved next to the network file `path`: `<name>-ema.safetensors` for
    `<name>.safetensors`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-ema{path.suffix}")


class SavePlan:
    """Decides when to save and which of our own earlier saves to remove."""

    def __init__(self, output_dir: Path, output_name: str, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, keep_last_n_steps: int | None = None,
                 keep_last_n_epochs: int | None = None, overwrite: bool = False, ema: bool = False) -> None:
        self.output_dir, self.output_name = Path(output_dir), output_name
        self.ema = ema  # an EMA file beside every network file
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.keep_last_n_steps, self.keep_last_n_epochs = keep_last_n_steps, keep_last_n_epochs
        self.overwrite = overwrite
        self.written_steps: list[tuple[int, Path]] = []
        self.written_epochs: list[tuple[int, Path]] = []
        self.resumed_at: tuple[int, int] | None = None  # (step, epochs completed) of the state a run resumed from

    @property
    def final_path(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"

    def step_path(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name}-step{step:08d}.safetensors"

    def epoch_path(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name}-{epoch:06d}.safetensors"

    def with_ema(self, path: Path) -> list[Path]:
        """A network file and, with the EMA on, its EMA file."""
        return [path, ema_file_path(path)] if self.ema else [path]

    def check_start(self) -> None:
        """Fail before training if the final file exists and overwriting was not asked for (a resumed run; a new
        run checks `collisions`, EMA files included; an EMA file without its network file is a save cut short,
        written again)."""
        if self.final_path.exists() and not self.overwrite:
            raise OutputExistsError(f"{self.final_path} already exists; choose another output_name or pass "
                                    "--overwrite to replace it")

    def _numbered(self) -> tuple[re.Pattern[str], re.Pattern[str]]:
        name, ema = re.escape(self.output_name), "(?:-ema)?" if self.ema else ""
        return (re.compile(name + r"-step(\d{8})" + ema
                           + re.escape(self.step_path(0).name[len(self.output_name) + 13:])),
                re.compile(name + r"-(\d{6})" + ema + re.escape(self.epoch_path(0).name[len(self.output_name) + 7:])))

    def collisions(self, max_steps: int, epochs: int) -> list[Path]:
        """The existing files a new run of `max_steps` steps / `epochs` epochs would write over (its step and
        epoch saves on this schedule, its final save): found at start, not after hours of training."""
        step_re, epoch_re = self._numbered()
        found = [p for p in self.with_ema(self.final_path) if p.exists()]
        for p in sorted(self.output_dir.iterdir()) if self.output_dir.is_dir() else ():
            if (m := step_re.fullmatch(p.name)) and int(m.group(1)) < max_steps and self.due_at_step(int(m.group(1))):
                found.append(p)
            elif (m := epoch_re.fullmatch(p.name)) and int(m.group(1)) < epochs \
                    and self.due_at_epoch(int(m.group(1))):
                found.append(p)
        return found

    def may_replace_step(self, step: int) -> bool:
        """A resumed run re-trains the steps after its state: it may write again the files it wrote there."""
        return self.overwrite or (self.resumed_at is not None and step > self.resumed_at[0])

    def may_replace_epoch(self, epoch: int) -> bool:
        return self.overwrite or (self.resumed_at is not None and epoch > self.resumed_at[1])

    def due_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def record_step(self, step: int, *paths: Path) -> list[Path]:
        """Remember a step save (its files: the network file and its EMA file); return (and delete) our step saves
        older than `keep_last_n_steps` steps."""
        self.written_steps.extend((step, path) for path in paths)
        return self._prune(self.written_steps, step, self.keep_last_n_steps, self.every_n_steps)

    def record_epoch(self, epoch: int, *paths: Path) -> list[Path]:
        self.written_epochs.extend((epoch, path) for path in paths)
        return self._prune(self.written_epochs, epoch, self.keep_last_n_epochs, self.every_n_epochs)

    @staticmethod
    def _prune(written: list[tuple[int, Path]], now: int, keep: int | None, every: int | None) -> list[Path]:
        """kohya: keep saves from the last `keep` steps/epochs (a count of units, not of files)."""
        if not keep:
            return []
        removed = []
        for unit, path in list(written):
            if unit <= now - keep:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                removed.append(path)
                written.remove((unit, path))
        return removed


class StatePlan(SavePlan):
    """The same schedule and retention for training-state folders (`save_state`, `save_last_n_*_state`)."""

    @property
    def final_path(self) -> Path:
        return self.output_dir / f"{self.output_name}-state"

    def step_path(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name}-step{step:08d}-state"

    def epoch_path(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name}-{epoch:06d}-state"

    def check_start(self) -> None:  # a resumed run replaces its own states; a new run checks `collisions` first
        return None
