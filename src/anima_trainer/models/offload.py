"""Moving DiT block weights and saved activations off the accelerator while a step runs.

* `BlockSwapper` (kohya's `blocks_to_swap`): the weights of N blocks live in (pinned) CPU memory and are copied
  to the device just before the block runs, on a side CUDA stream, with the next `prefetch` blocks copied while
  the current one computes; after use the device copy is dropped (frozen weights: nothing is copied back).
  Backward needs the weights again (grad-input = grad · W, and checkpointed blocks are recomputed), so a gradient
  hook on every block output brings block i back, and prefetches i-1, just before its backward runs.
  Tensors autograd saves from a swapped block's weights (e.g. Wᵀ for grad-input) are stored as a token and
  resolved to the block's current device copy at backward time, so a non-checkpointed block does not pin its
  device weights for the whole step either.
  Trained blocks of a fine-tune (`updated`: parameters the fused backward pass updates in place, kohya's swap of
  trained blocks): their parameters are updated on the device while the block is resident in backward (each
  parameter's post-accumulate-grad hook steps it, train/fused_backward.py), so such a block is evicted only once
  every one of its trained parameters has had its gradient (and so its update) in this backward, and the updated
  values are then copied back to the host master (device → host, on the side stream on CUDA; a plain copy on
  the CPU).  Only an updated block is copied back, only its trained tensors, and at the end of each backward every
  trained block still resident is evicted too (copied back when updated; the copies waited for), so between steps
  the trained parameters are the host masters, holding the updated weights (after a forward whose backward never
  ran, the trained blocks it left on the device are copied back when next evicted).  A trained parameter whose
  `.data` is replaced from outside (a fine-tune at another strength for a measurement or the preservation loss) is
  used as set: copied to the device from that tensor, and left or put back as set on eviction.  Frozen blocks (and
  LoRA runs) are never copied back.
* `ActivationOffloader` (kohya's `cpu_offload_checkpointing`): the residual stream a checkpointed block keeps
  for its recompute goes to pinned CPU memory with a non-blocking copy on a side stream, and comes back in
  backward (the previous block's input is prefetched while the current block recomputes).

Both are device-agnostic: with device = CPU the "copies" are plain clones, so CPU tests run the same
scheduling, hooks and residency bookkeeping as a GPU run.  Correctness never depends on the prefetch order:
a block or activation that is not on the device when needed is fetched synchronously (counted in `stats`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# Accounting observers (tests/support/ledger.py SavedTensorLedger): the hooks below are the innermost
# saved-tensor hooks inside a block, so an outer ledger would not see what they keep; they report it here instead.
SAVE_OBSERVERS: list = []


def _note(kind: str, t: torch.Tensor) -> None:
    for obs in SAVE_OBSERVERS:
        getattr(obs, kind)(t)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _pin(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A CPU copy of `t` (pinned when asked: async H2D copies need page-locked memory)."""
    cpu = t.detach().to("cpu", copy=True)
    return cpu.pin_memory() if pin else cpu


@dataclass
class SwapStats:
    """Counters of one BlockSwapper (reset with `reset_stats`)."""

    loads: int = 0  # host→device block copies issued
    sync_loads: int = 0  # blocks needed before their prefetch was issued (fetched on the spot)
    evictions: int = 0
    bytes_loaded: int = 0
    max_resident: int = 0  # most swapped blocks on the device at once (active + in flight)
    writebacks: int = 0  # device→host copies of an updated (trained) block's parameters
    events: list[tuple[str, int]] = field(default_factory=list)  # ("load"|"evict"|"write_back", block) when recording


class _ParamToken:
    """What a pack hook stores instead of a swapped block's weight: enough to rebuild the same view later."""

    __slots__ = ("block", "name", "size", "stride", "offset")

    def __init__(self, block: int, name: str, t: torch.Tensor) -> None:
        self.block, self.name = block, name
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class BlockSwapper:
    """Streams the weights of `swapped` blocks between a storage device (CPU) and the compute `device`.

    The module tree and the Parameter objects never change: only each tensor's `.data` is pointed at the
    pinned CPU master (evicted) or at a device copy (resident), so LoRA forward patches, optimizers and state_dict names
    are unaffected.  Call order (AnimaDiT's block loop does it): `begin_forward(training)`, then per block
    `before_block(i)`, the block inside `saving(i)` (or checkpointed, calling `ensure(i)` first), then
    `after_block(i, out)`.  Do not `.to()` the DiT after enabling: the masters would be left behind.
    """

    def __init__(self, blocks: Sequence[nn.Module], swapped: Iterable[int], device: torch.device | str, *,
                 prefetch: int = 1, pin_memory: bool | None = None, record_events: bool = False,
                 updated: Mapping[int, Collection[str]] | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.blocks = list(blocks)
        self.swapped = sorted(set(swapped))
        if any(i < 0 or i >= len(self.blocks) for i in self.swapped):
            raise ValueError(f"swapped block indices {self.swapped} outside 0..{len(self.blocks) - 1}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = prefetch
        cuda = _is_cuda(self.device)
        pin = cuda if pin_memory is None else (pin_memory and torch.cuda.is_available())
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._masters: dict[int, dict[str, torch.Tensor]] = {}
        for i in self.swapped:
            named = {**dict(self.blocks[i].named_parameters()), **dict(self.blocks[i].named_buffers())}
            self._tensors[i] = named
            self._masters[i] = {n: _pin(t, pin) for n, t in named.items()}
            for n, t in named.items():
                t.data = self._masters[i][n]
        self.block_bytes = {i: sum(t.numel() * t.element_size() for t in m.values()) for i, m in self._masters.items()}
        self._copies: dict[int, dict[str, torch.Tensor]] = {}  # loaded (in flight or active) device copies
        self._ready: dict[int, torch.cuda.Event | None] = {}
        self._active: set[int] = set()
        self._storage_ptrs: dict[int, dict[int, str]] = {}  # active block → {storage ptr: tensor name}
        self._pending_free: deque = deque()  # eviction events (CUDA): bounds memory when the host runs ahead
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._compute = None
        self.training = False
        self.stats = SwapStats()
        self.record_events = record_events
        self._is_swapped = set(self.swapped)
        # trained blocks: {block: names of its parameters updated in place in backward}; module docstring
        self.updated = {i: sorted(names) for i, names in (updated or {}).items() if i in self._is_swapped and names}
        self._hooked: set[int] = set()  # trained blocks whose parameters carry the arrival hook
        self._arrived: dict[int, int] = {}  # trained block → parameters whose gradient arrived in this backward
        self._dirty: set[int] = set()  # trained blocks updated on the device since their last copy back
        self._deferred: set[int] = set()  # trained blocks backward is done with, waiting for their updates
        self._end_queued = False
        self._written: list[torch.cuda.Event] = []  # CUDA copies back not yet waited for
        self._outside: dict[int, dict[str, torch.Tensor]] = {}  # loaded block → replacements it was copied from

    # ------------------------------------------------------------------------------------------ queries --
    def resident(self) -> set[int]:
        """Swapped blocks whose device copy exists (active or still being copied)."""
        return set(self._copies)

    def device_bytes(self) -> int:
        """Bytes of swapped-block weights currently held on the device by this swapper."""
        return sum(self.block_bytes[i] for i in self._copies)

    def reset_stats(self) -> None:
        self.stats = SwapStats()

    # ------------------------------------------------------------------------------------- primitives --
    def _stream(self) -> torch.cuda.Stream | None:
        if self._compute is None and self._side is not None:
            self._compute = torch.cuda.current_stream(self.device)
        return self._compute

    def _log(self, what: str, i: int) -> None:
        if self.record_events:
            self.stats.events.append((what, i))

    def load(self, i: int) -> None:
        """Start copying block i to the device (no-op if it is already there or on its way)."""
        if i not in self._is_swapped or i in self._copies:
            return
        sources = self._sources(i)
        if self._side is not None:
            while len(self._pending_free) > 1:  # keep the host at most ~2 blocks ahead of the device
                self._pending_free.popleft().synchronize()
            if i in self._outside:  # a source may be a device tensor the compute stream wrote
                self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                copies = {n: torch.empty_like(m, device=self.device) for n, m in sources.items()}
                for n, m in sources.items():
                    copies[n].copy_(m, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._side)
        else:  # same-device "transfer": a real copy, so the bookkeeping is exercised
            copies = {n: m.to(self.device, copy=True) for n, m in sources.items()}
            ready = None
        self._copies[i], self._ready[i] = copies, ready
        self.stats.loads += 1
        self.stats.bytes_loaded += self.block_bytes[i]
        self.stats.max_resident = max(self.stats.max_resident, len(self._copies))
        self._log("load", i)

    def _sources(self, i: int) -> dict[str, torch.Tensor]:
        """What block i's device copy is made from: its masters, except a trained parameter whose `.data` was
        replaced from outside while the block was evicted (a fine-tune at another strength, networks/
        full_finetune.py `set_multiplier`): that tensor is what the forward must use (remembered in
        `_outside`, put back on eviction)."""
        masters = self._masters[i]
        outside = {n: self._tensors[i][n].data for n in self.updated.get(i, ())
                   if self._tensors[i][n].data_ptr() != masters[n].data_ptr()}
        if not outside:
            return masters
        self._outside[i] = outside
        return {**masters, **outside}

    def ensure(self, i: int) -> None:
        """Make block i's weights usable by the compute stream now (waits for its copy; loads it if needed)."""
        if i not in self._is_swapped or i in self._active:
            return
        if i not in self._copies:
            self.stats.sync_loads += 1
            self.load(i)
        compute = self._stream()
        copies = self._copies[i]
        if compute is not None:
            compute.wait_event(self._ready[i])
            for c in copies.values():
                c.record_stream(compute)  # freeing it later waits for the compute stream's use
        for n, t in self._tensors[i].items():
            t.data = copies[n]
        self._storage_ptrs[i] = {c.untyped_storage().data_ptr(): n for n, c in copies.items()}
        self._active.add(i)

    def evict(self, i: int) -> None:
        """Drop block i's device copy (autograd references, if any, keep their memory until used)."""
        if i not in self._copies:
            return
        dirty = i in self._dirty
        if dirty:
            self._write_back(i)
        outside = self._outside.pop(i, {})
        copies = self._copies[i]
        for n, t in self._tensors[i].items():
            if n in outside or i in self.updated:
                if t.data_ptr() != copies[n].data_ptr():  # replaced from outside while resident: left as set
                    continue
                if not dirty and n in outside:  # the replacement it was loaded from (an update goes to the master)
                    t.data = outside[n]
                    continue
            t.data = self._masters[i][n]
        del self._copies[i], self._ready[i]
        self._storage_ptrs.pop(i, None)
        self._active.discard(i)
        if self._side is not None:
            done = torch.cuda.Event()
            done.record(self._stream())
            self._pending_free.append(done)
        self.stats.evictions += 1
        self._log("evict", i)

    def evict_all(self) -> None:
        for i in list(self._copies):
            self.evict(i)
        self.synchronize()

    def _write_back(self, i: int) -> None:
        """Copy the updated trained parameters of resident block i into its host masters (device → host)."""
        masters, tensors = self._masters[i], self._tensors[i]
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # the updates are computed
            with torch.cuda.stream(self._side):
                for n in self._own_copies(i):
                    masters[n].copy_(tensors[n].data, non_blocking=True)
                    tensors[n].data.record_stream(self._side)  # not freed before the copy has read it
                done = torch.cuda.Event()
                done.record(self._side)
            self._written.append(done)
        else:
            for n in self._own_copies(i):
                masters[n].copy_(tensors[n].data)
        self._dirty.discard(i)
        self.stats.writebacks += 1
        self._log("write_back", i)

    def _own_copies(self, i: int) -> list[str]:
        """Block i's trained parameters that point at this swapper's device copy (not replaced from outside)."""
        copies, tensors = self._copies[i], self._tensors[i]
        return [n for n in self.updated[i] if tensors[n].data_ptr() == copies[n].data_ptr()]

    def synchronize(self) -> None:
        """Wait for the copies back issued so far (the host masters are then readable on the host)."""
        while self._written:
            self._written.pop().synchronize()

    # ------------------------------------------------------------------------------------ scheduling --
    def _prefetch_after(self, i: int, step: int) -> None:
        """Issue loads for the next `prefetch` swapped blocks in execution order (step +1 forward, -1 backward)."""
        j, issued = i + step, 0
        while 0 <= j < len(self.blocks) and issued < self.prefetch:
            if j in self._is_swapped:
                self.load(j)
                issued += 1
            j += step

    def _keep_for_backward(self) -> set[int]:
        """The last swapped blocks, which backward needs first: they stay resident at the end of forward."""
        return set(self.swapped[-(self.prefetch + 1):]) if self.training else set()

    def begin_forward(self, training: bool) -> None:
        """Start of a DiT forward: evict leftovers the schedule does not want, prefetch the first blocks."""
        self.training = training
        self._compute = torch.cuda.current_stream(self.device) if self._side is not None else None
        if self.updated:  # trained blocks left on the device by a forward whose backward never ran (a skipped
            # step): what wrote their parameters in place since (the EMA's swap) is kept by copying them back
            self._dirty |= set(self._copies) & set(self.updated)
        if training and self.updated:
            self._hook_updated()
            self._arrived = dict.fromkeys(self.updated, 0)
            self._deferred.clear()
        wanted = set(self.swapped[: self.prefetch + 1])
        for i in list(self._copies):
            if i not in wanted:
                self.evict(i)
        for i in self.swapped[: self.prefetch + 1]:
            self.load(i)

    def before_block(self, i: int) -> None:
        self._prefetch_after(i, +1)
        self.ensure(i)

    def after_block(self, i: int, out: torch.Tensor) -> None:
        """Evict block i (unless backward needs it first) and hook its output's gradient for backward."""
        if i in self._is_swapped and i not in self._keep_for_backward():
            self.evict(i)
        if self.training and out.requires_grad:
            out.register_hook(lambda grad, i=i: self._backward_reached(i))

    def _backward_reached(self, i: int) -> None:
        """Gradient of block i's output is ready: block i+1's backward is done, block i's starts now."""
        if self.updated and not self._end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._end_queued = True
        if i + 1 in self._is_swapped:
            self._release(i + 1)
        for j in sorted(self._deferred):
            self._release(j)
        self.ensure(i)
        self._prefetch_after(i, -1)

    # ------------------------------------------------------------------------------ trained blocks --
    def _hook_updated(self) -> None:
        """Count each trained parameter's gradient arrival (its fused update runs in the same hook chain, so
        at the next scheduling point it is done).  Hooked at the first training forward: a fine-tune marks its
        parameters trainable after the swapper is built; a listed parameter left frozen (a component at lr 0) is
        never updated, so it is dropped from the list (a block left with none swaps as a frozen one)."""
        for i in list(self.updated):
            if i in self._hooked:
                continue
            names = [n for n in self.updated[i] if self._tensors[i][n].requires_grad]
            for n in names:
                self._tensors[i][n].register_post_accumulate_grad_hook(lambda p, i=i: self._gradient_arrived(i))
            self._hooked.add(i)
            if names:
                self.updated[i] = names
            else:
                del self.updated[i]

    def _gradient_arrived(self, i: int) -> None:
        self._arrived[i] = self._arrived.get(i, 0) + 1
        self._dirty.add(i)

    def _release(self, i: int) -> None:
        """Evict block i now that backward is done with it; a trained block only once all its parameters
        have been updated (until then it stays resident, deferred)."""
        if i in self.updated and self._arrived.get(i, 0) < len(self.updated[i]):
            self._deferred.add(i)
            return
        self._deferred.discard(i)
        if i in self.updated:
            self._check_updated(i)
        self.evict(i)

    def _check_updated(self, i: int) -> None:
        stale = [n for n in self.updated[i] if self._tensors[i][n].grad is not None]
        if stale:
            raise RuntimeError(f"block {i} swaps while trained, but its parameter {stale[0]} still holds its "
                               "gradient after backward passed it: swapping a trained block needs its parameters "
                               "updated during backward (fused_backward_pass)")

    def _end_backward(self) -> None:
        """After the whole backward: every trained block still on the device is evicted (copied back when
        updated), so between steps their parameters are the host masters, and whatever writes them in place
        (a resume, the EMA's swap for a save or preview) writes what the next load reads."""
        self._end_queued = False
        self._deferred.clear()
        for i in sorted(set(self._copies) & set(self.updated)):
            self._check_updated(i)
            self.evict(i)
        self.synchronize()

    # ------------------------------------------------------------------------------ saved tensors --
    def _pack(self, i: int, t: torch.Tensor) -> object:
        names = self._storage_ptrs.get(i)
        if names and t.device == self.device and not t.requires_grad:
            name = names.get(t.untyped_storage().data_ptr())
            if name is not None:
                return _ParamToken(i, name, t)
        _note("note_saved", t)
        return t

    def _unpack(self, packed: object) -> torch.Tensor:
        if not isinstance(packed, _ParamToken):
            return packed
        self.ensure(packed.block)
        base = self._tensors[packed.block][packed.name]
        return base.detach().as_strided(packed.size, packed.stride, packed.offset)

    @contextmanager
    def saving(self, i: int) -> Iterator[None]:
        """Run block i's (non-checkpointed) forward inside this: its weights are saved as tokens, not tensors."""
        if i not in self._is_swapped or not torch.is_grad_enabled():
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(i, t), self._unpack):
            yield


class _Offloaded:
    """A saved tensor parked on the storage device, with its own prefetched device copy when one exists."""

    __slots__ = ("stored", "device", "copied", "prefetched", "prev")

    def __init__(self, stored: torch.Tensor, device: torch.device, copied: torch.cuda.Event | None,
                 prev: _Offloaded | None) -> None:
        self.stored, self.device, self.copied, self.prev = stored, device, copied, prev
        self.prefetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None


@dataclass
class OffloadStats:
    packed: int = 0  # tensors moved to the storage device
    bytes: int = 0
    prefetched: int = 0  # brought back ahead of use
    sync_fetches: int = 0  # brought back on demand


class ActivationOffloader:
    """Keeps selected saved activations on `storage_device` (pinned CPU) instead of the compute device.

    `hooks(match)` returns a saved-tensor hooks context that offloads the tensor `match` (the residual stream a
    checkpointed block saves as its input) and leaves every other saved tensor alone.  Unpacking entry k
    also starts bringing back entry k-1 (the previous block's input, needed next in backward).
    """

    def __init__(self, device: torch.device | str, storage_device: torch.device | str = "cpu", *,
                 pin_memory: bool | None = None) -> None:
        self.device = torch.device(device)
        self.storage_device = torch.device(storage_device)
        cuda = _is_cuda(self.device)
        self.pin = (cuda and self.storage_device.type == "cpu") if pin_memory is None else pin_memory
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._last: _Offloaded | None = None
        self.stats = OffloadStats()

    def begin_forward(self) -> None:
        self._last = None

    def _to_storage(self, t: torch.Tensor) -> _Offloaded:
        if self._side is not None:
            compute = torch.cuda.current_stream(self.device)
            stored = torch.empty(t.shape, dtype=t.dtype, device=self.storage_device, pin_memory=self.pin)
            self._side.wait_stream(compute)  # t is computed
            with torch.cuda.stream(self._side):
                stored.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._side)
            t.record_stream(self._side)  # t's memory is not reused before the copy has read it
        else:
            stored, done = t.detach().to(self.storage_device, copy=True), None
        entry = _Offloaded(stored, t.device, done, self._last)
        self._last = entry
        self.stats.packed += 1
        self.stats.bytes += t.numel() * t.element_size()
        _note("note_offloaded", stored)
        return entry

    def _fetch(self, entry: _Offloaded) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self._side is None:
            return entry.stored.to(entry.device, copy=True), None
        with torch.cuda.stream(self._side):
            out = entry.stored.to(entry.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._side)
        return out, ready

    def _unpack(self, packed: object) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.prefetched is not None:
            out, ready = packed.prefetched
            packed.prefetched = None
            self.stats.prefetched += 1
        else:
            out, ready = self._fetch(packed)
            self.stats.sync_fetches += 1
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            out.record_stream(compute)
        prev, packed.prev = packed.prev, None  # no chain keeps earlier CPU copies alive
        if prev is not None and prev.prefetched is None:
            prev.prefetched = self._fetch(prev)
        return out

    def hooks(self, match: torch.Tensor) -> torch.autograd.graph.saved_tensors_hooks:
        """Offload saves of the tensor `match` (same storage and shape) made inside the context."""
        ptr, shape = match.untyped_storage().data_ptr(), match.shape  # no reference: autograd keeps the hooks

        def pack(t: torch.Tensor) -> object:
            if t.shape == shape and t.untyped_storage().data_ptr() == ptr:
                return self._to_storage(t)
            _note("note_saved", t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, self._unpack)


def swap_indices(num_blocks: int, blocks_to_swap: int, swappable: Iterable[int] | None = None) -> list[int]:
    """kohya's choice: the last N blocks are swapped (backward starts with them, so they stay warm).
    `swappable`: the blocks that may swap (a fine-tune without the fused backward pass: those holding no trained
    parameter, since their updates happen after backward); the last N of them.  None: every block."""
    pool = list(range(num_blocks)) if swappable is None else sorted(set(swappable))
    if not 0 <= blocks_to_swap <= len(pool):
        if swappable is None:
            raise ValueError(f"blocks_to_swap = {blocks_to_swap}: this DiT has {num_blocks} blocks (0..{num_blocks})")
        raise ValueError(f"blocks_to_swap = {blocks_to_swap}: only {len(pool)} of this DiT's {num_blocks} blocks may "
                         "swap (the others hold trained parameters)")
    return pool[len(pool) - blocks_to_swap:]


def move_except_blocks(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """Move `model` to `device` except the modules in `blocks`, through Module.to() wherever a subtree holds
    none of them (so modules that re-pack their weights on `.to()`, e.g. fused q/k/v, still do)."""
    skip = {id(b) for b in blocks}
    if id(model) in skip:
        return
    if not any(id(m) in skip for m in model.modules()):
        model.to(device)
        return
    for t in [*model._parameters.values(), *model._buffers.values()]:
        if t is not None and t.device != device:
            t.data = t.data.to(device)
    for child in model.children():
        move_except_blocks(child, blocks, device)
