"""The held-out images (validation_split) as the validation loss needs them: fixed, not augmented.

`ValidationSet.from_dataset(dataset)` gives the held-out items (None without validation_split).  Unlike the training
data nothing here depends on the epoch or on chance, so that a loss measured on it at step 100 and at
step 5000 (or in two runs over the same data) compares the same thing:
  * captions: each item's caption is processed once with the random parts switched off (no shuffle, no
    tag / caption dropout, no token warmup); prefix / suffix, keep-token markers and secondary separators
    apply as in training; a wildcard or multi-line caption gets one fixed choice (seeded per item);
  * pixels: centre crop, no flip, no colour jitter (`AnimaDataset.load_batch` without an epoch); the
    alpha mask of alpha_mask subsets is kept (it is part of the loss);
  * batches: per [[datasets]] entry, per bucket (sorted), items in scan order, cut into that dataset's
    batch_size;
  * noise: `noise_seed(i)` is a per-item seed from the dataset's validation_seed (else the dataset seed)
    and the item's identity, so the noise does not depend on batch composition or max_validation_steps.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from .captions import process_caption
from .dataset import AnimaDataset, Batch, ImageItem
from .params import CaptionParams, DatasetParams


def fixed_caption_params(params: CaptionParams) -> CaptionParams:
    """`params` with every random or step-dependent option off (the deterministic parts stay)."""
    return replace(params, shuffle_caption=False, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                   caption_tag_dropout_rate=0.0, token_warmup_step=0.0)


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


class ValidationSet:
    """Held-out items with fixed captions, pixels, batches and per-item noise seeds."""

    def __init__(self, params: list[DatasetParams], items: list[ImageItem], seed: int = 0) -> None:
        if not items:
            raise ValueError("a ValidationSet needs at least one held-out item")
        self.params = params
        self.items = list(items)
        self.seed = seed
        self._data = AnimaDataset(params, self.items, seed=seed)
        self.captions = [self._fixed_caption(i) for i in range(len(self.items))]
        self._plan = self._make_plan()

    @classmethod
    def from_dataset(cls, dataset: AnimaDataset) -> ValidationSet | None:
        """The held-out items of a built dataset (`build_dataset`), or None when nothing is held out."""
        if not dataset.validation_items:
            return None
        return cls(dataset.params, dataset.validation_items, seed=dataset.seed)

    def validation_seed(self, index: int) -> int:
        """The seed of item `index`'s dataset: its validation_seed, else the dataset (training) seed."""
        s = self.params[self.items[index].dataset_index].validation_seed
        return self.seed if s is None else s

    def _identity(self, index: int) -> str:
        item = self.items[index]  # the file name, not the path: stable when the folder moves
        return f"{item.dataset_index}/{item.subset_index}/{item.path.name}"

    def _fixed_caption(self, index: int) -> str:
        sub = self._data.subset_params(index)
        rng = random.Random(f"anima-trainer/validation-caption/{self.validation_seed(index)}/{self._identity(index)}")
        return process_caption(self.items[index].caption, fixed_caption_params(sub.caption), rng=rng, epoch=0)

    def noise_seed(self, index: int) -> int:
        """Seed of item `index`'s fixed validation noise (64 bits, from validation_seed and the item)."""
        return _digest(f"anima-trainer/validation-noise/{self.validation_seed(index)}/{self._identity(index)}")

    def _make_plan(self) -> list[list[int]]:
        groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault((item.dataset_index, item.bucket), []).append(i)
        plan = []
        for (d, _), members in sorted(groups.items()):
            size = self.params[d].batch_size
            plan.extend(members[k: k + size] for k in range(0, len(members), size))
        return plan

    def __len__(self) -> int:
        """Number of validation batches."""
        return len(self._plan)

    @property
    def num_images(self) -> int:
        return len(self.items)

    def batches(self) -> list[list[int]]:
        """Item indices of every validation batch, always the same."""
        return [list(b) for b in self._plan]

    def load_batch(self, indices: list[int]) -> Batch:
        """Pixels (centre crop, no flip / jitter), alpha masks and fixed captions of `indices`."""
        return self._data.load_batch(indices, captions=[self.captions[i] for i in indices])
