"""Saving during a run: what is due at each step / epoch end, written safely, with kohya's retention.

`Saver` decides at each optimizer step / epoch end what is due (kohya's save_every_n_* rules, states
with `save_state`), writes it atomically, applies retention (train/save_plan.py), records saves in the event
log, and refuses to write a network or a state whose weights are not finite (tensor_files.NonFiniteError,
NonFiniteStateError).  A save writes the state (train/training_state.py) first and the network file after it:
a run killed between the two resumes from that state and writes the missing file (`Saver.resumed`); a resumed
run may write again its own files after its resume point.  With `ema_decay` each network save also writes the EMA
file (`<name>-ema.safetensors`, train/ema.py; in a fine-tune a whole DiT checkpoint, as the network's save)
just before the network file, under the same rules and retention, and each state holds the EMA.  A fine-tune
sharded with FSDP (`sharding`, train/sharded_run.py): every process takes part in each save (its shards of a
state, staged before the main process writes the state folder; its part of the whole DiT gathered for a network
file); the main process still writes every file.  Whether and how a run resumes: train/resume.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.dtypes import PRECISION_DTYPES
from anima_trainer.fileio import OutputExistsError
from anima_trainer.train import training_state as states
from anima_trainer.train.distributed import Distributed, write_rank_rngs
from anima_trainer.train.ema import NetworkEMA
from anima_trainer.train.events import write_resolved_config
from anima_trainer.train.file_metadata import ema_metadata
from anima_trainer.train.monitor import NonFiniteStateError, check_finite_state
from anima_trainer.train.save_plan import SavePlan, StatePlan, ema_file_path

log = logging.getLogger(__name__)


class Saver:
    """Network files and training states of one run (see the module doc)."""

    def __init__(self, cfg: TrainConfig, network, *, optimizer, scheduler, scaler,
                 snapshot: dict, metadata: Callable[[int, int], dict[str, str]], events: Any = None,
                 dist: Any = None, save_every_n_epochs: int | None = None,
                 before_save: Callable[[], None] = lambda: None, after_save: Callable[[], None] = lambda: None,
                 ema: NetworkEMA | None = None, sharding: Any = None) -> None:
        out = Path(cfg.output_dir)
        self.cfg, self.network, self.ema = cfg, network, ema
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.snapshot, self.metadata, self.events = snapshot, metadata, events
        self.dist = dist or Distributed()  # several processes: all gather RNG states, the main one writes
        self._rank_rngs: list[dict] | None = None
        # a fine-tune sharded with FSDP (train/sharded_run.py): every process takes part in each save (its shards
        # of a state, the gathered weights of a network file), the main process writes the files
        self.sharding = sharding
        self._staged: Path | None = None  # the state's shards, written by every process
        self._gathered: dict[str, torch.Tensor] | None = None  # the whole DiT (main process) for a network file
        self._gathered_ema: dict[str, torch.Tensor] | None = None  # and with the EMA weights swapped in
        self.before_save, self.after_save = before_save, after_save  # e.g. schedule-free eval/train switch
        # save_every_n_epochs: the run plan's (what save_n_epoch_ratio makes of it); unset: the config's
        every_n_epochs = save_every_n_epochs if save_every_n_epochs is not None else cfg.save_every_n_epochs
        self.files = SavePlan(out, cfg.output_name, every_n_steps=cfg.save_every_n_steps,
                              every_n_epochs=every_n_epochs, keep_last_n_steps=cfg.save_last_n_steps,
                              keep_last_n_epochs=cfg.save_last_n_epochs, overwrite=cfg.overwrite,
                              ema=cfg.ema_decay is not None)
        self.states = StatePlan(out, cfg.output_name, every_n_steps=cfg.save_every_n_steps,
                                every_n_epochs=every_n_epochs,
                                keep_last_n_steps=cfg.save_last_n_steps_state,
                                keep_last_n_epochs=cfg.save_last_n_epochs_state, overwrite=True)
        self.save_dtype = PRECISION_DTYPES.get(cfg.save_precision) if cfg.save_precision else None
        self.written: list[Path] = []
        self._network_saved: tuple[int, Path] | None = None  # (optimizer step, file) of the newest network save

    def network_saved_at(self, step: int) -> Path | None:
        """The network file (not its EMA file) this run saved at optimizer step `step` (the newest, when a step
        and an epoch file share it), or None: what an in-training evaluation of that step names."""
        return self._network_saved[1] if self._network_saved and self._network_saved[0] == step else None

    def check_start(self, *, resuming: bool, max_steps: int, epochs: int) -> None:
        """Before training: a new run refuses to start over files of the same output_name it would write later
        (step/epoch saves, the final file) or over its states unless overwrite; a resumed run may write its own files
        after its state again, but not an existing final file."""
        if resuming or self.cfg.overwrite:
            self.files.check_start()
        else:
            found = self.files.collisions(max_steps, epochs)
            if not max_steps:  # before the scan the run's length is unknown: any step/epoch file of this name
                ema = "(-ema)?" if self.files.ema else ""
                saves = re.compile(rf"{re.escape(self.cfg.output_name)}-(step\d{{8}}|\d{{6}}){ema}\.safetensors")
                out = Path(self.cfg.output_dir)
                found += sorted(p for p in (out.iterdir() if out.is_dir() else ()) if saves.fullmatch(p.name))
            # every earlier state of this name: a SIGINT state could replace one, and `resume = latest` after
            # this run would pick up the other run's newer states
            pattern = states.state_name_pattern(self.cfg.output_name)
            out = Path(self.cfg.output_dir)
            found += sorted(p for p in (out.iterdir() if out.is_dir() else ()) if pattern.fullmatch(p.name))
            if found:
                names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
                raise OutputExistsError(
                    f"{names} already exist{'s' if len(found) == 1 else ''} in {self.cfg.output_dir} (an earlier "
                    f"run named {self.cfg.output_name!r}); this new run would write over or mix with them: continue "
                    "that run with resume = \"latest\" (--resume latest), or choose another output_name, or set "
                    "overwrite = true to replace them")

    def resumed(self, folder: Path, state: states.Progress, *, at_epoch_end: bool, max_steps: int) -> None:
        """After loading `state` (from `folder`): the files after it may be written again, and a network file
        due at the state itself that is missing (the run was killed between the state and its file) is written
        now.  A final state has no step or epoch file (the last step gets the final file, written at the end)."""
        done_epochs = state.epoch if at_epoch_end else state.epoch - 1
        self.files.resumed_at = self.states.resumed_at = (state.step, done_epochs)
        if state.step >= max_steps or Path(folder).name == self.states.final_path.name:
            return
        step_file = self.files.due_at_step(state.step) and not self.files.step_path(state.step).exists()
        epoch_file = (at_epoch_end and self.files.due_at_epoch(state.epoch)
                      and not self.files.epoch_path(state.epoch).exists())
        if self.sharding is not None and self.dist.any_true(self.dist.is_main and (step_file or epoch_file)):
            self._gathered, self._gathered_ema = self.sharding.gather(self.ema)  # every process: the main decides
        if not self.dist.is_main:
            return
        self.before_save()
        try:
            path = self.files.step_path(state.step)
            if step_file:
                log.info("resume: writing %s (the run stopped after its state, before the file)", path.name)
                self.files.record_step(state.step, *self._network_files(path, state.step, state.epoch))
            path = self.files.epoch_path(state.epoch)
            if epoch_file:
                log.info("resume: writing %s (the run stopped after its state, before the file)", path.name)
                self.files.record_epoch(state.epoch, *self._network_files(path, state.step, state.epoch))
        finally:
            self.after_save()
            self._gathered = self._gathered_ema = None

    def _network_files(self, path: Path, step: int, epoch: int) -> list[Path]:
        """The network file at `path` and, with the EMA on, its EMA file, written first: an existing network file
        means both were written, and an EMA file without its network file is a save of this run cut short (a
        new run refuses to start over it), which a resumed run writes again."""
        # never a NaN over a good file: network.save refuses non-finite weights as written (tensor_files.NonFiniteError)
        if path == self.files.step_path(step):
            overwrite = self.files.may_replace_step(step)
        elif path == self.files.epoch_path(epoch):
            overwrite = self.files.may_replace_epoch(epoch)
        else:
            overwrite = self.cfg.overwrite
        written = []
        if self.ema is not None:
            cut_short = self.files.resumed_at is not None and not path.exists()
            with self.ema.swapped():
                ema_path = self.network.save(
                    ema_file_path(path), metadata={**self.metadata(step, epoch),
                                                   **ema_metadata(self.ema.decay, self.ema.warmup, self.ema.updates)},
                    dtype=self.save_dtype, overwrite=overwrite or cut_short, save_format=self.cfg.save_format,
                    **({} if self.sharding is None else {"state": self._gathered_ema}))  # sharded: gathered, swapped
            if self.events is not None:
                self.events.write("save", step=step, epoch=epoch, path=str(ema_path), ema=True)
            written.append(ema_path)
        gathered = {} if self.sharding is None else {"state": self._gathered}  # sharded: the whole DiT, gathered
        path = self.network.save(path, metadata=self.metadata(step, epoch), dtype=self.save_dtype,
                                 overwrite=overwrite, save_format=self.cfg.save_format, **gathered)
        self._network_saved = (step, path)
        if self.events is not None:
            self.events.write("save", step=step, epoch=epoch, path=str(path))
        return [path, *written]

    def _state(self, folder: Path, progress: states.Progress) -> Path:
        # a state is only ever written from finite weights and optimizer moments (it is what a resume trusts;
        # sharded: checked by every process on its shards before they were staged)
        if self.sharding is None:
            check_finite_state(self.network.state_dict(), str(folder))
            moments = {f"optimizer.{i}.{k}": v for i, s in enumerate(self.optimizer.state.values())
                       for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
            check_finite_state(moments, str(folder))
        if self.ema is not None:
            check_finite_state(self.ema.state_tensors(), str(folder))
        folder = states.save_state(folder, network=self.network, optimizer=self.optimizer, scheduler=self.scheduler,
                                   scaler=self.scaler, progress=progress,
                                   snapshot=self.snapshot, config=states.config_record(self.cfg), overwrite=True,
                                   extra=self._extra_files, sharded=self._staged)
        if self.events is not None:
            self.events.write("save_state", step=progress.step, epoch=progress.epoch, path=str(folder))
        return folder

    def at_step(self, progress: states.Progress, last: bool) -> None:
        """After an optimizer step: the step save if due (the last step gets the final save instead)."""
        if last or not self.files.due_at_step(progress.step):
            return
        self._save(lambda: self.files.record_step(progress.step, *self._network_files(
            self.files.step_path(progress.step), progress.step, progress.epoch)),
            (lambda: self.states.record_step(progress.step, self._state(self.states.step_path(progress.step),
                                                                        progress))) if self.cfg.save_state else None)

    def at_epoch_end(self, progress: states.Progress, last: bool) -> None:
        if last or not self.files.due_at_epoch(progress.epoch):
            return
        self._save(lambda: self.files.record_epoch(progress.epoch, *self._network_files(
            self.files.epoch_path(progress.epoch), progress.step, progress.epoch)),
            (lambda: self.states.record_epoch(progress.epoch, self._state(
                self.states.epoch_path(progress.epoch), progress))) if self.cfg.save_state else None)

    def _extra_files(self, tmp: Path) -> None:
        write_resolved_config(tmp, self.cfg)
        if self._rank_rngs is not None:
            write_rank_rngs(tmp, self._rank_rngs)
        if self.ema is not None:  # into the manifest with the rest (training_state.save_state)
            self.ema.write_state(tmp)

    def interrupted(self, progress: states.Progress) -> Path | None:
        """A state at the current step after SIGINT/SIGTERM (whatever save_state says): nothing is lost.  None
        when the weights are not finite (nonfinite_loss_policy = "warn"): no state is written from them."""
        folder: list[Path] = []
        try:
            self._save(lambda: None,
                       lambda: folder.append(self._state(self.states.step_path(progress.step), progress)),
                       network_file_due=False)
        except NonFiniteStateError as e:
            log.error("%s", e)
            return None
        return folder[0] if folder else self.states.step_path(progress.step)

    def final(self, progress: states.Progress) -> Path:
        paths: list[Path] = []
        state = None
        if self.cfg.save_state or self.cfg.save_state_on_train_end:
            state = lambda: self._state(self.states.final_path, progress)  # noqa: E731
        self._save(lambda: paths.extend(self._network_files(self.files.final_path, progress.step, progress.epoch)),
                   state)
        return paths[0] if paths else self.files.final_path

    def _save(self, network_file: Callable[[], Any], state: Callable[[], Any] | None, *,
              network_file_due: bool = True) -> None:
        # every process's RNG goes into a state (each resumes its own streams); only the main one writes
        self._rank_rngs = (self.dist.gather_objects(states.capture_rng())
                           if state is not None and self.dist.enabled else None)
        if self.sharding is not None:  # every process: its shards of the state, its part of the gathered weights
            self.before_save()
            try:
                self._staged = self.sharding.stage_state(self.optimizer, self.ema) if state is not None else None
                gathered = self.sharding.gather(self.ema) if network_file_due else (None, None)
                self._gathered, self._gathered_ema = gathered
            finally:
                self.after_save()
        if not self.dist.is_main:
            return
        self.before_save()
        try:  # the state first: killed before the network file, the resume writes that file (`resumed`)
            if state is not None:
                state()
            network_file()
        finally:
            self.after_save()
            if self.sharding is not None:
                self._staged = self._gathered = self._gathered_ema = None
                self.sharding.staged_done()
