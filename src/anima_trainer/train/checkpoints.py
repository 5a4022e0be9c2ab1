"""Everything the loop writes to keep work safe: network files, training states, and the resume checks.

`Checkpointer` decides at each optimizer step / epoch end what is due (kohya's save_every_n_* rules, states
with `save_state`), writes it atomically, applies retention, records saves in the event log, and refuses to
write a network whose weights are not finite (NonFiniteStateError).  `snapshot_fields` lists what must not
change across a resume; `resolve_resume` finds the state folder and `check_resume` checks the snapshot and
logs the other changed settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.train import resume as states
from anima_trainer.train.distributed import Distributed, write_rank_rngs
from anima_trainer.train.events import write_resolved_config
from anima_trainer.train.monitor import check_finite_state
from anima_trainer.train.state import SavePlan, StatePlan

log = logging.getLogger(__name__)
SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# snapshot fields whose change makes a resume wrong (the rest of the config is compared and logged)
CRITICAL = ("dit", "qwen3", "vae", "llm_adapter", "network_module", "network_dim", "network_alpha", "network_args",
            "network_targets", "network_dropout", "dataset", "buckets", "batches_per_epoch",
            "gradient_accumulation_steps", "optimizer_type", "seed", "mixed_precision", "fp8_base")
# config keys that legitimately differ between the interrupted run and its resume
NOT_COMPARED = ("resume", "overwrite", "resume_snapshot_strict")


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot_fields(cfg: TrainConfig, network, dataset) -> dict:
    """The settings an exact resume depends on: model files (fingerprints), network, data, batching, optimizer,
    seed and precision."""
    from anima_trainer.cache import model_fingerprint

    def fingerprint(path) -> str | None:
        return model_fingerprint(path) if path is not None and Path(path).exists() else None

    items = [(str(i.path), i.caption, list(i.bucket), i.num_repeats, i.is_reg) for i in dataset.items]
    return {
        "dit": fingerprint(cfg.pretrained_model_name_or_path), "qwen3": fingerprint(cfg.qwen3),
        "vae": fingerprint(cfg.vae), "llm_adapter": fingerprint(cfg.llm_adapter_path),
        "network_module": cfg.network_module, "network_dim": cfg.network_dim, "network_alpha": cfg.network_alpha,
        "network_args": dict(sorted(cfg.network_args.items())), "network_dropout": cfg.network_dropout,
        "network_targets": _sha([[p, m.dim, float(m.alpha)] for p, m in network.modules_by_name.items()]
                                + sorted(network.norms_by_name)),
        "dataset": _sha(items), "buckets": [list(b) for b in dataset.bucket_table()],
        "batches_per_epoch": len(dataset), "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "optimizer_type": cfg.optimizer_type, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision,
        "fp8_base": f"{cfg.fp8_base or cfg.fp8_base_unet}/{cfg.fp8_format}",  # a different base model
    }


def config_record(cfg: TrainConfig) -> dict:
    return json.loads(cfg.model_dump_json())


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        return states.find_latest_state(cfg.output_dir, cfg.output_name)
    folder = Path(cfg.resume).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"resume: {folder} is not a folder (give a state folder '<name>-...-state' or 'latest')")
    return folder


def check_resume(folder: Path, cfg: TrainConfig, snapshot: dict) -> None:
    """Critical changes: error (or warning with resume_snapshot_strict = false); others: logged."""
    states.read_progress(folder)
    states.check_snapshot(states.read_snapshot(folder), snapshot, strict=cfg.resume_snapshot_strict,
                          critical=CRITICAL)
    old = states.read_config(folder)
    if old is not None:
        new = config_record(cfg)
        changed = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if k not in NOT_COMPARED and k not in CRITICAL and old.get(k) != new.get(k)]
        if changed:
            log.info("resume: settings changed since the state was saved (allowed):\n  %s", "\n  ".join(changed))


class Checkpointer:
    """Network files and training states of one run (see the module doc)."""

    def __init__(self, cfg: TrainConfig, network, *, optimizer, scheduler, scaler, generator: torch.Generator,
                 snapshot: dict, metadata: Callable[[int, int], dict[str, str]], events: Any = None,
                 dist: Any = None,
                 before_save: Callable[[], None] = lambda: None, after_save: Callable[[], None] = lambda: None,
                 ) -> None:
        out = Path(cfg.output_dir)
        self.cfg, self.network = cfg, network
        self.optimizer, self.scheduler, self.scaler, self.generator = optimizer, scheduler, scaler, generator
        self.snapshot, self.metadata, self.events = snapshot, metadata, events
        self.dist = dist or Distributed()  # several processes: all gather RNG states, the main one writes
        self._rank_rngs: list[dict] | None = None
        self.before_save, self.after_save = before_save, after_save  # e.g. schedule-free eval/train switch
        self.files = SavePlan(out, cfg.output_name, every_n_steps=cfg.save_every_n_steps,
                              every_n_epochs=cfg.save_every_n_epochs, keep_last_n_steps=cfg.save_last_n_steps,
                              keep_last_n_epochs=cfg.save_last_n_epochs, overwrite=cfg.overwrite)
        self.states = StatePlan(out, cfg.output_name, every_n_steps=cfg.save_every_n_steps,
                                every_n_epochs=cfg.save_every_n_epochs,
                                keep_last_n_steps=cfg.save_last_n_steps_state,
                                keep_last_n_epochs=cfg.save_last_n_epochs_state, overwrite=True)
        self.save_dtype = SAVE_DTYPES.get(cfg.save_precision) if cfg.save_precision else None
        self.written: list[Path] = []

    def check_start(self) -> None:
        self.files.check_start()
        if self.dist.is_main:
            states.remove_stale_temporaries(self.cfg.output_dir, self.cfg.output_name)

    def _network_file(self, path: Path, step: int, epoch: int) -> Path:
        check_finite_state(self.network.state_dict(), str(path))  # never a NaN over a good file
        path = self.network.save(path, metadata=self.metadata(step, epoch), dtype=self.save_dtype,
                                 overwrite=self.cfg.overwrite, save_format=self.cfg.save_format)
        if self.events is not None:
            self.events.write("save", step=step, epoch=epoch, path=str(path))
        return path

    def _state(self, folder: Path, progress: states.Progress) -> Path:
        folder = states.save_state(folder, network=self.network, optimizer=self.optimizer, scheduler=self.scheduler,
                                   scaler=self.scaler, generator=self.generator, progress=progress,
                                   snapshot=self.snapshot, config=config_record(self.cfg), overwrite=True,
                                   extra=self._extra_files)
        if self.events is not None:
            self.events.write("save_state", step=progress.step, epoch=progress.epoch, path=str(folder))
        return folder

    def at_step(self, progress: states.Progress, last: bool) -> None:
        """After an optimizer step: the step save if due (the last step gets the final save instead)."""
        if last or not self.files.due_at_step(progress.step):
            return
        self._save(lambda: self.files.record_step(progress.step, self._network_file(
            self.files.step_path(progress.step), progress.step, progress.epoch)),
            (lambda: self.states.record_step(progress.step, self._state(self.states.step_path(progress.step),
                                                                        progress))) if self.cfg.save_state else None)

    def at_epoch_end(self, progress: states.Progress, last: bool) -> None:
        if last or not self.files.due_at_epoch(progress.epoch):
            return
        self._save(lambda: self.files.record_epoch(progress.epoch, self._network_file(
            self.files.epoch_path(progress.epoch), progress.step, progress.epoch)),
            (lambda: self.states.record_epoch(progress.epoch, self._state(
                self.states.epoch_path(progress.epoch), progress))) if self.cfg.save_state else None)

    def _extra_files(self, tmp: Path) -> None:
        write_resolved_config(tmp, self.cfg)
        if self._rank_rngs is not None:
            write_rank_rngs(tmp, self._rank_rngs)

    def interrupted(self, progress: states.Progress) -> Path:
        """A state at the current step after SIGINT/SIGTERM (whatever save_state says): nothing is lost."""
        folder: list[Path] = []
        self._save(lambda: None, lambda: folder.append(self._state(self.states.step_path(progress.step), progress)))
        return folder[0] if folder else self.states.step_path(progress.step)

    def final(self, progress: states.Progress) -> Path:
        paths: list[Path] = []
        state = None
        if self.cfg.save_state or self.cfg.save_state_on_train_end:
            state = lambda: self._state(self.states.final_path, progress)  # noqa: E731
        self._save(lambda: paths.append(self._network_file(self.files.final_path, progress.step, progress.epoch)),
                   state)
        return paths[0] if paths else self.files.final_path

    def _save(self, network_file: Callable[[], Any], state: Callable[[], Any] | None) -> None:
        # every process's RNG goes into a state (each resumes its own streams); only the main one writes
        self._rank_rngs = (self.dist.gather_objects(states.capture_rng(self.generator))
                           if state is not None and self.dist.enabled else None)
        if not self.dist.is_main:
            return
        self.before_save()
        try:
            network_file()
            if state is not None:
                state()
        finally:
            self.after_save()
