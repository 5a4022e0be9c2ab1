"""Data-parallel (DDP) training over several processes started by `accelerate launch` or `torchrun`.

Every process holds the whole frozen model and the whole (small) network and runs its own share of every
epoch's batches; the network's gradients are averaged over the processes before each optimizer step, so the
weights stay identical everywhere and one optimizer step sees world × the per-process batch (kohya's meaning
of `train_batch_size` under `accelerate launch`: it is per process).  The adapter parameters live outside
the frozen DiT's parameter list, so there is no single module to wrap in `DistributedDataParallel`: the
gradients are averaged here: all-reduced in buckets started from gradient hooks while the backward of each
step's last micro-batch goes on (`Distributed.gradient_sync`, train/grad_sync.py), or with one flat all-reduce
after it (`Distributed.average_gradients`, `ddp_bucket_cap_mb = 0`).

Sharding (`shard_batches`): batch k of an epoch's plan goes to process k mod world, and every process runs
ceil(batches / world) of them — the short ones wrap around to the epoch's first batches (accelerate's
`even_batches`), so all processes step at the same micro-batches and no collective waits forever.
`train.setup.total_steps(cfg, batches, num_processes)` already counts ceil(ceil(batches / processes) /
accumulation) optimizer steps per epoch.

Only the main process (rank 0) writes network files, states, events, previews and validation logs; the
others take part in the collectives (gradient average, logged-loss mean, RNG gather for a state).  A state
saved by N processes carries every process's RNG streams (`write_rank_rngs`) and is resumed with the same N
(`read_rank_rng` refuses another N).  Disk caches are built by all processes at once, each its own items,
then read by all (`Distributed.build_cache`; entries are content-addressed files written atomically, so there
is nothing to race on).  DeepSpeed, Megatron-LM and TPU launches are refused (`check_supported`), and FSDP
launches unless the run is a fine-tune (which the trainer shards itself: train/sharded_run.py).
See docs/multi_gpu.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from anima_trainer.config import ConfigError
from anima_trainer.fileio import atomic_write_bytes
from anima_trainer.train.grad_sync import DEFAULT_BUCKET_CAP_MB, GradientSync
from anima_trainer.train.training_state import read_nested, write_nested

log = logging.getLogger(__name__)
T = TypeVar("T")

RANKS_FILE = "distributed.json"  # in a state folder saved by several processes: {"world_size": N}
RANK_RNG = "rng_rank{rank}"  # rng_rank<r>.json (+ .safetensors): process r's RNG streams in such a state


# ------------------------------------------------------------------------------------------- sharding --

def shard_batches(num_batches: int, rank: int, world: int) -> list[int]:
    """Indices into an epoch's batch plan that process `rank` of `world` runs, in order.

    Round-robin: batch k goes to rank k % world.  Every rank gets ceil(num_batches / world) batches; when
    `num_batches` is not a multiple of `world`, the missing positions wrap around to the epoch's first
    batches (position p runs batch p % num_batches), so some batches are seen twice in that epoch.  Global
    position j·world + r is this rank's j-th batch: micro-batch j of every rank forms one global batch.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    if num_batches <= 0:
        return []
    per_rank = math.ceil(num_batches / world)
    return [(j * world + rank) % num_batches for j in range(per_rank)]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s dropout draws once the network is built (each sample's noise has its own seed):
    `seed + rank`, so rank 0 keeps the single-process stream and no two processes draw the same dropout."""
    return seed + rank


def take_owned(mapping: dict, owned: Callable[[int], bool] | None) -> dict:
    """The entries of `mapping` whose position (insertion order) `owned` accepts; all of them for None
    (for `Distributed.build_cache` with a dict of things to cache, e.g. `cache_text`'s captions)."""
    if owned is None:
        return dict(mapping)
    return {k: v for j, (k, v) in enumerate(mapping.items()) if owned(j)}


# ------------------------------------------------------------------------------------------ launching --

def launched_world_size(env: dict[str, str] | None = None) -> int:
    """How many processes the launcher started (`WORLD_SIZE` of torchrun / accelerate launch; 1 when none)."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def needs_cpu_backend(env: dict[str, str] | None = None) -> bool:
    """Whether `Accelerator(cpu=...)` must be told to run on the CPU: several processes were launched on a
    machine without CUDA/XPU.  Without `cpu=True` accelerate (1.x) then initialises a process group but
    reports a single process in each of them, and every process would train alone and write the same
    files; with it, the processes form one gloo group (DistributedType.MULTI_CPU)."""
    if launched_world_size(env) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


_REFUSED = {
    "FSDP": "FSDP (accelerate launch --use_fsdp / an accelerate config with distributed_type: FSDP) is not "
            "supported for adapter training: the trained network is a few MB and is replicated in every process "
            "anyway; sharding the frozen DiT is future work (a fine-tune, training_mode = \"finetune\", is sharded "
            "with FSDP2 by the trainer itself)",
    "DEEPSPEED": "DeepSpeed (accelerate launch --use_deepspeed / an accelerate config with distributed_type: "
                 "DEEPSPEED) is not supported: the network's gradients are averaged by the trainer itself and "
                 "DeepSpeed's engine would not see them",
    "MEGATRON_LM": "Megatron-LM is not supported",
    "XLA": "TPUs (XLA) are not supported",
}


def launched_by_accelerate_fsdp(env: dict[str, str] | None = None) -> bool:
    """Whether `accelerate launch --use_fsdp` (or an accelerate config with distributed_type FSDP) started
    this process."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_supported(accelerator: Any, *, finetune: bool = False) -> None:
    """ConfigError unless `accelerator` runs one process or plain data-parallel processes (DDP on CUDA, gloo
    on CPU, or another torch.distributed device backend); `finetune`: an FSDP launch is accepted too (the
    trainer shards the fine-tune itself: train/sharded_run.py).  Also refuses a multi-process launch that
    accelerate set up as single-process runs (each process would train alone and write the same files)."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1].upper()
    if kind in _REFUSED and not (finetune and kind == "FSDP"):
        raise ConfigError(f"{_REFUSED[kind]}. Launch plain data-parallel processes instead: "
                          "`accelerate launch --multi_gpu --num_processes N -m anima_trainer train ...` "
                          "(docs/multi_gpu.md)")
    launched = launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                          "(no GPU here?): on a machine without CUDA pass Accelerator(cpu=needs_cpu_backend()) "
                          "or set ACCELERATE_USE_CPU=1 (docs/multi_gpu.md)")


def _control_group(force: bool = False) -> Any:
    """A gloo group of all processes for control messages when the default group is not gloo (NCCL)."""
    if not force and tdist.get_backend() == "gloo":
        return None
    return tdist.new_group(backend="gloo")


# -------------------------------------------------------------------------------------------- the API --

@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; with world_size 1 every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # a gloo group for control messages (flags, pickled objects) beside an NCCL one: they then stay on the
    # host, and a per-step stop check costs no GPU synchronisation; None = the default group
    control: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_accelerator(cls, accelerator: Any, *, finetune: bool = False) -> Distributed:
        """From an `accelerate.Accelerator` (after `check_supported`).  Every process must call it (it may
        create the control group, a collective)."""
        check_supported(accelerator, finetune=finetune)
        if accelerator.num_processes == 1:
            return cls(device=torch.device(accelerator.device))
        if not tdist.is_available() or not tdist.is_initialized():
            raise RuntimeError("accelerate reports several processes but torch.distributed is not initialised")
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index,
                   torch.device(accelerator.device), _control_group())

    @classmethod
    def from_process_group(cls, device: torch.device | str | None = None, *,
                           control_group: bool = False) -> Distributed:
        """From an initialised default torch.distributed group (tests, scripts without accelerate);
        `control_group`: a separate gloo group for control messages even when the default one is gloo."""
        if not tdist.is_available() or not tdist.is_initialized():
            return cls(device=torch.device(device or "cpu"))
        return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", tdist.get_rank())),
                   torch.device(device or "cpu"), _control_group(force=control_group))

    # ---------------------------------------------------------------------------------------- who --
    @property
    def enabled(self) -> bool:
        """Several processes: the collectives below communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, events, previews and logs metrics."""
        return self.rank == 0

    def shard(self, num_batches: int) -> list[int]:
        """`shard_batches(num_batches, rank, world_size)`."""
        return shard_batches(num_batches, self.rank, self.world_size)

    def owns(self, index: int) -> bool:
        """Whether this process builds item `index` of a cache split over processes (index % world == rank)."""
        return index % self.world_size == self.rank

    def seed(self, seed: int) -> int:
        """`rank_seed(seed, rank)`."""
        return rank_seed(seed, self.rank)

    # -------------------------------------------------------------------------------- collectives --
    def _comm_device(self) -> torch.device:
        """Where small control tensors live: the CPU with a gloo control group, the GPU for NCCL (it only
        moves device tensors)."""
        if self.control is None and tdist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def shutdown(self) -> None:
        """End of a run: wait for every process, then destroy the process groups.  Exiting with live gloo
        groups while a peer is already gone can abort a process ("terminate called without an active
        exception") and turn a finished run into a failed exit code."""
        if not self.enabled or not tdist.is_initialized():
            return
        self.barrier()
        if self.control is not None:
            tdist.destroy_process_group(self.control)
            self.control = None
        tdist.destroy_process_group()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first; the others run it once it has finished (e.g. download or
        build something on disk once, then let the others read it)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its mean over the processes now, with one flat all-reduce per
        device and dtype (a process without a gradient for it counts as zeros; a parameter without a gradient
        in every process keeps `grad = None`).  Call it after the accumulation's last backward and before
        `scaler.unscale_` / clipping (`GradientSync.finish`, train/grad_sync.py; the training loop overlaps the
        same average with the backward through `gradient_sync`)."""
        GradientSync(params, world_size=self.world_size, bucket_cap_mb=0).finish()

    def gradient_sync(self, params: Iterable[torch.nn.Parameter],
                      bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> GradientSync:
        """The per-step gradient average of `params`, all-reduced in buckets of about `bucket_cap_mb` MB
        started from gradient hooks during the last backward of each step (0: one flat all-reduce after the
        backward); a no-op with one process.  Close it (or use it in `with`) to remove the hooks."""
        return GradientSync(params, world_size=self.world_size, bucket_cap_mb=bucket_cap_mb)

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Copy rank 0's parameter values to every process (after building / loading the network: all
        processes must start from the same weights, whatever their random initialisation did)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                buf = p.detach().contiguous()
                tdist.broadcast(buf, src=0)
                if buf.data_ptr() != p.data_ptr():
                    p.copy_(buf)

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the processes (a detached copy; `tensor` itself is unchanged), e.g. the
        micro-batch loss before it is logged, so every process logs and checks the same value."""
        out = tensor.detach().clone()
        if self.enabled:
            tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
            out.div_(self.world_size)
        return out

    def any_true(self, flag: bool) -> bool:
        """True in every process when `flag` is true in any (e.g. a stop signal that reached one process)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def all_true(self, flag: bool) -> bool:
        """True in every process only when `flag` is true in all (e.g. whether to apply an update)."""
        return not self.any_true(not flag)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, in every process (e.g. `capture_rng()`
        of each process for a state the main process writes)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.control)
        return out

    def scatter_objects(self, objs: list[Any] | None) -> Any:
        """Rank 0's `objs[r]` in process r (the other processes pass None)."""
        if not self.enabled:
            if objs is None or len(objs) != 1:
                raise ValueError("scatter_objects: one object per process is needed")
            return objs[0]
        box = [objs if self.is_main else None]
        if self.is_main and (objs is None or len(objs) != self.world_size):
            box = [None]  # the others must not wait forever: everybody raises below
        tdist.broadcast_object_list(box, src=0, group=self.control)
        if box[0] is None:
            raise ValueError(f"scatter_objects: rank 0 must pass {self.world_size} objects")
        return box[0][self.rank]

    # ------------------------------------------------------------------------------------ caching --
    def build_cache(self, build: Callable[[Callable[[int], bool] | None], T], *, to_disk: bool) -> T:
        """Build a cache with several processes: `build(owned)` must build (and write to disk) only the items
        whose index `owned` accepts, and everything for `owned=None`.

        On disk: every process builds its own items (index % world == rank) at once, waits for the others,
        then reads everything with `build(None)` (all entries are found on disk: nothing is built twice, and
        entries are content-addressed files written atomically, so there is no race).  In RAM only (or with
        one process) every process simply builds everything itself.  An error in one process is raised in
        all of them instead of leaving the others waiting."""
        if not self.enabled or not to_disk:
            return build(None)
        error: Exception | None = None
        try:
            build(self.owns)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
        if self.any_true(error is not None):  # also the barrier: every process's share is on disk now
            if error is not None:
                raise error
            raise RuntimeError("building the cache failed in another process (see its error above)")
        return build(None)


# --------------------------------------------------------------------------------- states (per rank) --

def write_rank_rngs(folder: str | Path, states: list[dict]) -> None:
    """Into a state folder being written (save_state's `extra(tmp)`): every process's RNG streams
    (`gather_objects(capture_rng())`) and the number of processes.  Nothing for one process: its
    streams are the state's `rng` files already, and single-process states stay as they were."""
    if len(states) <= 1:
        return
    folder = Path(folder)
    for rank, state in enumerate(states):
        write_nested(folder, RANK_RNG.format(rank=rank), state)
    atomic_write_bytes(json.dumps({"world_size": len(states), "batch_in_epoch": "per process"}).encode("utf-8"),
                       folder / RANKS_FILE)


def saved_world_size(folder: str | Path) -> int:
    """How many processes saved the state in `folder` (1 for a single-process state)."""
    path = Path(folder) / RANKS_FILE
    if not path.is_file():
        return 1
    return int(json.loads(path.read_text(encoding="utf-8"))["world_size"])


def check_state_world(folder: str | Path, world_size: int) -> None:
    """ConfigError unless the state in `folder` was saved by `world_size` processes: the position inside the
    epoch (batches per process), the data shards and every process's random streams depend on it."""
    saved = saved_world_size(folder)
    if saved != world_size:
        raise ConfigError(f"resume: {folder} was saved by {saved} process(es) but this run has {world_size}; "
                          f"resume with the same number of processes (--num_processes {saved}), or start a new "
                          "run from the saved network with network_weights")


def read_rank_rng(folder: str | Path, rank: int, world_size: int) -> dict | None:
    """Process `rank`'s RNG streams from a state saved by `world_size` processes (for `restore_rng`, after
    `load_state` restored rank 0's); None for a single-process state (its `rng` files are the streams)."""
    check_state_world(folder, world_size)
    if world_size == 1:
        return None
    return read_nested(Path(folder), RANK_RNG.format(rank=rank))
