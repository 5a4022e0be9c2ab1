"""Training states for an exact resume: what is saved, how it is written safely, and what must not change.

A state is a folder (kohya's names: `<output_name>-step<NNNNNNNN>-state`, `<output_name>-<NNNNNN>-state`,
`<output_name>-state` at the end of training) holding

* `network.safetensors`: the network's full state (factors, alphas, norm gains and their bases), fp32;
* `optimizer.safetensors` + `optimizer.json`, `scheduler.json`, `scaler.json`: the state dicts, tensors in
  safetensors and the structure in JSON (never pickle: a state folder from someone else is safe to open);
* `rng.safetensors` + `train_state.json`: python / numpy / torch CPU / CUDA RNG states, the loop's noise
  generator, and the position: global step, epoch, batches of that epoch already consumed;
* `resume_snapshot.json`: the settings that must not change across a resume (see `build_snapshot`);
* `config.json`: the resolved full config (non-critical changes are logged from it).

The folder is written under a hidden temporary name, every file fsync'd, then renamed into place: a crash
during a save leaves the previous state valid and no partial folder under a final name.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anima_trainer.config import ConfigError
from anima_trainer.fileio import OutputExistsError, SaveError

log = logging.getLogger(__name__)

STATE_FORMAT = "anima_trainer_state/v1"
SNAPSHOT_SCHEMA = "anima_resume_snapshot/v1"
TRAIN_STATE = "train_state.json"


@dataclass
class Progress:
    """Where the run is: optimizer steps done, the current epoch (1-based) and its batches already consumed."""

    step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0


# --------------------------------------------------------------------------------- nested state <-> files --

def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """A state dict as JSON-able data: tensors go to `tensors` (referenced by key), tuples are tagged."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str or int, got {[type(k).__name__ for k in obj]}")
        return {"__dict__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return flatten(torch.from_numpy(obj.copy()), tensors, prefix)
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def unflatten(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__tuple__" in data:
            return tuple(unflatten(v, tensors) for v in data["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in data["__dict__"]}
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    return data


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


def _write_nested(folder: Path, name: str, state: Any) -> None:
    """`<name>.json` (+ `<name>.safetensors` when there are tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    data = flatten(state, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
        _fsync_file(folder / f"{name}.safetensors")
    _write_json(folder / f"{name}.json", data)


def _read_nested(folder: Path, name: str) -> Any:
    data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    tensor_file = folder / f"{name}.safetensors"
    return unflatten(data, load_file(str(tensor_file)) if tensor_file.exists() else {})


# ------------------------------------------------------------------------------------------------ RNG --

def capture_rng(generator: torch.Generator) -> dict:
    """Every random stream the training consumes (data order is a pure function of seed and epoch)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state(), "generator_device": str(generator.device)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    def tuples(v: Any) -> Any:  # python's random state is nested tuples
        return tuple(tuples(x) for x in v) if isinstance(v, (list, tuple)) else v

    random.setstate(tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32),
                         pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("the state has CUDA RNG states for %d devices, this machine has %d: CUDA randomness "
                        "(dropout on the GPU) is not restored", len(cuda), torch.cuda.device_count())


# ------------------------------------------------------------------------------------------ save / load --

def save_state(folder: str | Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, generator: torch.Generator, progress: Progress, snapshot: dict,
               config: dict | None = None, overwrite: bool = False,
               extra: Callable[[Path], Any] | None = None) -> Path:
    """Write a whole state atomically (see the module doc); `extra(tmp_folder)` may add files (the resolved
    config TOML); returns the folder.  A failing write (disk full, no permission) raises SaveError naming the
    folder and the reason, and leaves the previous state as it was."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder} already exists; pass --overwrite to replace it")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in network.state_dict().items()}
        save_file(weights, str(tmp / "network.safetensors"))
        _fsync_file(tmp / "network.safetensors")
        _write_nested(tmp, "optimizer", optimizer.state_dict())
        _write_nested(tmp, "scheduler", scheduler.state_dict())
        _write_nested(tmp, "scaler", scaler.state_dict())
        _write_nested(tmp, "rng", capture_rng(generator))
        _write_json(tmp / "resume_snapshot.json", {"schema": SNAPSHOT_SCHEMA, "fields": snapshot})
        if config is not None:
            _write_json(tmp / "config.json", config)
        if extra is not None:
            extra(tmp)
        _write_json(tmp / TRAIN_STATE, {"format": STATE_FORMAT, **asdict(progress)})  # last: marks completeness
        old = None
        if folder.exists():  # overwrite: keep the old one until the new one is in place
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None:  # put the previous state back under its name
                os.replace(old, folder)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        dir_fd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, SafetensorError) as e:
        raise SaveError(folder, e, what="the training state ") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_progress(folder: str | Path) -> Progress:
    folder = Path(folder)
    path = folder / TRAIN_STATE
    if not path.is_file():
        raise ConfigError(f"resume: {folder} is not a training state folder (no {TRAIN_STATE})")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != STATE_FORMAT:
        raise ConfigError(f"resume: {folder} has format {data.get('format')!r}, expected {STATE_FORMAT} "
                          "(a state written by another trainer or version)")
    return Progress(int(data["step"]), int(data["epoch"]), int(data["batch_in_epoch"]))


def read_snapshot(folder: str | Path) -> dict:
    data = json.loads((Path(folder) / "resume_snapshot.json").read_text(encoding="utf-8"))
    return data.get("fields", data) if isinstance(data, dict) else {}


def read_config(folder: str | Path) -> dict | None:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_state(folder: str | Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, generator: torch.Generator) -> Progress:
    """Restore everything `save_state` wrote into live objects (built from the same config); returns where
    to continue."""
    folder = Path(folder)
    progress = read_progress(folder)
    weights = load_file(str(folder / "network.safetensors"))
    own = network.state_dict()
    if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
        diff = sorted(set(weights) ^ set(own))[:5] or [
            k for k in own if tuple(weights[k].shape) != tuple(own[k].shape)][:5]
        raise ConfigError(f"resume: the network in {folder} does not match this config's network (e.g. {diff}); "
                          "the network settings changed since the state was saved")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(weights[k].to(t.dtype))
    try:
        optimizer.load_state_dict(_read_nested(folder, "optimizer"))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"resume: the optimizer state in {folder} does not fit this optimizer ({e}); "
                          "optimizer_type or the parameter groups changed") from None
    scheduler.load_state_dict(_read_nested(folder, "scheduler"))
    scaler.load_state_dict(_read_nested(folder, "scaler"))
    restore_rng(_read_nested(folder, "rng"), generator)
    return progress


def find_latest_state(output_dir: str | Path, output_name: str) -> Path:
    """The state folder of `output_name` in `output_dir` with the highest step (`--resume latest`)."""
    candidates = []
    for d in Path(output_dir).glob(f"{output_name}*-state"):
        if d.is_dir() and (d / TRAIN_STATE).is_file():
            try:
                candidates.append((read_progress(d).step, d.stat().st_mtime, d))
            except (ConfigError, ValueError, KeyError):
                continue
    if not candidates:
        raise ConfigError(f"resume = latest: no state folder '{output_name}*-state' in {output_dir} (states are "
                          "written with save_state = true)")
    return max(candidates)[2]


def remove_stale_temporaries(output_dir: str | Path, output_name: str | None = None) -> None:
    """What saves killed half-way leave (removed at start): folders of states being written (hidden
    `.…-state.tmp-*`, never valid); a state moved aside to be replaced (`.…-state.old-*`: put back when the new
    one did not take its name, else removed); with `output_name`, that run's temporary files (`.<name>….tmp`)."""
    out = Path(output_dir)
    for d in out.glob(".*-state.old-*"):
        final = d.with_name(d.name[1:].rsplit(".old-", 1)[0])
        if d.is_dir() and (d / TRAIN_STATE).is_file() and not final.exists():
            os.replace(d, final)
        else:
            shutil.rmtree(d, ignore_errors=True)
    for d in out.glob(".*-state.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    if output_name:
        name = glob.escape(output_name)
        for f in [*out.glob(f".{name}*.tmp"), *out.glob(f"..{name}*.tmp")]:
            if f.is_file():
                f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- snapshot --

def check_snapshot(saved: dict, current: dict, *, strict: bool, critical: tuple[str, ...]) -> list[str]:
    """Compare the state's snapshot with the current one.  Changed critical fields: ConfigError listing
    `field: old → new` (a warning when not strict); other changed fields are returned for logging."""
    def changed(keys) -> list[str]:
        out = []
        for k in keys:
            old, new = saved.get(k, "<missing>"), current.get(k, "<missing>")
            if old != new:
                out.append(f"{k}: {_short(old)} → {_short(new)}")
        return out

    crit = changed([k for k in current if k in critical])
    other = changed(sorted((set(current) | set(saved)) - set(critical)))
    if crit:
        text = "resume: settings that must not change across a resume changed:\n  " + "\n  ".join(crit)
        if strict:
            raise ConfigError(text + "\n(set resume_snapshot_strict = false to continue anyway)")
        log.warning("%s\ncontinuing because resume_snapshot_strict = false", text)
    return other


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
