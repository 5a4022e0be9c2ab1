"""Benchmark: cache-building throughput (images/s) — VAE, Qwen3, LLM adapter, decoding, and the overlapped pipeline.

Issue 18 item 6.  Everything runs the trainer's own code on synthetic inputs, with random weights of the real shapes
built in memory (no model files):

* `decode`: JPEG files (`--size`² buckets cut from 1.19x larger images, as real data is resized and cropped) decoded,
  resized and cropped by the data-loader workers (`data.loader.chunk_batches`, `--workers`; 0 = this process);
* `vae_encode`: `AnimaVAE.encode` of random images on the 2-D path, full-size Qwen-Image VAE (base_dim 96), batches
  of `--batch` (vae_batch_size), in the run's dtype (bf16 on CUDA, fp32 on CPU);
* `qwen3`: the text cache's pass (`cache.build.cache_text`, RAM only) over one caption per image, Qwen3-0.6B shapes,
  batches of `--text-batch` (text_encoder_batch_size); real tokenizers when ANIMA_TEST_TOKENIZERS names a folder
  with qwen/ and t5/ in it, else synthetic token ids (48-160 Qwen3 tokens per caption, a tag caption's length);
* `llm_adapter`: the adapter-output cache (`TextConditioner` with cache_llm_adapter_outputs) over the same captions,
  in training batches of `--text-batch`;
* `pipeline`: the whole latent-cache build (`cache.build.cache_latents`, entries written to disk) with images
  decoded in `--workers` processes while the VAE encodes, and `pipeline_serial` the same in one process.

Each stage runs until `--images` images or `--budget-s` seconds (whichever comes first; the count measured is in the
row) after one untimed warm-up batch; `projected_s` = `--images` / images_per_s is a projection, not a measurement.
The rows end with the training step rate they compare with: images/s of one step from bench/README.md's H200 table
(labelled with its card, commit and date; not measured by this script).

Usage:  PYTHONPATH=src python3 bench/cache_build.py --device cuda --json-out $OUT/cache_build.json   # ~90 s
        PYTHONPATH=src python bench/cache_build.py --device cpu --images 8 --size 256                # full models
        PYTHONPATH=src python bench/cache_build.py --device cpu --tiny --images 4 --size 64           # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch

# images/s of one training step, from bench/README.md "Results" (measured there, on that card; not here)
STEP_RATES = [
    {"source": "bench/README.md, NVIDIA H200, torch 2.11.0+cu130, f5af62b+, 2026-11-26",
     "config": "2b 1024px b1 ckpt off r32 bf16, compile_blocks", "ms_per_step": 115.9, "batch": 1},
    {"source": "bench/README.md, NVIDIA H200, torch 2.11.0+cu130, f5af62b+, 2026-11-26",
     "config": "2b 1024px b1 ckpt off r32 bf16, eager", "ms_per_step": 184.4, "batch": 1},
    {"source": "bench/README.md, NVIDIA H200, torch 2.11.0+cu130, f5af62b+, 2026-11-26",
     "config": "2b 1024px b4 ckpt off r32 bf16, compile_blocks", "ms_per_step": 400.9, "batch": 4},
]
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128)
TAGS = ("1girl solo long_hair smile looking_at_viewer blue_eyes outdoors sky cloud day dress flower holding "
        "standing upper_body short_hair brown_hair white_background simple_background hat jacket").split()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(case: str, args: argparse.Namespace, images: int, seconds: float, **extra) -> dict:
    rate = images / seconds if seconds > 0 else 0.0
    row = {"case": case, "device": args.device_name, "dtype": args.dtype_name, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "size": args.size, "images": images, "seconds": round(seconds, 3),
           "images_per_s": round(rate, 3),
           "projected_s": round(args.images / rate, 1) if rate else None, **extra}
    print(json.dumps(row), flush=True)
    return row


def _timed_batches(step, n_batches: int, batch: int, budget_s: float, device: torch.device) -> tuple[int, float]:
    """Run `step(k)` for k = 1.. (k = 0 is the warm-up) until `n_batches` or the budget; (images, seconds)."""
    step(0)
    _sync(device)
    t0, done, k = time.perf_counter(), 0, 1
    while k < n_batches and (time.perf_counter() - t0) < budget_s:
        step(k)
        done += batch
        k += 1
    _sync(device)
    return done, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- data

def write_images(folder: Path, count: int, size: int, seed: int = 0, pool: int = 8) -> Path:
    """`count` JPEG files of (1.19·size)² with a caption each: `pool` distinct noisy gradients, copied."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    side = size * 119 // 100
    rng = random.Random(seed)
    sources = []
    for p in range(min(pool, count)):
        g = torch.Generator().manual_seed(seed + p)
        base = torch.linspace(0, 1, side)[None, :, None] * torch.rand(1, 1, 3, generator=g)
        pixels = (base + 0.25 * torch.rand(side, side, 3, generator=g)).clamp(0, 1).mul(255).to(torch.uint8)
        path = folder / f"img_{p:05d}.jpg"
        Image.fromarray(pixels.numpy()).save(path, quality=90)
        sources.append(path)
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        if not path.exists():
            shutil.copyfile(sources[i % len(sources)], path)
        path.with_suffix(".txt").write_text(", ".join(rng.sample(TAGS, rng.randint(8, len(TAGS)))), encoding="utf-8")
    return folder


def build_images_dataset(folder: Path, size: int, batch: int):
    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.config.tomlw import toml_value

    toml = folder.parent / "dataset.toml"
    toml.write_text(f"""[general]
caption_extension = ".txt"
enable_bucket = false
resolution = {size}
batch_size = {batch}

[[datasets]]
  [[datasets.subsets]]
  image_dir = {toml_value(folder)}
""", encoding="utf-8")
    return build_dataset(load_dataset_config(toml), default_batch_size=batch)


# ----------------------------------------------------------------------------------------------- models

def build_vae(device: torch.device, dtype: torch.dtype, base_dim: int):
    from diffusers import AutoencoderKLQwenImage

    from anima_trainer.models.vae import VAE_CONFIG, AnimaVAE

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLQwenImage(**{**VAE_CONFIG, "base_dim": base_dim}).to(dtype)
    return AnimaVAE(model, dtype=dtype, device=device, two_d=True)


class SyntheticTokenizer:
    """Stands in for the tokenizers without their files: per caption, deterministic ids of a tag caption's length."""

    def __init__(self, qwen_vocab: int, t5_vocab: int) -> None:
        from anima_trainer.models.text import QWEN_PAD_ID, T5_EOS_ID

        self.qwen_vocab, self.t5_vocab = qwen_vocab, t5_vocab
        self.qwen_pad_id = QWEN_PAD_ID if QWEN_PAD_ID < qwen_vocab else 0
        self.t5_eos_id = T5_EOS_ID

    def __call__(self, text: str):
        from anima_trainer.models.text import TokenizedPrompt

        rng = random.Random(text)
        n = rng.randint(48, 160)
        t5 = [rng.randrange(2, self.t5_vocab) for _ in range(n + n // 8)] + [self.t5_eos_id]
        return TokenizedPrompt([rng.randrange(self.qwen_vocab) for _ in range(n)], t5, [1.0] * len(t5))


def build_text(device: torch.device, dtype: torch.dtype, tiny: bool):
    """(AnimaTextEncoder with Qwen3-0.6B shapes or the demo's tiny ones, LLM adapter of the matching width, where
    the tokens come from)."""
    from transformers import Qwen3Config, Qwen3Model

    from anima_trainer.demo import TINY_QWEN3_SHAPES
    from anima_trainer.models.llm_adapter import LLMAdapter
    from anima_trainer.models.text import RMS_EPS, ROPE_THETA, AnimaTextEncoder, AnimaTokenizer

    shapes = TINY_QWEN3_SHAPES if tiny else QWEN3_0_6B
    config = Qwen3Config(**shapes, rope_theta=ROPE_THETA, rms_norm_eps=RMS_EPS, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3Model(config).to(dtype).eval().requires_grad_(False)
        hidden = shapes["hidden_size"]
        adapter = (LLMAdapter(vocab=320, dim=64, source_dim=hidden, blocks=1, heads=4, mlp_dim=128) if tiny
                   else LLMAdapter()).to(dtype).eval().requires_grad_(False)
    folder = os.environ.get("ANIMA_TEST_TOKENIZERS")
    if not tiny and folder and (Path(folder) / "qwen").is_dir() and (Path(folder) / "t5").is_dir():
        tokenizer, tokens = AnimaTokenizer.from_dirs(Path(folder) / "qwen", Path(folder) / "t5"), "real tokenizers"
    else:
        tokenizer, tokens = SyntheticTokenizer(shapes["vocab_size"], 320 if tiny else 32128), "synthetic ids"
    return AnimaTextEncoder(model, tokenizer), adapter, tokens


class AdapterOnly(torch.nn.Module):
    """What `TextConditioner` needs of the DiT: `encode_context` (the LLM adapter) and parameters."""

    def __init__(self, adapter: torch.nn.Module) -> None:
        super().__init__()
        self.llm_adapter = adapter

    def encode_context(self, qwen_hidden, t5_ids, qwen_mask=None, t5_mask=None, t5_weights=None):
        from anima_trainer.models.llm_adapter import build_context

        device = self.llm_adapter.embed.weight.device
        return build_context(self.llm_adapter, qwen_hidden.to(device), t5_ids.to(device), qwen_mask, t5_mask,
                             t5_weights)


# ---------------------------------------------------------------------------------------------- stages

def bench_decode(args, dataset, workers: int) -> dict:
    from anima_trainer.data.loader import chunk_batches

    indices = list(range(len(dataset.items)))
    chunks = [(indices[k: k + args.batch], [False] * len(indices[k: k + args.batch]))
              for k in range(0, len(indices), args.batch)]
    t0, done = time.perf_counter(), 0
    with closing(chunk_batches(dataset, chunks, workers)) as batches:
        for batch in batches:
            done += batch.images.shape[0]
            if time.perf_counter() - t0 >= args.budget_s:
                break
    return _row("decode", args, done, time.perf_counter() - t0, workers=workers, batch=args.batch,
                note="includes the workers' start")


def bench_vae(args, vae) -> dict:
    n_batches = -(-args.images // args.batch) + 1
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def step(_k: int) -> None:
        vae.encode(images)  # CPU images in, fp32 latents back on the host

    done, seconds = _timed_batches(step, n_batches, args.batch, args.budget_s, args.device)
    return _row("vae_encode", args, done, seconds, batch=args.batch, path="2d", base_dim=args.vae_dim)


def bench_text(args, te, adapter, tokens: str, captions: list[str]) -> list[dict]:
    from anima_trainer.cache.build import cache_text
    from anima_trainer.train.inputs import TextConditioner

    cache_text({c: None for c in captions[: args.text_batch]}, te, qwen_fingerprint="bench",
               batch_size=args.text_batch, progress=False)  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    rows, _ = cache_text({c: None for c in captions}, te, qwen_fingerprint="bench", batch_size=args.text_batch,
                         progress=False)
    _sync(args.device)
    out = [_row("qwen3", args, len(captions), time.perf_counter() - t0, batch=args.text_batch, tokens=tokens,
                qwen_tokens_mean=round(sum(len(r[0]) for r in rows.values()) / len(rows), 1))]
    dit = AdapterOnly(adapter)
    warm = TextConditioner(dit, te, cache_contexts=True)
    warm.prefill(rows)
    warm.context(captions[: args.text_batch])  # warm-up, in a conditioner of its own
    conditioner = TextConditioner(dit, te, cache_contexts=True)
    conditioner.prefill(rows)
    _sync(args.device)
    t0 = time.perf_counter()
    for k in range(0, len(captions), args.text_batch):
        conditioner.context(captions[k: k + args.text_batch])
    _sync(args.device)
    out.append(_row("llm_adapter", args, len(captions), time.perf_counter() - t0, batch=args.text_batch,
                    tokens=tokens))
    return out


def bench_pipeline(args, dataset, vae, workers: int, count: int, case: str) -> dict:
    from anima_trainer.cache.build import cache_latents
    from anima_trainer.cache.store import CACHE_FOLDER

    shutil.rmtree(args.image_dir / CACHE_FOLDER, ignore_errors=True)
    warm = args.batch  # one untimed batch in this process: the encoder's warm-up
    cache_latents(dataset, vae, vae_fingerprint="bench", dtype=vae.dtype, to_disk=False, batch_size=args.batch,
                  progress=False, owned=lambda i: i < warm, workers=0)
    _sync(args.device)
    t0 = time.perf_counter()
    _, summary = cache_latents(dataset, vae, vae_fingerprint="bench", dtype=vae.dtype, to_disk=True,
                               batch_size=args.batch, progress=False, owned=lambda i: i < count, workers=workers)
    _sync(args.device)
    return _row(case, args, summary.built, time.perf_counter() - t0, workers=workers, batch=args.batch,
                to_disk=True, note="includes the workers' start, hashing, and writing the entries")


def step_rates(rows: list[dict]) -> list[dict]:
    """The training step rates, and how the measured pipeline compares with each (cache images/s ÷ step images/s)."""
    pipeline = next((r for r in rows if r["case"] == "pipeline"), None)
    out = []
    for s in STEP_RATES:
        rate = 1000.0 * s["batch"] / s["ms_per_step"]
        entry = {**s, "images_per_s": round(rate, 2)}
        if pipeline and pipeline["images_per_s"]:
            entry["pipeline_over_step"] = round(pipeline["images_per_s"] / rate, 3)
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device
    args.dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype_name]
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)  # max_data_loader_n_workers' default, on this machine's cores
    rows: list[dict] = []

    def keep(new) -> None:
        rows.extend(new if isinstance(new, list) else [new])
        if args.json_out:
            write_json(args.json_out, rows, args)

    with tempfile.TemporaryDirectory(prefix="anima-cache-bench-") as tmp:
        args.image_dir = write_images(Path(tmp) / "images", args.images, args.size)
        dataset = build_images_dataset(args.image_dir, args.size, args.batch)
        keep(bench_decode(args, dataset, args.workers))
        te, adapter, tokens = build_text(device, dtype, args.tiny)
        keep(bench_text(args, te, adapter, tokens, [item.caption for item in dataset.items]))
        del te, adapter
        vae = build_vae(device, dtype, args.vae_dim)
        vae_row = bench_vae(args, vae)
        keep(vae_row)
        # the pipeline over as many images as the VAE alone managed in the budget (both cases alike)
        count = min(args.images, max(2 * args.batch, vae_row["images"] + args.batch))
        keep(bench_pipeline(args, dataset, vae, args.workers, count, "pipeline"))
        keep(bench_pipeline(args, dataset, vae, 0, count, "pipeline_serial"))
    result = write_json(args.json_out, rows, args) if args.json_out else {"results": rows,
                                                                          "step_rates": step_rates(rows)}
    return result


def write_json(path: str | Path, rows: list[dict], args: argparse.Namespace) -> dict:
    """{results, step_rates, settings}, rewritten after every stage so a cut-off run keeps what it measured."""
    result = {"results": rows, "step_rates": step_rates(rows),
              "settings": {"images": args.images, "size": args.size, "batch": args.batch, "workers": args.workers,
                           "text_batch": args.text_batch, "budget_s": args.budget_s, "tiny": args.tiny,
                           "vae_dim": args.vae_dim}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def table(result: dict) -> str:
    """The markdown rows bench/README.md records."""
    lines = ["| case | device | dtype | size | batch | workers | images | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        lines.append(f"| {r['case']} | {r['device']} | {r['dtype']} | {r['size']}² | {r.get('batch', '')} "
                     f"| {r.get('workers', '')} | {r['images']} | {r['images_per_s']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default: 1000 on CUDA, 8 on CPU)")
    p.add_argument("--size", type=int, default=None, help="square bucket side (default: 1024 on CUDA, 256 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per VAE call, vae_batch_size (default: 4 on "
                   "CUDA, 1 on CPU)")
    p.add_argument("--text-batch", type=int, default=8, help="captions per Qwen3 call (text_encoder_batch_size)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, cores))")
    p.add_argument("--budget-s", type=float, default=None, help="seconds per timed stage (default: 12 on CUDA, "
                   "120 on CPU)")
    p.add_argument("--tiny", action="store_true", help="the demo's tiny Qwen3, a 1-block adapter, a base_dim-8 "
                   "VAE: a smoke test, not a measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.images = args.images or (1000 if cuda else 8)
    args.size = args.size or (1024 if cuda else 256)
    args.batch = args.batch or (4 if cuda else 1)
    args.budget_s = args.budget_s if args.budget_s is not None else (12.0 if cuda else 120.0)
    args.vae_dim = 8 if args.tiny else 96
    if args.size % 64:
        raise SystemExit(f"--size must be a multiple of 64 (a bucket), got {args.size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    for s in result["step_rates"]:
        print(f"training step ({s['config']}; {s['source']}): {s['images_per_s']} images/s"
              + (f"; cache pipeline / step = {s['pipeline_over_step']}" if "pipeline_over_step" in s else ""))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
