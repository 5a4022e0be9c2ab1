"""Benchmark: latent caching with the 2-D VAE path (qwen_image_vae_2d, the default) vs diffusers' 3-D model.

Builds the full-size Qwen-Image VAE (base_dim 96) with random weights, then times `AnimaVAE.encode`
(what the latent cache runs) and `decode` (what previews run) of a batch of random images on both paths,
plus the 2-D path with `--chunk` rows (vae_chunk_size). The cases run interleaved after one warm-up each
(so load from other processes hits them alike); one JSON line per case with the min and median seconds of
--repeat runs and, on CUDA, the peak memory above the weights; then the 2-D speedups.

Usage:  python bench/vae_2d.py --size 256 --batch 1 --repeat 3            # CPU (fp32 by default)
        python bench/vae_2d.py --size 1024 --batch 4 --device cuda       # GPU (bf16 by default)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from anima_trainer.models.vae import VAE_CONFIG, AnimaVAE


def build(device: torch.device, dtype: torch.dtype, two_d: bool, chunk: int | None) -> AnimaVAE:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    model = AutoencoderKLQwenImage(**VAE_CONFIG).to(device, dtype)
    return AnimaVAE(model, dtype=dtype, device=device, batch_size=64, two_d=two_d, chunk_rows=chunk)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=64, help="vae_chunk_size of the chunked 2-D case (0 = skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda"
                                                                            else "fp32")]
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    cases = [("3d", False, None), ("2d", True, None)] + ([("2d_chunk", True, args.chunk)] if args.chunk else [])
    vaes = {name: build(device, dtype, two_d, chunk) for name, two_d, chunk in cases}
    latents = vaes["3d"].encode(images)
    times: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in vaes}
    for _name, vae in vaes.items():  # warm-up (kernel selection)
        vae.encode(images), vae.decode(latents)
    # interleaved, so that load from other processes hits every case alike; min and median reported
    for _ in range(args.repeat):
        for name, vae in vaes.items():
            times[name]["encode"].append(timed(lambda: vae.encode(images), device))  # noqa: B023 - called at once
            times[name]["decode"].append(timed(lambda: vae.decode(latents), device))  # noqa: B023 - called at once
    peaks = {}
    if device.type == "cuda":
        for name, vae in vaes.items():
            for op, fn in (("encode", lambda: vae.encode(images)), ("decode", lambda: vae.decode(latents))):  # noqa: B023
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                timed(fn, device)
                peaks[(name, op)] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 3)
    results = {}
    for name, _two_d, chunk in cases:
        row = {"case": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "size": args.size,
               "batch": args.batch, "chunk": chunk, "repeat": args.repeat}
        for op in ("encode", "decode"):
            row[f"{op}_s_min"] = round(min(times[name][op]), 4)
            row[f"{op}_s_median"] = round(statistics.median(times[name][op]), 4)
            row[f"{op}_peak_gib"] = peaks.get((name, op))
        results[name] = row
        print(json.dumps(row), flush=True)
    base = results["3d"]
    print(json.dumps({f"speedup_2d_{op}_{stat}": round(base[f"{op}_s_{stat}"] / results["2d"][f"{op}_s_{stat}"], 2)
                      for op in ("encode", "decode") for stat in ("min", "median")}))


if __name__ == "__main__":
    main()
