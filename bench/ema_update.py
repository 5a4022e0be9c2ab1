"""The cost of one EMA update of a fine-tune's trained weights (issue 19 item 5): the shadow beside the weights
(`ema_device = "device"`) against the shadow in host memory (`"cpu"`: copy the weights to the host, then the same
diffusers update there), for the 2B DiT's parameter shapes of a block selection.  Prints JSON.

    python bench/ema_update.py --config tiny --blocks 2 --device cpu --steps 3   # CPU smoke (both sides on the CPU)
    python bench/ema_update.py --blocks 28 --dtype bf16                          # a GPU: the full DiT's blocks
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from anima_trainer.train.ema import NetworkEMA
from anima_trainer.train.finetune_memory import trained_shapes

try:  # run as a script (bench/ on sys.path) or imported as bench.ema_update
    from dit_step import CONFIGS
except ImportError:  # pragma: no cover
    from bench.dit_step import CONFIGS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_updates(params: list[torch.nn.Parameter], *, host: bool, steps: int, warmup: int) -> dict[str, float | None]:
    """ms per `NetworkEMA.update` (weights nudged between updates, as an optimizer step would) and the device
    memory the EMA holds (MiB; None off CUDA)."""
    device = params[0].device
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ema = NetworkEMA(params, decay=0.999, host=host)
    _sync(device)
    held = (torch.cuda.memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    times = []
    for i in range(warmup + steps):
        with torch.no_grad():
            for p in params:
                p.add_(1e-3)
        _sync(device)
        start = time.perf_counter()
        ema.update()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"ms_per_update": 1000 * sum(times) / len(times), "device_mib_held": held}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    ap.add_argument("--blocks", type=int, default=1, help="trained blocks (1 .. the config's num_blocks)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the trained weights' dtype")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    shapes = trained_shapes(CONFIGS[args.config], [rf"^blocks\.{i}\." for i in range(args.blocks)])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=args.device)) for s in shapes.values()]
    numel = sum(p.numel() for p in params)
    results = {side: time_updates(params, host=side == "host", steps=args.steps, warmup=args.warmup)
               for side in ("device", "host")}
    meta = {"torch": torch.__version__, "device": args.device, "machine": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "threads": torch.get_num_threads(), "config": args.config, "blocks": args.blocks, "dtype": args.dtype,
            "trained_params": numel, "shadow_gib": 4 * numel / 2**30}
    out = {"meta": meta, "results": results}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
