"""Where the run's scalars and previews go (TensorBoard by default, wandb on request) and the optional
TensorBoard server.

Defaults (why): sd-scripts-anima turns TensorBoard on when nothing is set, so do we — but only when the
`tensorboard` package is installed (it is an optional extra; a default must never make a run fail), and under
`<output_dir>/logs` rather than `./logs`, so a run's files stay together whatever folder it was started from.
An explicit `log_with = "tensorboard"` without the package is an error, as is `wandb` without wandb;
`log_with = "none"` turns the trackers off.

Run folder: `<logging_dir>/<log_prefix><YYYYmmdd_HHMMSS>` (kohya's layout; `_2`, `_3` … appended if that folder
exists), `log_prefix` defaulting to the sanitised `output_name` + `_` as in sd-scripts-anima; accelerate then
writes the event files into its `<log_tracker_name or network_train>/` subfolder.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from anima_trainer.config import ConfigError

log = logging.getLogger(__name__)
DEFAULT_TRACKER_NAME = "network_train"  # kohya's project name for init_trackers
PORT_TRIES = 20  # sd-scripts-anima: the preferred port, then +1 … +20


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def sanitize_name(name: str) -> str:
    """sd-scripts-anima's folder-safe name: runs of chars outside [0-9A-Za-z._-] → `_`, `_` runs collapsed,
    `._-` stripped at both ends; `train` when nothing is left."""
    s = re.sub(r"[^0-9A-Za-z._-]+", "_", name)
    s = re.sub(r"_+", "_", s).strip("._-")
    return s or "train"


def run_folder(logging_dir: Path, prefix: str, now: datetime) -> Path:
    """`<logging_dir>/<prefix><YYYYmmdd_HHMMSS>`, made unique with `_2`, `_3` … (two runs in one second)."""
    base = f"{prefix}{now:%Y%m%d_%H%M%S}"
    path, n = logging_dir / base, 1
    while path.exists():
        n += 1
        path = logging_dir / f"{base}_{n}"
    return path


@dataclass
class TrackingPlan:
    """The resolved logging setup: what `Accelerator(...)` and `init_trackers(...)` get."""

    log_with: list[str] = field(default_factory=list)  # empty = no trackers
    logging_dir: Path | None = None
    run_dir: Path | None = None  # accelerate's project_dir; the event files go into run_dir/tracker_name
    run_name: str = ""
    tracker_name: str = DEFAULT_TRACKER_NAME
    init_kwargs: dict[str, dict] = field(default_factory=dict)

    def accelerator_kwargs(self) -> dict[str, Any]:
        """`Accelerator(**plan.accelerator_kwargs(), ...)`."""
        return {"log_with": list(self.log_with) or None,
                "project_dir": str(self.run_dir) if self.run_dir is not None else None}

    @property
    def tensorboard(self) -> bool:
        return "tensorboard" in self.log_with


def _read_tracker_config(path: Path) -> dict[str, dict]:
    """kohya's `log_tracker_config`: a TOML of per-tracker init arguments (`[wandb]`, `[tensorboard]` tables)."""
    try:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"log_tracker_config: '{path}' not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"log_tracker_config: '{path}' is not valid TOML: {e}") from None
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"log_tracker_config: top-level keys must be tracker tables ([wandb], [tensorboard]); "
                          f"got {', '.join(bad)}")
    return data


def resolve_tracking(cfg: Any, now: datetime | None = None, *, installed: Callable[[str], bool] = _installed,
                     run_dir: Path | None = None) -> TrackingPlan:
    """The TrackingPlan for `cfg` (see the module docstring for the defaults).  Creates nothing on disk; `run_dir`
    forces the run folder (a resumed run continuing its curves)."""
    now = now or datetime.now()
    want = cfg.log_with
    if want == "none":
        return TrackingPlan()
    if want is None:  # the default: TensorBoard when it can work
        if not installed("tensorboard"):
            log.warning("TensorBoard is not installed, so this run logs no curves (pip install tensorboard, or "
                        "set log_with = \"none\" to silence this)")
            return TrackingPlan()
        trackers = ["tensorboard"]
    elif want == "all":  # kohya passes "all" to accelerate: every installed tracker; ours are these two
        trackers = [t for t in ("tensorboard", "wandb") if installed(t)]
        if not trackers:
            raise ConfigError("log_with: 'all' needs tensorboard or wandb installed (pip install tensorboard wandb)")
    else:
        trackers = [want]
    for t in trackers:
        if not installed(t):
            raise ConfigError(f"log_with: '{t}' needs the {t} package, which is not installed (pip install {t}, "
                              f"or pip install anima-trainer[{t}])")
    logging_dir = cfg.logging_dir
    if logging_dir is None and "tensorboard" in trackers:
        logging_dir = Path(cfg.output_dir) / "logs"
    prefix = cfg.log_prefix if cfg.log_prefix is not None else sanitize_name(cfg.output_name) + "_"
    if run_dir is None and logging_dir is not None:
        run_dir = run_folder(Path(logging_dir), prefix, now)
    run_name = run_dir.name if run_dir is not None else f"{prefix}{now:%Y%m%d_%H%M%S}"
    init_kwargs = _read_tracker_config(cfg.log_tracker_config) if cfg.log_tracker_config else {}
    if "wandb" in trackers:
        wandb_kwargs = init_kwargs.setdefault("wandb", {})
        wandb_kwargs.setdefault("name", cfg.wandb_run_name or run_name)  # the same name as the TensorBoard run
    return TrackingPlan(trackers, Path(logging_dir) if logging_dir is not None else None, run_dir, run_name,
                        cfg.log_tracker_name or DEFAULT_TRACKER_NAME, init_kwargs)


def tracker_config(cfg: Any, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What `init_trackers(config=...)` gets: the run facts in `extra` (max_train_steps, ...) as scalars; the full
    settings are in the event log and the resolved config instead (kohya's `log_config` is not implemented)."""
    out = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in (extra or {}).items()
           if v is not None}
    return out or None


def start_trackers(accelerator: Any, plan: TrackingPlan, cfg: Any, extra_config: dict[str, Any] | None = None) -> None:
    """`accelerator.init_trackers` for the plan (nothing when no tracker is on); logs in to wandb with
    `wandb_api_key` when one is given (kohya)."""
    if not plan.log_with:
        return
    if "wandb" in plan.log_with and cfg.wandb_api_key:
        import wandb

        wandb.login(key=cfg.wandb_api_key)
    accelerator.init_trackers(plan.tracker_name, config=tracker_config(cfg, extra_config),
                              init_kwargs=plan.init_kwargs)
    if plan.run_dir is not None:
        log.info("logs: %s", plan.run_dir)


def _image_array(image: Any):
    """PIL image, file path, HWC uint8 array or [0, 1] tensor (CHW when it has 1 or 3 leading channels, else
    HWC) → HWC uint8 numpy array."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, str | Path):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):  # CHW (torch's layout) or HWC, values in [0, 1]
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 image arrays, got {arr.dtype}")
    return arr


def log_images(accelerator: Any, tag: str, images: Iterable[Any], step: int) -> int:
    """Sample previews into the trackers: TensorBoard as `<tag>/<NN>` images (previews differ in size, so they
    are not one batch), wandb as one list under `tag`.  Returns the number of images sent (0 without trackers)."""
    arrays = [_image_array(im) for im in images]
    sent = 0
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            for i, arr in enumerate(arrays):
                tracker.writer.add_image(f"{tag}/{i:02d}", arr, global_step=step, dataformats="HWC")
            tracker.writer.flush()
            sent = len(arrays)
        elif tracker.name == "wandb":
            tracker.log_images({tag: arrays}, step=step)
            sent = len(arrays)
    return sent


# --- TensorBoard server ---------------------------------------------------------------------------------------
def port_is_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now (there is a small race until the server binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, preferred: int, tries: int = PORT_TRIES,
              is_free: Callable[[str, int], bool] = port_is_free) -> tuple[int | None, list[int]]:
    """(the first free port of preferred, preferred+1 … preferred+tries, the busy ones tried before it);
    port 0 asks the OS for a free one.  (None, busy) when all are taken."""
    if preferred == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1], []
    busy = []
    for port in range(preferred, min(preferred + tries, 65535) + 1):
        if is_free(host, port):
            return port, busy
        busy.append(port)
    return None, busy


def tensorboard_command(logdir: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


class TensorBoardServer:
    """A TensorBoard child process, stopped with the run (`stop()`, or leave the `with` block).  A server that
    was not started (disabled, not installed, no free port) is a handle with `url = None` and a no-op stop."""

    def __init__(self, process: Any = None, url: str | None = None, port: int | None = None) -> None:
        self.process, self.url, self.port = process, url, port

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (kill it if it does not exit within `timeout` s); safe to call twice."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> TensorBoardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tensorboard(cfg: Any, plan: TrackingPlan, *, is_main_process: bool = True,
                      popen: Callable[..., Any] = subprocess.Popen,
                      is_free: Callable[[str, int], bool] = port_is_free,
                      installed: Callable[[str], bool] = _installed) -> TensorBoardServer:
    """With `auto_start_tensorboard`, on the main process, when TensorBoard logging is on: serve
    `tensorboard_logdir` (default: the logging_dir, all runs) on `tensorboard_host`:`tensorboard_port`, moving to
    the next free port (up to +20) when it is busy.  Every reason not to start is reported, never fatal."""
    if not cfg.auto_start_tensorboard or not is_main_process:
        return TensorBoardServer()
    if not plan.tensorboard:
        log.warning("auto_start_tensorboard: TensorBoard logging is off for this run (log_with), so no server "
                    "is started")
        return TensorBoardServer()
    if not installed("tensorboard"):
        log.warning("auto_start_tensorboard: tensorboard is not installed (pip install tensorboard)")
        return TensorBoardServer()
    logdir = Path(cfg.tensorboard_logdir or plan.logging_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    host = cfg.tensorboard_host
    port, busy = pick_port(host, cfg.tensorboard_port, is_free=is_free)
    if port is None:
        log.warning("auto_start_tensorboard: ports %d-%d on %s are all busy; no TensorBoard server started "
                    "(run `tensorboard --logdir %s` yourself)", busy[0], busy[-1], host, logdir)
        return TensorBoardServer()
    if busy:
        log.warning("TensorBoard port %d is busy; falling back to available port %d", busy[0], port)
    process = popen(tensorboard_command(logdir, host, port), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    log.info("TensorBoard: %s (logdir %s)", url, logdir)
    return TensorBoardServer(process, url, port)
