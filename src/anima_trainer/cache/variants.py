"""Caption randomness with a text cache: K pre-encoded variants per caption instead of one stale encoding.

kohya either refuses `shuffle_caption` + cached text outputs or silently encodes the raw caption (dropping
prefix/suffix and `|||` rules).  We process each caption K times with independent seeds (shuffle, tag
dropout, wildcards, keep_tokens all applied), cache those K encodings, and draw one per sample and epoch.
Caption dropout is decided per sample at training time exactly as without a cache and gives the
empty-prompt conditioning.  Token warmup depends on the step and cannot be pre-encoded.
"""

from __future__ import annotations

import random
from dataclasses import replace

from anima_trainer.data.captions import process_caption

DEFAULT_VARIANTS = 8


class CaptionVariants:
    """For every dataset item, K processed captions (no dropout); `pick` chooses one per sample."""

    def __init__(self, dataset, k: int = DEFAULT_VARIANTS) -> None:
        self.dataset, self.k = dataset, k
        self.table: dict[int, list[str]] = {}
        for index, item in enumerate(dataset.items):
            params = dataset.caption_params(index)
            if params.token_warmup_step:
                raise ValueError("token_warmup_step changes captions every step and cannot be pre-encoded: "
                                 "turn cache_text_encoder_outputs off for this dataset")
            params = replace(params, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
            self.table[index] = [
                process_caption(item.caption, params, epoch=0,
                                rng=random.Random(f"anima-trainer/variants/{dataset.seed}/{index}/{v}"))
                for v in range(k)]

    def captions(self) -> set[str]:
        """Every caption to encode: all variants plus the empty prompt (caption dropout)."""
        return {c for rows in self.table.values() for c in rows} | {""}

    def pick(self, epoch: int, plan: list[list[int]]) -> list[list[str]]:
        """Per batch of `plan`: "" where the normal processing drops the caption, else a seeded variant."""
        processed = self.dataset.epoch_captions(epoch, plan)
        seen: dict[int, int] = {}
        out = []
        for indices, captions in zip(plan, processed, strict=True):
            row = []
            for i, caption in zip(indices, captions, strict=True):
                occurrence = seen.get(i, 0)
                seen[i] = occurrence + 1
                if caption == "":
                    row.append("")
                    continue
                rng = random.Random(f"anima-trainer/variant-pick/{self.dataset.seed}/{epoch}/{i}/{occurrence}")
                row.append(self.table[i][rng.randrange(self.k)])
            out.append(row)
        return out
