"""Benchmark: latent caching with the 2-D VAE path (qwen_image_vae_2d, the default) vs diffusers' 3-D model.

Builds the full-size Qwen-Image VAE (base_dim 96) with random weights, then times `AnimaVAE.encode`
(what the latent cache runs) and `decode` (what previews run) of a batch of random images on both paths,
plus the 2-D path with `--chunk` rows (vae_chunk_size). Prints one JSON line per case with seconds
(median of --repeat after one warm-up) and, on CUDA, the peak allocated memory.

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


def timed(fn, device: torch.device, repeat: int) -> tuple[float, float | None]:
    fn()  # warm-up (kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


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
    results = {}
    for name, two_d, chunk in cases:
        vae = build(device, dtype, two_d, chunk)
        latents = vae.encode(images)
        enc_s, enc_peak = timed(lambda: vae.encode(images), device, args.repeat)
        dec_s, dec_peak = timed(lambda: vae.decode(latents), device, args.repeat)
        row = {"case": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "size": args.size,
               "batch": args.batch, "chunk": chunk, "encode_s": round(enc_s, 4), "decode_s": round(dec_s, 4),
               "encode_peak_gib": enc_peak and round(enc_peak, 3), "decode_peak_gib": dec_peak and round(dec_peak, 3)}
        results[name] = row
        print(json.dumps(row), flush=True)
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["3d"]
    print(json.dumps({"speedup_2d_encode": round(base["encode_s"] / results["2d"]["encode_s"], 2),
                      "speedup_2d_decode": round(base["decode_s"] / results["2d"]["decode_s"], 2)}))


if __name__ == "__main__":
    main()
