"""A measuring tool, not product code: the bytes a DiT forward leaves for backward (SavedTensorLedger).

Used by the block runner, offload and memory-estimator tests; the estimator's activation constants
(train/memory_estimate.py ACTIVATION_UNITS) were measured with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from anima_trainer.models.block_runner import SAC_OBSERVERS
from anima_trainer.models.offload import SAVE_OBSERVERS


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


class SavedTensorLedger:
    """Counts the bytes a forward leaves for backward, per device, each storage once.

    Seen: tensors autograd saves (everything outside checkpointed blocks, the inputs those blocks keep, and
    what the swapper's and offloader's hooks keep as they are), the outputs selective checkpointing caches, and
    the copies an ActivationOffloader parks on its storage device (`offloaded`, not part of `total`).
    Parameters/buffers of `exclude` modules and `exclude_tensors` (e.g. cached RoPE tables) are not counted."""

    def __init__(self, *exclude: nn.Module, exclude_tensors: Iterable[torch.Tensor] = ()) -> None:
        self._skip = {_storage_key(t) for m in exclude for t in [*m.parameters(), *m.buffers()]}
        self._skip |= {_storage_key(t) for t in exclude_tensors}
        self.saved: dict[tuple[str, int], int] = {}
        self.offloaded: dict[tuple[str, int], int] = {}
        self._sac: list[Any] = []

    def note_saved(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in self._skip:
            self.saved[key] = t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.note_saved(t)
        return t

    def note_offloaded(self, t: torch.Tensor) -> None:
        self.offloaded[_storage_key(t)] = t.untyped_storage().nbytes()

    def __enter__(self) -> SavedTensorLedger:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        SAC_OBSERVERS.append(self._sac.append)
        SAVE_OBSERVERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        SAC_OBSERVERS.remove(self._sac.append)
        SAVE_OBSERVERS.remove(self)

    def saved_bytes(self, device: str | None = None) -> int:
        """Bytes autograd keeps (on `device`, e.g. "cpu" or "cuda:0", when given)."""
        return sum(b for (d, _), b in self.saved.items() if device is None or d == device)

    def selective_bytes(self) -> int:
        """Bytes held by selective-checkpoint caches (read from the caching mode's storage, each storage once)."""
        seen: dict[tuple[str, int], int] = {}
        for mode in self._sac:
            for entries in getattr(mode, "storage", {}).values():
                for leaf in torch.utils._pytree.tree_leaves(entries):
                    t = getattr(leaf, "val", leaf)
                    if isinstance(t, torch.Tensor):
                        key = _storage_key(t)
                        if key not in self._skip:
                            seen[key] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def summary(self) -> dict[str, int]:
        """{"saved", "selective", "offloaded", "total" (saved + selective: what stays on the compute side)}."""
        saved, selective = sum(self.saved.values()), self.selective_bytes()
        return {"saved": saved, "selective": selective, "offloaded": sum(self.offloaded.values()),
                "total": saved + selective}
