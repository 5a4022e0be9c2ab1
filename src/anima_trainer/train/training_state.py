"""Training states for an exact resume: what is saved, how it is written safely, and what must not change.

A state is a folder (kohya's names: `<output_name>-step<NNNNNNNN>-state`, `<output_name>-<NNNNNN>-state`,
`<output_name>-state` at the end of training) holding

* `network.safetensors`: the network's full state (factors, alphas, norm gains and their bases), fp32;
* `optimizer.safetensors` + `optimizer.json`, `scheduler.json`, `scaler.json`: the state dicts, tensors in
  safetensors and the structure in JSON (never pickle: a state folder from someone else is safe to open);
* `rng.safetensors` + `train_state.json`: python / numpy / torch CPU / CUDA RNG states, and the position:
  global step, epoch, batches of that epoch already consumed (states written before issue 16 also hold a
  `generator` stream that nothing drew from; it is ignored at load);
* `resume_snapshot.json`: the settings that must not change across a resume (see `build_snapshot`);
* `config.json`: the resolved full config (non-critical changes are logged from it);
* with `ema_decay`: `ema.safetensors` + `ema.json`, the EMA of the weights and its update count (train/ema.py);
* a fine-tune sharded with FSDP (train/sharded_run.py) holds `fsdp/` (torch.distributed.checkpoint: one
  `__<rank>_0.distcp` per process + `.metadata`, every process writing its own shards into a staging folder
  that the main process moves into the state being written) instead of `network.safetensors` and `optimizer.*`.

The folder is written under a hidden temporary name, every file fsync'd, then renamed into place: a crash
during a save leaves the previous state valid and no partial folder under a final name.  `train_state.json`
is written last and carries a manifest (sha256 of every other file): a damaged or hand-edited state is
refused at load with a one-line ConfigError naming the folder, the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.fileio import OutputExistsError, SaveError, atomic_write_bytes, replace_folder
from anima_trainer.tensor_files import atomic_save

log = logging.getLogger(__name__)

STATE_FORMAT = "anima_trainer_state/v1"
SNAPSHOT_SCHEMA = "anima_resume_snapshot/v1"
TRAIN_STATE = "train_state.json"
SHARDED_STATE = "fsdp"  # the sharded model + optimizer (DCP) of an FSDP fine-tune, a sub-folder of the state
MAX_COUNTER = 2**53  # steps/epochs/batches beyond this are not a real run (and overflow torch/numpy ints)


def state_name_pattern(output_name: str) -> re.Pattern[str]:
    """The state folders of exactly this run: `<name>-step<8 digits>-state`, `<name>-<6 digits>-state`,
    `<name>-state` (so output_name `r` never matches `r_v2-state` or `r-lowlr-step00000002-state`)."""
    return re.compile(re.escape(output_name) + r"(?:-step\d{8}|-\d{6})?-state")


class StateError(ConfigError):
    """A state folder that cannot be used (missing, damaged or hand-edited file): names folder, file, reason."""

    def __init__(self, folder: Path, file: str, reason: str, fix: str = "") -> None:
        super().__init__(f"resume: {Path(folder) / file}: {reason}"
                         + (f"; {fix}" if fix else "; the state is damaged: resume from another state folder"))


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
    """The inverse of `flatten`; ValueError (saying what) on data `flatten` cannot have written."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            key = data["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"refers to a tensor {key!r} that is not in the .safetensors file")
            return tensors[key]
        if "__tuple__" in data:
            if not isinstance(data["__tuple__"], list):
                raise ValueError("a tuple that is not a list")
            return tuple(unflatten(v, tensors) for v in data["__tuple__"])
        items = data.get("__dict__")
        if not isinstance(items, list) or not all(
                isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in items):
            raise ValueError("an object that is not a tagged tensor, tuple or dict")
        return {k: unflatten(v, tensors) for k, v in items}
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    return data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(json.dumps(data, indent=1, sort_keys=False).encode("utf-8"), path)


def write_nested(folder: Path, name: str, state: Any) -> None:
    """`<name>.json` (+ `<name>.safetensors` when there are tensors), each through the one write path (fsync'd,
    mode from the umask); a state may hold non-finite optimizer values, so finiteness is checked elsewhere."""
    tensors: dict[str, torch.Tensor] = {}
    data = flatten(state, tensors)
    if tensors:
        atomic_save(tensors, folder / f"{name}.safetensors", require_finite=False)
    _write_json(folder / f"{name}.json", data)


def read_json(folder: Path, name: str) -> Any:
    """A JSON file of a state; StateError naming it when missing or not JSON."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(folder, name, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateError(folder, name, f"not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a state; StateError naming it when missing or damaged."""
    path = Path(folder) / name
    if not path.is_file():
        raise StateError(folder, name, "missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise StateError(folder, name, f"not a readable safetensors file ({str(e)[:120]})") from None


def read_nested(folder: Path, name: str) -> Any:
    """What `write_nested` wrote; StateError naming the file when it is missing, damaged or malformed."""
    folder = Path(folder)
    data = read_json(folder, f"{name}.json")
    tensors = read_tensors(folder, f"{name}.safetensors") if (folder / f"{name}.safetensors").exists() else {}
    try:
        return unflatten(data, tensors)
    except (ValueError, TypeError, RecursionError) as e:
        raise StateError(folder, f"{name}.json", str(e)) from None


# ------------------------------------------------------------------------------------------------ RNG --

def capture_rng() -> dict:
    """Every global random stream the training consumes (dropout; data order and each sample's noise are pure
    functions of the seed, the epoch and the item)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what `capture_rng` saved.  An older state's `generator` entry (a stream nothing drew from) is
    ignored."""
    def tuples(v: Any) -> Any:  # python's random state is nested tuples
        return tuple(tuples(x) for x in v) if isinstance(v, (list, tuple)) else v

    random.setstate(tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32),
                         pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("the state has CUDA RNG states for %d devices, this machine has %d: CUDA randomness "
                        "(dropout on the GPU) is not restored", len(cuda), torch.cuda.device_count())


# ------------------------------------------------------------------------------------------ save / load --

def save_state(folder: str | Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, progress: Progress, snapshot: dict,
               config: dict | None = None, overwrite: bool = False,
               extra: Callable[[Path], Any] | None = None, sharded: Path | None = None) -> Path:
    """Write a whole state atomically (see the module doc); `extra(tmp_folder)` may add files (the resolved
    config TOML); `sharded`: a DCP folder every process wrote (FSDP), moved into the state as `fsdp/` in place
    of the network and optimizer files (same file system: a rename); returns the folder.  A failing write (disk
    full, no permission) raises SaveError naming the folder and the reason, and leaves the previous state as it
    was."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder} already exists; pass --overwrite to replace it")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if sharded is not None:
            os.replace(sharded, tmp / SHARDED_STATE)
        else:
            weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                       for k, v in network.state_dict().items()}
            atomic_save(weights, tmp / "network.safetensors", require_finite=False)  # checked before the save
            write_nested(tmp, "optimizer", optimizer.state_dict())
        write_nested(tmp, "scheduler", scheduler.state_dict())
        write_nested(tmp, "scaler", scaler.state_dict())
        write_nested(tmp, "rng", capture_rng())
        _write_json(tmp / "resume_snapshot.json", {"schema": SNAPSHOT_SCHEMA, "fields": snapshot})
        if config is not None:
            _write_json(tmp / "config.json", config)
        if extra is not None:
            extra(tmp)
        manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != TRAIN_STATE}
        if (tmp / SHARDED_STATE).is_dir():  # one level of sub-folder, listed as "fsdp/<file>"
            manifest.update({f"{SHARDED_STATE}/{p.name}": _sha256(p)
                             for p in sorted((tmp / SHARDED_STATE).iterdir()) if p.is_file()})
        # last: marks completeness, and lists every other file's checksum
        _write_json(tmp / TRAIN_STATE, {"format": STATE_FORMAT, **asdict(progress), "files": manifest})
        # overwrite: the old state is kept aside until the new one is in place
        replace_folder(tmp, folder, aside=folder.with_name(f".{folder.name}.old-{os.getpid()}"))
    except (OSError, SafetensorError) as e:
        raise SaveError(folder, e, what="the training state ") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _counter(folder: Path, data: dict, key: str, low: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < MAX_COUNTER:
        raise StateError(folder, TRAIN_STATE, f"{key} is {str(value)[:40]!r}, not a whole number from {low}")
    return value


def read_progress(folder: str | Path) -> Progress:
    """Where the state in `folder` stands (train_state.json, checked: a state folder, this format, sane numbers)."""
    folder = Path(folder)
    if not (folder / TRAIN_STATE).is_file():
        raise ConfigError(f"resume: {folder} is not a training state folder (no {TRAIN_STATE}); give a state folder "
                          "'<output_name>-…-state' or 'latest'")
    data = read_json(folder, TRAIN_STATE)
    if not isinstance(data, dict):
        raise StateError(folder, TRAIN_STATE, "not a JSON object")
    if data.get("format") != STATE_FORMAT:
        raise ConfigError(f"resume: {folder} has format {str(data.get('format'))[:40]!r}, expected {STATE_FORMAT} "
                          "(a state written by another trainer or version)")
    return Progress(_counter(folder, data, "step", 0), _counter(folder, data, "epoch", 1),
                    _counter(folder, data, "batch_in_epoch", 0))


def verify_state(folder: str | Path) -> Progress:
    """read_progress, then every file against the checksums train_state.json lists (states written before
    checksums existed are accepted unchecked)."""
    folder = Path(folder)
    progress = read_progress(folder)
    manifest = read_json(folder, TRAIN_STATE).get("files")
    if manifest is None:
        log.warning("resume: %s has no checksums (an older state); its files are not verified", folder)
        return progress
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise StateError(folder, TRAIN_STATE, "the file checksums ('files') are not a name → sha256 table")
    for name, digest in sorted(manifest.items()):
        path = folder / name
        inner = name.removeprefix(f"{SHARDED_STATE}/")  # the sharded sub-folder's files, one level deep
        if os.sep in inner or "/" in inner or inner in ("", ".", "..") or not path.is_file():
            raise StateError(folder, name, "missing (listed in train_state.json)")
        if _sha256(path) != digest:
            raise StateError(folder, name, "does not match its checksum in train_state.json (changed or damaged "
                             "after it was saved)")
    return progress


def read_snapshot(folder: str | Path) -> dict:
    data = read_json(Path(folder), "resume_snapshot.json")
    fields = data.get("fields", data) if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise StateError(Path(folder), "resume_snapshot.json", "'fields' is not a JSON object")
    return fields


def config_record(cfg: TrainConfig) -> dict:
    """What a state's `config.json` holds: the resolved config as JSON (a resume logs the changes against it)."""
    return json.loads(cfg.model_dump_json())


def read_config(folder: str | Path) -> dict | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    data = read_json(Path(folder), "config.json")
    return data if isinstance(data, dict) else None


_NOT_ELEMENTWISE = ("row", "col", "absmax", "qmap")  # Adafactor's factored and bitsandbytes' quantisation states


def check_optimizer_state(folder: Path, saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Check a saved optimizer state dict against the live optimizer before loading it.  Damage (wrong
    structure, a tensor whose shape is not its parameter's) raises StateError; a state of another optimizer
    (other hyperparameter names in its groups) returns the reason, for the caller to refuse or start fresh."""
    name = "optimizer.json"
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]):
        raise StateError(folder, name, "not an optimizer state (needs 'state' and 'param_groups' with 'params')")
    groups = optimizer.param_groups
    counts = [len(g["params"]) for g in saved["param_groups"]]
    if counts != [len(g["params"]) for g in groups]:
        return (f"its parameter groups hold {counts} parameters, this optimizer's hold "
                f"{[len(g['params']) for g in groups]}")
    for i, (old, new) in enumerate(zip(saved["param_groups"], groups, strict=True)):
        if set(old) - {"initial_lr"} != set(new) - {"initial_lr"}:
            diff = sorted(set(old) ^ set(new) - {"initial_lr"})
            return f"group {i} has other settings ({', '.join(map(str, diff[:6]))}): written by another optimizer"
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    params = [p for g in groups for p in g["params"]]
    by_id = dict(zip(ids, params, strict=True))
    for pid, entry in saved["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise StateError(folder, name, f"state entry {str(pid)[:20]!r} belongs to no parameter")
        p = by_id[pid]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.numel() > 1 \
                    and tuple(value.shape) != tuple(p.shape) and not any(k in str(key) for k in _NOT_ELEMENTWISE):
                raise StateError(folder, "optimizer.safetensors",
                                 f"'{key}' of parameter {pid} has shape {list(value.shape)}, the parameter has "
                                 f"{list(p.shape)}")
    return None


def load_state(folder: str | Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, restore_scheduler: bool = True,
               strict_optimizer: bool = True, fresh_optimizer: bool = False,
               sharded: Callable[[Path, bool], None] | None = None) -> Progress:
    """Restore everything `save_state` wrote into live objects (built from the same config); returns where
    to continue.  Every file is read and checked (checksums, structure, shapes) before anything is changed.
    `restore_scheduler=False` keeps the live (rebuilt) schedule; an optimizer state written by another optimizer
    is an error, or with `strict_optimizer=False` a warning and a fresh optimizer state.  `fresh_optimizer`: the
    optimizer was changed on purpose (resume_ignore_optimizer_mismatch): its saved state is not loaded at all.
    `sharded(folder, fresh_optimizer)`: loads an FSDP state's `fsdp/` (collective) in place of the network and
    optimizer files; a sharded state without it (or the other way round) is refused, saying why."""
    folder = Path(folder)
    progress = verify_state(folder)
    check_sharding(folder, sharded is not None)
    if sharded is not None:
        return _load_rest(folder, progress, lambda: sharded(folder, fresh_optimizer), scheduler, scaler,
                          restore_scheduler)
    weights = read_tensors(folder, "network.safetensors")
    own = network.state_dict()
    if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
        diff = sorted(set(weights) ^ set(own))[:5] or [
            k for k in own if tuple(weights[k].shape) != tuple(own[k].shape)][:5]
        raise ConfigError(f"resume: the network in {folder} does not match this config's network (e.g. {diff}); "
                          "the network settings changed since the state was saved")
    saved_optimizer = read_nested(folder, "optimizer")
    misfit = None if fresh_optimizer else check_optimizer_state(folder, saved_optimizer, optimizer)
    if fresh_optimizer:
        saved_optimizer = None
    if misfit is not None:
        if strict_optimizer:
            raise ConfigError(f"resume: the optimizer state in {folder} does not fit this optimizer ({misfit}); "
                              "use the optimizer_type/optimizer_args it was saved with, or set "
                              "resume_ignore_optimizer_mismatch = true (or resume_snapshot_strict = false) to "
                              "continue with a fresh optimizer state")
        log.warning("resume: the optimizer state in %s does not fit this optimizer (%s): continuing with a FRESH "
                    "optimizer state (moments restart from zero)", folder, misfit)
        saved_optimizer = None
    def restore() -> None:
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(weights[k].to(t.dtype))
        if saved_optimizer is not None:
            try:
                optimizer.load_state_dict(saved_optimizer)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                raise ConfigError(f"resume: the optimizer state in {folder} does not fit this optimizer ({e}); "
                                  "optimizer_type or the parameter groups changed") from None

    return _load_rest(folder, progress, restore, scheduler, scaler, restore_scheduler)


def check_sharding(folder: Path, sharded: bool) -> None:
    """ConfigError when the state's form (sharded by FSDP or whole files) is not the one this run loads."""
    saved = (folder / SHARDED_STATE).is_dir()
    if saved and not sharded:
        raise ConfigError(f"resume: {folder} holds a fine-tune sharded with FSDP ({SHARDED_STATE}/); resume it "
                          "sharded: the same number of processes and fsdp_sharding = \"auto\"")
    if sharded and not saved:
        raise ConfigError(f"resume: {folder} was not saved sharded (it has no {SHARDED_STATE}/) but this run shards "
                          "the fine-tune with FSDP; resume it as it was saved (fsdp_sharding = \"off\", or the "
                          "process count it was saved with)")


def _load_rest(folder: Path, progress: Progress, restore: Callable[[], None], scheduler: Any, scaler: Any,
               restore_scheduler: bool) -> Progress:
    """The end of `load_state`: every remaining file read and checked, then the weights and optimizer restored
    (`restore`), then the schedule, the scaler and the random streams."""
    scheduler_state = read_nested(folder, "scheduler") if restore_scheduler else None
    scaler_state = read_nested(folder, "scaler")
    rng_state = read_nested(folder, "rng")
    restore()
    for file, state, target in (("scheduler.json", scheduler_state, scheduler), ("scaler.json", scaler_state, scaler)):
        if state is None:
            continue
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise StateError(folder, file, f"does not fit this {type(target).__name__} "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    try:
        restore_rng(rng_state)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as e:
        raise StateError(folder, "rng.json", f"not a valid random-generator state ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    return progress


def find_latest_state(output_dir: str | Path, output_name: str) -> Path:
    """This run's state folder in `output_dir` with the highest step (`--resume latest`): only the exact
    names of `output_name`'s states count, never another run's (`<name>_v2-state`, `<name>-lowlr-…-state`)."""
    pattern = state_name_pattern(output_name)
    candidates = []
    out = Path(output_dir)
    for d in out.iterdir() if out.is_dir() else ():
        if pattern.fullmatch(d.name) and d.is_dir() and (d / TRAIN_STATE).is_file():
            try:
                candidates.append((read_progress(d).step, d.stat().st_mtime, d))
            except (ConfigError, OSError) as e:
                log.warning("resume = latest: skipping %s (%s)", d, e)
    if not candidates:
        raise ConfigError(f"resume = latest: no state folder of output_name {output_name!r} ('{output_name}-state', "
                          f"'{output_name}-step<N>-state', '{output_name}-<epoch>-state') in {output_dir}; states "
                          "are written with save_state = true")
    return max(candidates)[2]


def remove_stale_temporaries(output_dir: str | Path, output_name: str) -> None:
    """What this run's saves killed half-way leave (removed at start; other runs' are never touched): folders of
    states being written (hidden `.<name>…-state.tmp-*`, never valid); a state moved aside to be replaced
    (`.<name>…-state.old-*`: put back when the new one did not take its name, else removed); the staging folder of
    a sharded state (`.<name>-state.tmp-*-shards`); temporary
    network files and EMA files (`.<name>….tmp`)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    name = re.escape(output_name)
    state = re.compile(r"\.(" + name + r"(?:-step\d{8}|-\d{6})?-state)\.(tmp|old)-\d+(?:-shards)?")
    network = re.compile(r"\.+" + name + r"(?:-step\d{8}|-\d{6})?(?:-ema)?\.[^/]*\.tmp")
    for d in sorted(out.iterdir()):
        m = state.fullmatch(d.name)
        if m and m.group(2) == "old":
            final = d.with_name(m.group(1))
            if d.is_dir() and (d / TRAIN_STATE).is_file() and not final.exists():
                replace_folder(d, final)
            else:
                shutil.rmtree(d, ignore_errors=True)
        elif m:
            shutil.rmtree(d, ignore_errors=True)
        elif network.fullmatch(d.name) and d.is_file():
            d.unlink(missing_ok=True)


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

    crit = changed([k for k in current if k in critical and k in saved])  # older states lack newer fields
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
