"""Whether and how a run resumes: which state folder, what must not have changed, what is rebuilt.

`resolve_resume` finds the state folder (`resume = "latest"` or a path); `snapshot_fields` lists the settings an
exact resume depends on (stored in every state); `check_resume` compares them, checks the step count and logs
the other changed settings; `rebuild_schedule` and `apply_optimizer_args` apply the changes a resume allows.
The state folders themselves are written and read by train/training_state.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.train import training_state as states
from anima_trainer.train.schedulers import schedule_options

log = logging.getLogger(__name__)
# snapshot fields whose change makes a resume wrong (the rest of the config is compared and logged)
CRITICAL = ("dit", "qwen3", "vae", "llm_adapter", "network_module", "network_dim", "network_alpha", "network_args",
            "network_targets", "network_dropout", "dataset", "buckets", "batches_per_epoch",
            "gradient_accumulation_steps", "optimizer_type", "seed", "mixed_precision", "fp8_base", "batch_size",
            "base_weights")
# config keys that legitimately differ between the interrupted run and its resume
NOT_COMPARED = ("resume", "overwrite", "resume_snapshot_strict", "anima_resume_snapshot_strict",
                "resume_ignore_optimizer_mismatch")


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot_fields(cfg: TrainConfig, network, dataset) -> dict:
    """The settings an exact resume depends on: model files (fingerprints), network, data, batching, optimizer,
    seed and precision."""
    from anima_trainer.cache import model_fingerprint
    from anima_trainer.networks.merge import base_weight_multipliers

    def fingerprint(path) -> str | None:
        return model_fingerprint(path) if path is not None and Path(path).exists() else None

    items = [(str(i.path), i.caption, list(i.bucket), i.num_repeats, i.is_reg) for i in dataset.items]
    return {
        "dit": fingerprint(cfg.pretrained_model_name_or_path), "qwen3": fingerprint(cfg.qwen3),
        "vae": fingerprint(cfg.vae), "llm_adapter": fingerprint(cfg.llm_adapter_path),
        "network_module": cfg.network_module, "network_dim": cfg.network_dim, "network_alpha": cfg.network_alpha,
        "network_args": dict(sorted(cfg.network_args.items())), "network_dropout": cfg.network_dropout,
        "network_targets": _sha([[p, m.dim, float(m.alpha)] for p, m in network.modules_by_name.items()]
                                + sorted(network.norms_by_name) + sorted(getattr(network, "selected", ()))),
        "dataset": _sha(items), "buckets": [list(b) for b in dataset.bucket_table()],
        "batches_per_epoch": len(dataset), "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "optimizer_type": cfg.optimizer_type, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision,
        "fp8_base": f"{cfg.fp8_base}/{cfg.fp8_format}",  # a different base model
        # the effective batch size of each [[datasets]] (a dataset.toml's batch_size overrides train_batch_size)
        "batch_size": [p.batch_size for p in dataset.params],
        # issue 14: files merged into the base before training (a different base model when they change)
        "base_weights": [[fingerprint(p), m] for p, m in zip(cfg.base_weights or [], base_weight_multipliers(
            cfg.base_weights or [], cfg.base_weights_multiplier), strict=True)],
    }


def schedule_fields(cfg: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> dict:
    """What the learning-rate schedule is built from: each group's base lr, the length and the schedule's own
    settings.  Stored in the snapshot; when it changed on resume the schedule is rebuilt (`rebuild_schedule`)."""
    options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in schedule_options(cfg).items()}
    if cfg.lr_scheduler not in ("cosine", "cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"):
        options.pop("sd_scripts_anima", None)  # the dialect only changes what num_cycles means for these
    return json.loads(json.dumps({"lrs": [g["lr"] for g in optimizer.param_groups], "max_train_steps": max_steps,
                                  "lr_scheduler": cfg.lr_scheduler, **options}, default=str))


def rebuild_schedule(optimizer: torch.optim.Optimizer, base_lrs: list[float], build: Callable[[], Any],
                     step: int) -> Any:
    """A schedule for the current settings advanced to `step` (a resume whose lr or schedule changed): the
    groups' base lr is reset first, so the restored optimizer state cannot bring the old rate back."""
    import warnings

    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = group["initial_lr"] = lr
    scheduler = build()
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying, not training
        warnings.simplefilter("ignore")
        try:
            for _ in range(step):
                scheduler.step()
        except (TypeError, ValueError) as e:  # e.g. a scheduler that steps on a metric (ReduceLROnPlateau)
            raise ConfigError(f"resume: the changed learning-rate schedule ({type(scheduler).__name__}) cannot be "
                              f"advanced to step {step} ({e}); resume with the schedule settings the state was "
                              "saved with") from None
    return scheduler


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        return states.find_latest_state(cfg.output_dir, cfg.output_name)
    folder = Path(cfg.resume).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"resume: {folder} is not a folder (give a state folder '<name>-...-state' or 'latest')")
    return folder


# changed settings a resume cannot apply: the state's value wins (listed as not applied)
STATE_WINS = {"network_weights": "the state's network weights are loaded instead",
              "dim_from_weights": "the state's network is loaded instead"}


@dataclass
class ResumeCheck:
    """What `check_resume` found: the state's position, whether the lr schedule must be rebuilt, the
    optimizer_args keys whose value changed (re-applied to the loaded optimizer's groups), and the final file
    when the state is the end of a run that was already complete (killed after its last write)."""

    progress: states.Progress
    rebuild_schedule: bool
    optimizer_args: list[str]
    finished: Path | None = None  # the run had already ended: its final file
    fresh_optimizer: bool = False  # the optimizer changed (resume_ignore_optimizer_mismatch): do not load its state


def check_resume(folder: Path, cfg: TrainConfig, snapshot: dict, max_steps: int) -> ResumeCheck:
    """Before anything is loaded: the state's position against `max_steps`, critical changes (error, or a
    warning with resume_snapshot_strict = false), the others logged as applied or not applied."""
    progress = states.read_progress(folder)
    final_state = folder.name == f"{cfg.output_name}-state"
    final_file = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
    # the final state without its final file (killed, or the disk filled up, between the two): the resume
    # only writes the file; a final file of an earlier, shorter end of the run does not count
    final_step = _saved_step(final_file) if final_state else None
    unfinished = final_state and (final_step or 0) < progress.step
    if progress.step == max_steps and final_state and final_step == progress.step:
        log.info("resume: %s is the end of this run (step %d of %d) and %s was written from it: nothing to do",
                 folder, progress.step, max_steps, final_file)
        return ResumeCheck(progress, False, [], finished=final_file)
    if progress.step > max_steps or (progress.step == max_steps and not unfinished):
        raise ConfigError(f"resume: {folder} is at step {progress.step} and max_train_steps is {max_steps}: nothing "
                          f"is left to train; raise max_train_steps (or max_train_epochs) above {progress.step} to "
                          "train on")
    saved = states.read_snapshot(folder)
    # resume_ignore_optimizer_mismatch: a changed optimizer is not critical, it restarts from a fresh state
    fresh_optimizer = (cfg.resume_ignore_optimizer_mismatch is True and not cfg.anima_resume_snapshot_strict
                       and "optimizer_type" in saved and saved["optimizer_type"] != snapshot.get("optimizer_type"))
    critical = tuple(k for k in CRITICAL if not (fresh_optimizer and k == "optimizer_type"))
    other = states.check_snapshot(saved, snapshot, strict=cfg.resume_snapshot_strict or
                                  cfg.anima_resume_snapshot_strict, critical=critical)
    if cfg.anima_resume_snapshot_strict and other:  # sd-scripts-anima's strict mode: any change aborts
        lines = []
        for k in sorted(set(saved) | set(snapshot)):
            old_v, new_v = saved.get(k, "<missing>"), snapshot.get(k, "<missing>")
            if isinstance(old_v, dict) and isinstance(new_v, dict):  # name the changed entries (lr_schedule)
                lines += [f"{k}.{s}: {_short(old_v.get(s))} → {_short(new_v.get(s))}"
                          for s in sorted(set(old_v) | set(new_v)) if old_v.get(s) != new_v.get(s)]
            elif old_v != new_v:
                lines.append(f"{k}: {_short(old_v)} → {_short(new_v)}")
        raise ConfigError("resume: saved settings changed and anima_resume_snapshot_strict = true:\n  "
                          + "\n  ".join(lines) + "\n(set anima_resume_snapshot_strict = false to allow changes that "
                          "do not break the resume)")
    if fresh_optimizer:
        log.warning("resume: optimizer_type changed (%s → %s) and resume_ignore_optimizer_mismatch is on: "
                    "continuing with a FRESH optimizer state (moments restart from zero)", saved["optimizer_type"],
                    snapshot.get("optimizer_type"))
    rebuild = saved.get("lr_schedule") != snapshot.get("lr_schedule")
    old = states.read_config(folder)
    optimizer_args: list[str] = []
    if old is not None:
        new = states.config_record(cfg)
        # settings that no longer exist (an older version's fields, e.g. save_model_as) are not changes, nor are
        # settings an older version did not have yet at their default (e.g. ema_warmup): that is how it ran
        keys = [k for k in sorted(new)
                if k not in NOT_COMPARED and k not in CRITICAL and old.get(k) != new.get(k)
                and (k in old or new.get(k) != _default(k))]
        applied = [f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in keys if k not in STATE_WINS]
        refused = [f"{k}: {_short(old.get(k))} → {_short(new.get(k))} ({STATE_WINS[k]})" for k in keys
                   if k in STATE_WINS]
        if applied:
            log.info("resume: settings changed since the state was saved (applied):\n  %s", "\n  ".join(applied))
        if refused:
            log.warning("resume: changed settings NOT applied:\n  %s", "\n  ".join(refused))
        if "optimizer_args" in keys:
            was, now = old.get("optimizer_args") or {}, new.get("optimizer_args") or {}
            optimizer_args = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if rebuild:
        log.info("resume: the learning rate or its schedule changed: the schedule is rebuilt from the current "
                 "settings and continues at step %d", progress.step)
    return ResumeCheck(progress, rebuild, optimizer_args, fresh_optimizer=fresh_optimizer)


def apply_optimizer_args(optimizer: torch.optim.Optimizer, fresh_groups: list[dict], keys: list[str]) -> None:
    """After a resume: the optimizer_args that changed take their new value in every group (the loaded state
    carries the old ones); a key that is not a group setting cannot be applied and is said so."""
    for key in keys:
        if all(key in g for g in fresh_groups) and len(fresh_groups) == len(optimizer.param_groups):
            for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
                group[key] = fresh[key]
            log.info("resume: optimizer_args %s = %r applied", key, fresh_groups[0][key])
        else:
            log.warning("resume: optimizer_args %s changed but is not a setting of the optimizer's parameter "
                        "groups: NOT applied (the saved optimizer state is used as it is)", key)


def _short(value: Any) -> str:
    return states._short(value)


def _default(key: str) -> Any:
    """A setting's default as `config.json` records it (JSON)."""
    field = TrainConfig.model_fields.get(key)
    if field is None or field.is_required():
        return object()  # equal to nothing
    return json.loads(json.dumps(field.get_default(call_default_factory=True), default=str))


def _saved_step(path: Path) -> int | None:
    """The step a network file of ours was saved at (its `ss_steps`); None when missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("ss_steps", ""))
    except Exception:  # noqa: BLE001 (missing or damaged: not a finished final file)
        return None
