"""Benchmark: the data pipeline without a model -> one JSON line.

Builds a synthetic dataset (N noise images of one size, PNG or JPEG, in a temporary folder), then measures
  * scan:    build_dataset (headers + start-up checks + captions), seconds;
  * decode:  batches/s and images/s of `ds.epoch(e, prefetch=k)` (decode, resize, crop, to tensor);
  * latents: batches/s of iterating a latent cache (dict index -> [16, 1, h/8, w/8] tensor) stacked per
             `ds.batch_plan(e)`, i.e. what a cached training run pays per step for data.

Usage:  python bench/data_pipeline.py --images 64 --size 1024x768 --resolution 512 --batch 4 --prefetch 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anima_trainer.data import build_dataset, parse_dataset_config


def make_images(folder: Path, n: int, size: tuple[int, int], fmt: str) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        # smooth noise (compresses like a picture, not like white noise): upsampled 1/16 random field
        small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        im.save(folder / f"{i:05d}.{fmt}", **({"quality": 92} if fmt == "jpg" else {}))
        (folder / f"{i:05d}.txt").write_text(f"image {i}, noise", encoding="utf-8")


def run(args: argparse.Namespace) -> dict:
    w, h = (int(x) for x in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="anima-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_images(folder, args.images, (w, h), args.format)
        make_s = time.perf_counter() - t0
        cfg = parse_dataset_config({"datasets": [{
            "resolution": args.resolution, "enable_bucket": True, "max_bucket_reso": 2 * args.resolution,
            "batch_size": args.batch, "subsets": [{"image_dir": str(folder), "caption_extension": ".txt"}]}]})
        t0 = time.perf_counter()
        ds = build_dataset(cfg, seed=0)
        scan_s = time.perf_counter() - t0

        # (a) decoding epochs
        decode = []
        for e in range(args.epochs):
            t0 = time.perf_counter()
            n_batches = n_images = 0
            for batch in ds.epoch(e, prefetch=args.prefetch):
                n_batches += 1
                n_images += batch.images.shape[0]
            decode.append((n_batches, n_images, time.perf_counter() - t0))

        # (b) a latent cache in RAM, stacked per batch plan
        latents = {i: torch.randn(16, 1, it.bucket[1] // 8, it.bucket[0] // 8) for i, it in enumerate(ds.items)}
        for indices in ds.batch_plan(0):  # warm-up (first torch.stack call)
            torch.stack([latents[i] for i in indices])
        t0 = time.perf_counter()
        n_lat = 0
        for e in range(args.latent_epochs):
            for indices in ds.batch_plan(e):
                x = torch.stack([latents[i] for i in indices])
                n_lat += 1
        latent_s = time.perf_counter() - t0
        del x

    b, n, s = (sum(col) for col in zip(*decode))
    return {
        "images": args.images, "size": [w, h], "format": args.format, "resolution": args.resolution,
        "batch": args.batch, "prefetch": args.prefetch, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "buckets": [list(r[:2]) for r in ds.bucket_table()], "make_s": round(make_s, 2),
        "scan_s": round(scan_s, 4), "scan_ms_per_image": round(1000 * scan_s / args.images, 3),
        "decode_batches_per_s": round(b / s, 2), "decode_images_per_s": round(n / s, 2),
        "decode_epochs": args.epochs,
        "latent_batches_per_s": round(n_lat / latent_s, 1), "latent_epochs": args.latent_epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the synthetic images")
    ap.add_argument("--format", choices=("png", "jpg"), default="jpg")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--latent-epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    print(json.dumps(run(ap.parse_args())))


if __name__ == "__main__":
    main()
