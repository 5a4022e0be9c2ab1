"""Scanning a dataset config into items: image folders and metadata files, captions, bad-data report,
validation split and regularisation balancing (`build_dataset`).  The item semantics and what happens to
each kind of bad file are described in dataset.py's module docstring.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path

from anima_trainer.fileio import atomic_write_bytes

from .buckets import BucketSelector
from .captions import captions_for_images, missing_captions_error
from .config import MAX_CAPTION_BYTES, MAX_EPOCH_ITEMS, DatasetConfig, DatasetConfigError, load_dataset_config
from .params import DatasetParams, SubsetParams, resolve_datasets
from .images import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageRejected,
    pick_duplicate_stems,
    probe_image,
    scan_folder,
)
from .dataset import AnimaDataset, ImageItem
from .kohya_summary import summarize_datasets
from .metadata import MetadataEntry, read_metadata, resolve_metadata_subset
from .textfiles import collect_decode_notes

log = logging.getLogger(__name__)


def _resolve_image_dir(sub: SubsetParams, source_dir: Path | None) -> Path:
    """kohya resolves relative paths against the working directory; we also accept the config's folder."""
    if sub.image_dir.is_dir():
        return sub.image_dir
    tried = [sub.image_dir.absolute()]
    if not sub.image_dir.is_absolute() and source_dir is not None:
        alt = source_dir / sub.image_dir
        if alt.is_dir():
            return alt
        tried.append(alt)
    raise DatasetConfigError(
        f"{sub.where}: image_dir {sub.image_dir} is not a folder (looked for {' and '.join(map(str, tried))})"
    )


# Upscaling beyond this factor (per side) is noted in the start-up report (kohya upscales silently).
UPSCALE_NOTE_FACTOR = 2.0
# Skip an image whose cover-resize would hold more than this many times its bucket's pixels.
MAX_COVER_FACTOR = 16


class _ScanReport:
    """Skips and notices collected over all datasets; each (path, message) once, in discovery order."""

    def __init__(self) -> None:
        self.skipped: dict[tuple[Path, str], None] = {}
        self.notices: dict[tuple[Path, str], None] = {}
        self.probes: dict[tuple[Path, bool], ImageInfo | ImageRejected] = {}  # shared by datasets
        self.uncaptioned: list[tuple[Path, str]] = []  # (image, caption used) without a caption file
        self.caption_extensions: dict[Path, str] = {}  # of those images (for the strict_captions error)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[(path, reason)] = None

    def note(self, path: Path, message: str) -> None:
        self.notices[(path, message)] = None

    def probe(self, path: Path, full: bool) -> ImageInfo | ImageRejected:
        key = (path, full)
        if key not in self.probes:
            try:
                self.probes[key] = probe_image(path, full=full)
            except ImageRejected as e:
                self.probes[key] = e
        return self.probes[key]


def _summarize(entries: list[tuple[Path, str]], limit: int = 5) -> str:
    """'3 x empty file (0 bytes): a.png, b.png, c.png; 1 x symlink loop: x.png' style text."""
    by_reason: dict[str, list[Path]] = {}
    for path, reason in entries:
        key = reason.split(" (", 1)[0].split(":", 1)[0]  # group by the reason's category
        by_reason.setdefault(key, []).append(path)
    parts = []
    for reason, paths in by_reason.items():
        shown = ", ".join(str(p) for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit
                                                             else "")
        parts.append(f"{len(paths)} x {reason}: {shown}")
    return "; ".join(parts)


SKIP_RESOLUTION_REASON = "below skip_image_resolution"


def _resolve_file(path: Path, source_dir: Path | None, what: str, where: str) -> Path:
    """A file named in the config: as written (cwd), else relative to the config's folder."""
    if path.is_file():
        return path
    tried = [path.absolute()]
    if not path.is_absolute() and source_dir is not None:
        if (source_dir / path).is_file():
            return source_dir / path
        tried.append(source_dir / path)
    raise DatasetConfigError(f"{where}: {what} {path} is not a file (looked for {' and '.join(map(str, tried))})")


def _metadata_subset(sub: SubsetParams, source_dir: Path | None
                     ) -> tuple[dict[Path, MetadataEntry], list[tuple[Path, str]], str]:
    """(image path -> entry, rejected, description) of a metadata_file subset (metadata.py)."""
    metadata_file = _resolve_file(sub.metadata_file, source_dir, "metadata_file", sub.where)
    image_dir = _resolve_image_dir(sub, source_dir) if sub.image_dir is not None else None
    entries = read_metadata(metadata_file, separator=sub.caption.caption_separator,
                            enable_wildcard=sub.caption.enable_wildcard)
    if not entries:
        raise DatasetConfigError(f"{sub.where}: metadata_file {metadata_file} lists no images")
    meta: dict[Path, MetadataEntry] = {}
    rejected: list[tuple[Path, str]] = []
    for path, entry in resolve_metadata_subset(entries, image_dir, metadata_file, sub.where):
        if path in meta:
            reason = (f"duplicate entry: {entry.key!r} ({entry.where}) is the same file as {meta[path].key!r} "
                      f"({meta[path].where}), which is used")
            rejected.append((path, reason))
        else:
            meta[path] = entry
    return meta, rejected, f"metadata_file {metadata_file}"


def validation_rank(seed: int, item: ImageItem) -> tuple[str, str]:
    """Sort key of the held-out choice: a hash of (seed, file name), the full path only breaking ties.  The
    name, not the path, so that the split survives moving or copying the dataset folder."""
    return hashlib.sha256(f"anima-trainer/validation/{seed}/{item.path.name}".encode()).hexdigest(), str(item.path)


def split_validation(params: list[DatasetParams], items: list[ImageItem], seed: int = 0
                     ) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, validation items), both in scan order, by each dataset's validation_split (kohya:
    per subset; reg subsets are never split: they are not the distribution being learnt).  Per subset,
    floor(n * validation_split) of its n usable images are held out (at most n - 1): those ranked first by
    `validation_rank` with the dataset's validation_seed (else `seed`).  So the split depends on neither scan
    order nor folder location, adding images moves at most as many as were added, and the same image_dir in
    several [[datasets]] (multi-resolution) holds out the same images.  A dataset whose non-zero split holds
    out no image at all is an error (the user asked for validation and would silently get none)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault((item.dataset_index, item.subset_index), []).append(k)
    held: set[int] = set()
    sizes: dict[int, list[int]] = {}  # dataset -> image counts of its split subsets
    for (d, s), members in groups.items():
        p, sub = params[d], params[d].subsets[s]
        if p.validation_split <= 0 or sub.is_reg:
            continue
        sizes.setdefault(d, []).append(len(members))
        n_val = min(math.floor(len(members) * p.validation_split + 1e-9), len(members) - 1)
        if n_val <= 0:
            log.warning("%s: validation_split %g of %d image(s) holds out none", sub.where, p.validation_split,
                        len(members))
            continue
        vseed = p.validation_seed if p.validation_seed is not None else seed
        held.update(sorted(members, key=lambda k, vseed=vseed: validation_rank(vseed, items[k]))[:n_val])
        log.info("%s: %d of %d image(s) held out for validation", sub.where, n_val, len(members))
    for d, counts in sizes.items():
        if not any(items[k].dataset_index == d for k in held):
            p = params[d]
            fix = (f"use validation_split >= {math.ceil(1000 / max(counts)) / 1000:g} there" if max(counts) > 1
                   else "a subset needs at least 2 images to hold one out")
            raise DatasetConfigError(
                f"{p.where}: validation_split {p.validation_split:g} holds out no image (floor(n x split) per "
                f"subset, n = {', '.join(map(str, counts))} non-reg image(s)); {fix}, or set validation_split = 0 "
                f"for this dataset"
            )
    return ([item for k, item in enumerate(items) if k not in held],
            [item for k, item in enumerate(items) if k in held])


def _mask_images(sub: SubsetParams, kept: list[Path], infos: dict[Path, ImageInfo], candidates: list[Path],
                 source_dir: Path | None) -> dict[Path, Path]:
    """image -> its loss-mask image in the subset's conditioning_data_dir (kohya: same file stem, any image
    extension, same size as the image).  Every missing, unreadable or wrongly sized mask is reported at once."""
    if sub.conditioning_data_dir is None:
        return {}
    folder = sub.conditioning_data_dir
    if not folder.is_dir() and not folder.is_absolute() and source_dir is not None and (source_dir / folder).is_dir():
        folder = source_dir / folder  # as image_dir: the working directory first, then the config's folder
    if not folder.is_dir():
        raise DatasetConfigError(f"{sub.where}: conditioning_data_dir {sub.conditioning_data_dir} is not a folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(scan_folder(folder)[0]):
        by_stem.setdefault(path.stem, path)
    found, problems = {}, []
    for image in kept:
        mask = by_stem.get(image.stem)
        if mask is None:
            problems.append(f"{image.name}: no mask {image.stem}.* ")
            continue
        try:
            size = probe_image(mask).size
        except ImageRejected as e:
            problems.append(f"{mask}: {e}")
            continue
        if size != infos[image].size:
            problems.append(f"{mask.name} is {size[0]}x{size[1]} but {image.name} is "
                            f"{infos[image].size[0]}x{infos[image].size[1]}")
            continue
        found[image] = mask
    if problems:
        raise DatasetConfigError(f"{sub.where}: conditioning_data_dir {folder}: {len(problems)} image(s) without a "
                                 f"usable loss mask (a mask is an image with the same file stem and the same size, "
                                 f"as in kohya): " + "; ".join(p.strip() for p in problems))
    extra = sorted(set(by_stem) - {c.stem for c in candidates})
    if extra:
        log.warning("%s: %d mask(s) in %s match no image and are not used: %s", sub.where, len(extra), folder,
                    ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
    return found


def _scan_dataset(i: int, p: DatasetParams, source_dir: Path | None, report: _ScanReport,
                  verify_images: bool) -> list[ImageItem]:
    if p.enable_bucket:
        selector = BucketSelector(p.resolution, p.min_bucket_reso, p.max_bucket_reso, p.bucket_reso_steps,
                                  no_upscale=p.bucket_no_upscale, free_fit=p.bucket_free_fit)
    else:
        selector = BucketSelector.fixed(p.resolution)
    items = []
    skip_area = p.skip_image_resolution[0] * p.skip_image_resolution[1] if p.skip_image_resolution else 0
    for j, sub in enumerate(p.subsets):
        meta: dict[Path, MetadataEntry] | None = None  # fine-tuning style subset: path -> metadata entry
        if sub.metadata_file is not None:
            meta, rejected, source = _metadata_subset(sub, source_dir)
            candidates = list(meta)
        else:
            folder = _resolve_image_dir(sub, source_dir)
            source = f"image_dir {folder}"
            candidates, rejected = scan_folder(folder)
            if not candidates and not rejected:
                raise DatasetConfigError(f"{sub.where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
        usable: list[Path] = []
        infos: dict[Path, ImageInfo] = {}
        for path in candidates:
            probed = report.probe(path, verify_images)
            if isinstance(probed, ImageRejected):
                rejected.append((path, probed.reason))
            else:
                infos[path] = probed
                usable.append(path)
        if meta is None:  # caption files: one image per stem (metadata entries have their own captions)
            usable, duplicates = pick_duplicate_stems(usable)
            rejected.extend(duplicates)
        # bucket assignment before captions, so that skipped images need no caption
        choices = {}
        for path in usable:
            size = infos[path].size
            if p.skip_image_resolution is not None and size[0] * size[1] <= skip_area:
                sw, sh = p.skip_image_resolution
                reason = f"{SKIP_RESOLUTION_REASON}: {size[0]}x{size[1]} has at most the {sw}x{sh} area of {p.where}"
                rejected.append((path, reason))
                continue
            if meta is not None and meta[path].image_size not in (None, size):
                mw, mh = meta[path].image_size
                report.note(path, f"image_size {mw}x{mh} in {meta[path].where} differs from the file's "
                                  f"{size[0]}x{size[1]}; the file's size is used")
            try:
                choice = selector.select(size)
            except ValueError as e:
                rejected.append((path, f"too small: {e}"))
                continue
            bw, bh = choice.bucket
            rw, rh = choice.resized
            if rw * rh > MAX_COVER_FACTOR * bw * bh:
                reason = (f"extreme aspect ratio: {size[0]}x{size[1]} would be resized to {rw}x{rh} to cover "
                          f"bucket {bw}x{bh} (more than {MAX_COVER_FACTOR}x its pixels)")
                rejected.append((path, reason))
                continue
            if rw > UPSCALE_NOTE_FACTOR * size[0] and rh > UPSCALE_NOTE_FACTOR * size[1]:
                why = ("bucket_free_fit upscales to the target area" if p.bucket_free_fit
                       else "kohya semantics; bucket_no_upscale = true trains it at its own size")
                report.note(path, f"upscaled: {size[0]}x{size[1]} -> {rw}x{rh} ({rw / size[0]:.1f}x) for bucket "
                                  f"{bw}x{bh} ({why})")
            choices[path] = choice
        rejected.sort()
        for path, reason in rejected:
            report.skip(path, reason)
        kept = [path for path in usable if path in choices]
        if not kept and rejected and all(r.startswith(SKIP_RESOLUTION_REASON) for _, r in rejected):
            log.warning("%s: every image of %s is at or below skip_image_resolution; subset unused", sub.where,
                        source)
            continue
        if not kept:
            raise DatasetConfigError(
                f"{sub.where}: no usable images in {source}: {_summarize(rejected)}"
            )
        masks = _mask_images(sub, kept, infos, candidates, source_dir)
        with collect_decode_notes() as notes:
            captions = ([meta[path].caption for path in kept] if meta is not None
                        else captions_for_images(kept, sub.caption_extension, sub.class_tokens, sub.where,
                                                 enable_wildcard=sub.caption.enable_wildcard,
                                                 uncaptioned=report.uncaptioned))
            report.caption_extensions.update((p, sub.caption_extension) for p, _ in report.uncaptioned
                                             if p not in report.caption_extensions)
        for path, message in notes:
            report.note(path, message)
        for path, caption in zip(kept, captions):
            size = len(caption.encode("utf-8", "surrogatepass"))
            if size > MAX_CAPTION_BYTES:  # a runaway caption would be tokenised and encoded whole every step
                origin = meta[path].where if meta is not None else f"its {sub.caption_extension} file"
                raise DatasetConfigError(f"{sub.where}: the caption of {path} ({origin}) is {size} bytes, above "
                                         f"the limit of {MAX_CAPTION_BYTES}; shorten it (captions are used whole)")
            choice = choices[path]
            items.append(ImageItem(path, caption, infos[path].size, choice.bucket, choice.resized, i, j,
                                   sub.num_repeats, custom_attributes=copy.deepcopy(sub.custom_attributes),
                                   mask_path=masks.get(path), tags=meta[path].tags if meta is not None else None))
    return items


def balance_reg_items(params: list[DatasetParams], items: list[ImageItem]) -> list[ImageItem]:
    """Mark regularisation items (`is_reg`) and balance them as kohya's DreamBooth dataset does, per
    [[datasets]] entry: T = training items of the entry (images x num_repeats, non-reg subsets).  The reg
    images (subset order, then file order) are cycled: the first pass gives each its own num_repeats, every
    later pass adds one repeat to each in turn; it stops as soon as the reg items reach T.  So reg items
    ~= T (more when the first pass overshoots), and reg images beyond T on the first pass are not used at
    all (warning).  Returns the items in their original order, unused reg images left out."""
    out: list[ImageItem] = []
    for d, p in enumerate(params):
        mine = [item for item in items if item.dataset_index == d]
        reg_flags = [p.subsets[item.subset_index].is_reg for item in mine]
        num_train = sum(item.num_repeats for item, reg in zip(mine, reg_flags) if not reg)
        reg = [k for k, flag in enumerate(reg_flags) if flag]
        repeats: dict[int, int] = {}
        n, first = 0, True
        while reg and n < num_train:
            for k in reg:
                if first:
                    repeats[k] = mine[k].num_repeats
                    n += mine[k].num_repeats
                else:
                    repeats[k] += 1
                    n += 1
                if n >= num_train:
                    break
            first = False
        for k, item in enumerate(mine):
            if not reg_flags[k]:
                out.append(replace(item, is_reg=False) if item.is_reg else item)
            elif k in repeats:
                out.append(replace(item, is_reg=True, num_repeats=repeats[k]))
        if reg:
            unused = len(reg) - len(repeats)
            log.info("%s: %d regularisation image(s) balanced to %d reg items against %d training items",
                     p.where, len(repeats), n, num_train)
            if unused:
                log.warning("%s: %d of %d regularisation image(s) not used: there are more reg items than "
                            "training items (kohya's balancing)", p.where, unused, len(reg))
    return out


def build_dataset(
    cfg: DatasetConfig,
    *,
    default_batch_size: int = 1,
    seed: int = 0,
    default_resolution: int | tuple[int, int] | None = None,
    verify_images: bool = False,
    default_validation_split: float | None = None,
    default_validation_seed: int | None = None,
    strict_captions: bool = False,
    report_name: str | None = None,
) -> AnimaDataset:
    """Scan every subset (image headers, file ends and caption files only) and assign buckets.

    Unusable files are skipped and reported (module docstring); `verify_images=True` also decodes every
    image once, so that corruption inside the compressed data is caught at start-up too (slow).
    `default_batch_size` / `default_resolution` / `default_validation_split` / `default_validation_seed` play
    kohya's command-line level (`--train_batch_size`, `--resolution`, `--validation_split`,
    `--validation_seed`): used when neither the dataset nor [general] sets the option.  Held-out images are
    `ds.validation_items`; `ValidationSet.from_dataset(ds)` serves them for the validation loss (data/validation.py).
    Images without a caption file train with class_tokens or an empty caption (`ds.uncaptioned`);
    `strict_captions` makes them an error.  Every problem is collected before anything is reported; the
    warnings name `report_name`, the file `write_dataset_report` fills with the full lists."""
    params = resolve_datasets(cfg, default_batch_size=default_batch_size, default_resolution=default_resolution,
                              default_validation_split=default_validation_split,
                              default_validation_seed=default_validation_seed)
    items: list[ImageItem] = []
    report = _ScanReport()
    for i, p in enumerate(params):
        items.extend(_scan_dataset(i, p, cfg.source_dir, report, verify_images))
    if strict_captions and report.uncaptioned:  # after every subset: one error naming them all
        raise missing_captions_error([p for p, _ in report.uncaptioned], report.caption_extensions)
    items, validation_items = split_validation(params, items, seed)
    summary = summarize_datasets(params, items)  # kohya counts before balancing the reg images
    items = balance_reg_items(params, items)
    if not items:
        raise DatasetConfigError("the dataset config yields no training images (all subsets skipped?)")
    epoch_items = sum(item.num_repeats for item in items)
    if epoch_items > MAX_EPOCH_ITEMS:  # checked before the epoch's plan (a list per item and repeat) is built
        raise DatasetConfigError(f"num_repeats: one epoch would be {epoch_items} images × repeats ({len(items)} "
                                 f"images), above the limit of {MAX_EPOCH_ITEMS}; lower num_repeats and train longer "
                                 "with max_train_steps / max_train_epochs")
    ds = AnimaDataset(params, items, seed=seed, skipped=list(report.skipped), notices=list(report.notices))
    ds.validation_items = validation_items
    ds.kohya_summary = summary
    ds.uncaptioned = list(report.uncaptioned)
    where = f"full list in {report_name}" if report_name else "listed in full in the dataset report"
    if ds.skipped:
        log.warning("dataset: skipped %d file(s) that cannot be trained on (%s): %s",
                    len(ds.skipped), where, _summarize(ds.skipped))
    if ds.notices:
        log.warning("dataset: %d file(s) used with a caveat (%s): %s", len(ds.notices), where,
                    _summarize(ds.notices))
    if ds.uncaptioned:
        log.warning("dataset: %d image(s) have no caption file and train with the subset's class_tokens or an "
                    "empty caption, as in kohya (strict_captions = true makes this an error; %s): %s",
                    len(ds.uncaptioned), where,
                    _summarize([(p, f"caption {c!r}") for p, c in ds.uncaptioned]))
    log.info("dataset: %d images, %d items with repeats, %d batches per epoch%s", ds.num_images,
             ds.num_train_items, len(ds),
             f"; {len(validation_items)} image(s) held out for validation" if validation_items else "")
    for w, h, n in ds.bucket_table():
        log.info("  bucket %dx%d: %d", w, h, n)
    return ds


def build_run_dataset(cfg, seed: int, *, verify_images: bool = False, report_name: str | None = None) -> AnimaDataset:
    """The dataset a training config (`TrainConfig`: its dataset_config, with train_batch_size, validation_split,
    validation_seed and strict_captions as the command-line level) describes, split with the run's `seed`: what
    `train` and `cache` build at start-up, and what evaluation rebuilds to find a run's held-out images."""
    return build_dataset(load_dataset_config(cfg.dataset_config), default_batch_size=cfg.train_batch_size,
                         seed=seed, verify_images=verify_images, default_validation_split=cfg.validation_split,
                         default_validation_seed=cfg.validation_seed, strict_captions=cfg.strict_captions,
                         report_name=report_name)


def dataset_report(ds: AnimaDataset) -> str:
    """The full text of the start-up dataset report: every skipped file with why, every file used with a caveat
    (converted text encodings, upscales, ...), every image without a caption file with the caption it trains
    with.  Empty when there is nothing to report."""
    sections = [("skipped (not trained on)", [(p, r) for p, r in ds.skipped]),
                ("used with a caveat", [(p, m) for p, m in ds.notices]),
                ("no caption file (trains with the caption shown: the subset's class_tokens, else empty)",
                 [(p, f"caption {c!r}") for p, c in getattr(ds, "uncaptioned", [])])]
    lines: list[str] = []
    for title, entries in sections:
        if entries:
            lines += [f"{title}: {len(entries)}", *(f"  {p}: {why}" for p, why in entries), ""]
    return "\n".join(lines)


def write_dataset_report(ds: AnimaDataset, path: Path) -> Path | None:
    """Write `dataset_report(ds)` to `path` (through the one write path).  The file belongs to the run of that
    output_name (its lock is held), so an earlier run's report is replaced, and removed when this scan found
    nothing to report (it would describe another dataset)."""
    text = dataset_report(ds)
    if not text:
        path.unlink(missing_ok=True)
        return None
    return atomic_write_bytes(text.encode("utf-8", "backslashreplace"), path, what="the dataset report")
