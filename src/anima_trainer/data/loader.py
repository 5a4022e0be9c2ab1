"""Image batches decoded in worker processes (kohya's `max_data_loader_n_workers`): for a whole run
(`run_batches`), and for the latent cache (`chunk_batches`), so the VAE encodes while the next images decode.

Batch g of the run is batch g mod n of epoch g div n (n = batches per epoch, the same every epoch).  Each
worker recomputes an epoch's plan, captions, flips and crops itself — they are deterministic in
(seed, epoch) — so batches are identical to `ds.epoch(e)` whatever the worker count, and the workers stay
alive across epochs (no start-up cost per epoch).

An image that cannot be read any more during the run (deleted, moved, permissions changed) stops the run with one
line naming it, in the training process, whatever the worker count (docs/troubleshooting.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from anima_trainer.data.images import ImageReadError

Captions = Callable[[int, list[list[int]]], list[list[str]]]


class _Failed:
    """An ImageReadError raised in a worker, carried to the training process as a value.  Raised as is, torch
    would re-create it there with the worker's whole traceback as its message; the user gets the one line."""

    def __init__(self, message: str) -> None:
        self.message = message


def _carried(load: Callable[[], object]) -> object:
    """`load()`; an ImageReadError (e.g. an image deleted during the run) raised in a worker comes back as a
    `_Failed` value, re-raised with its one line by `_reraise_failures`; in this process it is raised as is."""
    try:
        return load()
    except ImageReadError as e:
        if torch.utils.data.get_worker_info() is None:
            raise
        return _Failed(str(e))


def _reraise_failures(batches: Iterator) -> Iterator:
    for batch in batches:
        if isinstance(batch, _Failed):
            raise ImageReadError(batch.message)
        yield batch


class RunBatches(torch.utils.data.Dataset):
    """Map-style view of every batch of `epochs` epochs from run batch `start` on (a resume starts mid-run)."""

    def __init__(self, dataset, epochs: int, captions: Captions | None = None, start: int = 0,
                 shard: list[int] | None = None) -> None:
        self.dataset, self.epochs, self.start = dataset, epochs, start
        self.captions = captions  # e.g. cached caption variants' `pick`; default: the dataset's own processing
        self.shard = list(shard) if shard is not None else list(range(len(dataset)))  # this process's batches
        self.per_epoch = len(self.shard)
        self._epoch: tuple[int, tuple] | None = None

    def __len__(self) -> int:
        return max(0, self.epochs * self.per_epoch - self.start)

    def _arguments(self, epoch: int) -> tuple:
        if self._epoch is None or self._epoch[0] != epoch:
            ds = self.dataset
            plan = ds.batch_plan(epoch)
            captions = self.captions(epoch, plan) if self.captions else ds.epoch_captions(epoch, plan)
            self._epoch = (epoch, (plan, captions, ds.epoch_flips(epoch, plan), ds.plan_occurrences(plan)))
        return self._epoch[1]

    def __getitem__(self, g: int):
        epoch, j = divmod(g + self.start, self.per_epoch)
        k = self.shard[j]
        plan, captions, flips, occurrences = self._arguments(epoch)
        return _carried(lambda: self.dataset.load_batch(plan[k], epoch=epoch, captions=captions[k], flips=flips[k],
                                                        occurrences=occurrences[k]))


def run_batches(dataset, epochs: int, workers: int, captions: Captions | None = None, start: int = 0,
                shard: list[int] | None = None) -> Iterator:
    """Iterator over this process's batches (`shard`: positions in each epoch's plan; default all) from run
    batch `start` on, decoded by `workers` processes (0 = in this process)."""
    source = RunBatches(dataset, epochs, captions, start, shard)
    workers = min(workers, os.cpu_count() or 1)
    if workers <= 0:
        return (source[g] for g in range(len(source)))
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=True,
                        prefetch_factor=2)
    return _reraise_failures(iter(loader))


class ChunkBatches(torch.utils.data.Dataset):
    """Map-style view of fixed batches, each (item indices, flips), loaded without an epoch (centre crop, no
    jitter): exactly `dataset.load_batch(indices, flips=flips)`, the pixels a latent cache encodes."""

    def __init__(self, dataset, chunks: Sequence[tuple[list[int], list[bool]]]) -> None:
        self.dataset, self.chunks = dataset, list(chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        indices, flips = self.chunks[k]
        return _carried(lambda: self.dataset.load_batch(indices, flips=flips))


def chunk_batches(dataset, chunks: Sequence[tuple[list[int], list[bool]]], workers: int) -> Iterator:
    """The batches of `chunks` in order, decoded `workers` processes ahead (0 = in this process, one at a time).

    A generator: closing it (`contextlib.closing`, or its end) stops the worker processes at once, also when
    the consumer raised (an encoder error, Ctrl-C), so a failed cache build leaves no process behind."""
    source = ChunkBatches(dataset, chunks)
    workers = min(workers, os.cpu_count() or 1, len(source))
    if workers <= 0:
        for k in range(len(source)):
            yield source[k]
        return
    batches = iter(DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2))
    try:
        yield from _reraise_failures(batches)
    finally:
        # what the iterator's __del__ would do, but now rather than whenever the last reference goes
        batches._shutdown_workers()
