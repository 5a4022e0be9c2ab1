"""Which SDPA kernel the DiT's attention runs: measured once at start-up (`auto`) or named by the user.

`configure_attention(dit, backend, device, dtype, tokens)` is called once before training.  `auto` on a CUDA
card of compute capability ≥ 8.0 (Ampere, Ada, Hopper, Blackwell) times forward + backward of each candidate
kernel (cuDNN, flash, memory-efficient) on one random problem shaped like the run's attention (its head dim,
dtype and token count), separately for self-attention (L×L) and cross-attention (L×512), checks each result
against the math kernel, and picks the fastest that works.  Older cards and the CPU keep torch's own choice.
A named backend is checked the same way (an error when it cannot run here) and used as is.

The choice is stored per attention module (`Attention.sdpa_backends`, a priority list: the chosen kernel
first, then torch's others for shapes it cannot take) and applied by `layers.attention` through
`torch.nn.attention.sdpa_kernel`, which only sets flags: the forward gains no host sync.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from anima_trainer.config.rules import check_backend_name
from anima_trainer.models.llm_adapter import CONTEXT_ROWS
from anima_trainer.models.dit import Attention

_log = logging.getLogger(__name__)

BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CHOICES = ("auto", *BACKENDS)
AUTO_CANDIDATES = ("cudnn", "flash", "efficient")
FALLBACK_ORDER = ("flash", "efficient", "cudnn", "math")  # after the chosen kernel, for shapes it cannot run
MIN_CAPABILITY = (8, 0)
# relative L2 error of output and input gradients against the fp32 math kernel that a kernel must meet
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def priority(name: str) -> tuple[SDPBackend, ...]:
    """The kernel list stored on a module for backend `name`: it first, then the fall-backs (math: alone)."""
    if name == "math":
        return (SDPBackend.MATH,)
    return (BACKENDS[name], *(BACKENDS[n] for n in FALLBACK_ORDER if n != name))


def dit_attention_modules(dit: nn.Module) -> dict[str, list[nn.Module]]:
    """{"self": [...], "cross": [...]}: the DiT blocks' attention modules (the LLM adapter keeps torch's choice:
    it runs with key masks, once per caption or cached)."""
    out: dict[str, list[nn.Module]] = {"self": [], "cross": []}
    for name, m in dit.named_modules():
        if isinstance(m, Attention) and name.startswith("blocks."):
            out["self" if name.endswith("self_attn") else "cross"].append(m)
    return out


def _problem(batch: int, q_tokens: int, k_tokens: int, heads: int, head_dim: int, device: torch.device,
             dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, S, D] and the output gradient laid out as the DiT hands them to SDPA: transposed
    [B, S, H, D] tensors, and for self-attention v a slice of the fused q/k/v GEMM output.  Fixed seed: every
    candidate sees the same numbers."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(s: int) -> torch.Tensor:
        return torch.randn(batch, s, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)

    q, k = make(q_tokens), make(k_tokens)
    if q_tokens == k_tokens:  # self-attention: v = columns 2D..3D of the [B, S, 3·D] fused projection
        v = torch.randn(batch, k_tokens, 3, heads, head_dim, generator=g).to(device, dtype)[:, :, 2].transpose(1, 2)
    else:
        v = make(k_tokens)
    return q, k, v, make(q_tokens)


def _run(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward + backward with only `backend` allowed: (output, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_kernel(name: str, problem: tuple[torch.Tensor, ...]) -> str | None:
    """None when kernel `name` runs forward + backward on `problem` within TOLERANCE of fp32 math; else why not."""
    q, k, v, grad = problem
    try:
        with warnings.catch_warnings():  # torch warns for every kernel it rules out; the reason is returned
            warnings.simplefilter("ignore", UserWarning)
            got = _run(BACKENDS[name], q, k, v, grad)
    except RuntimeError as e:  # "No available kernel", unsupported dtype / head dim / device
        return str(e).strip().splitlines()[0][:300]
    ref = _run(SDPBackend.MATH, *(t.detach().float() for t in (q, k, v, grad)))
    tol = TOLERANCE.get(q.dtype, 3e-2)
    errors = [_rel(a, b) for a, b in zip(got, ref)]
    if not all(e <= tol for e in errors):  # also catches NaN
        return f"results differ from the math kernel (relative errors {', '.join(f'{e:.2g}' for e in errors)})"
    return None


def time_kernel(name: str, problem: tuple[torch.Tensor, ...], reps: int = 5, warmup: int = 2) -> float:
    """Median ms of forward + backward of kernel `name` (CUDA events; synchronises: start-up only)."""
    q, k, v, grad = problem
    backend = BACKENDS[name]
    for _ in range(warmup):
        _run(backend, q, k, v, grad)
    times = []
    for _ in range(reps):
        if q.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _run(backend, q, k, v, grad)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _run(backend, q, k, v, grad)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def auto_supported(device: torch.device) -> bool:
    """Whether `auto` measures kernels here (CUDA with compute capability ≥ 8.0); else torch's choice stays."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def configure_attention(dit: nn.Module, backend: str = "auto", device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, tokens: int = 4096, batch: int = 1,
                        context_tokens: int = CONTEXT_ROWS) -> str:
    """Choose the SDPA kernel of every DiT attention module; returns (and logs) the choice.

    `tokens`: a representative image token count of the run (latent H/2 · W/2, e.g. 4096 at 1024²; the largest
    bucket is a good pick), `batch` its batch size; device/dtype default to the DiT's.  Returns e.g. "cudnn",
    "self_attn=cudnn cross_attn=flash", or "torch default" (auto on CPU / before Ampere).
    Call once at start-up, after the DiT is on its device (costs a few ms of measurement on CUDA).
    """
    name = check_backend_name(backend)
    first = next(dit.parameters())
    device = torch.device(device) if device is not None else first.device
    dtype = dtype or first.dtype
    modules = dit_attention_modules(dit)
    if not any(modules.values()):
        raise ValueError("configure_attention: no DiT attention modules found (is this an AnimaDiT?)")
    sample = modules["self"][0] if modules["self"] else modules["cross"][0]
    heads, head_dim = sample.heads, sample.head_dim
    shapes = {"self": tokens, "cross": context_tokens}
    chosen: dict[str, str | None] = {}
    if name == "auto" and not auto_supported(device):
        chosen = {kind: None for kind in modules}
        why = "CPU" if device.type != "cuda" else f"compute capability {torch.cuda.get_device_capability(device)}"
        _log.info("attention backend: torch's default selection (%s: auto measures only on CUDA ≥ 8.0)", why)
    elif name == "auto":
        for kind, k_tokens in shapes.items():
            problem = _problem(batch, tokens, k_tokens, heads, head_dim, device, dtype)
            timings: dict[str, float] = {}
            for cand in AUTO_CANDIDATES:
                reason = check_kernel(cand, problem)
                if reason is None:
                    timings[cand] = time_kernel(cand, problem)
                else:
                    _log.info("attention backend %s for %s-attention: not usable here (%s)", cand, kind, reason)
            chosen[kind] = min(timings, key=timings.get) if timings else None
            _log.info("attention backend for %s-attention (%d×%d tokens, batch %d, %s, head_dim %d): %s; "
                      "fwd+bwd ms %s", kind, tokens, k_tokens, batch, str(dtype).replace("torch.", ""), head_dim,
                      chosen[kind] or "torch default",
                      ", ".join(f"{c} {t:.3f}" for c, t in sorted(timings.items(), key=lambda kv: kv[1])) or "-")
    else:
        for kind, k_tokens in shapes.items():
            reason = check_kernel(name, _problem(batch, min(tokens, 256), min(k_tokens, 256), heads, head_dim,
                                                 device, dtype))
            if reason is not None:
                raise ValueError(f"attention_backend = {name}: SDPA's {name} kernel cannot run the DiT's attention "
                                 f"on {device} ({dtype}, head_dim {head_dim}): {reason}; use attention_backend = "
                                 "auto")
            chosen[kind] = name
        _log.info("attention backend: %s (as configured)", name)
    for kind, mods in modules.items():
        for m in mods:
            m.sdpa_backends = priority(chosen[kind]) if chosen.get(kind) else None
    names = {kind: chosen.get(kind) or "torch default" for kind in modules}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return " ".join(f"{kind}_attn={n}" for kind, n in names.items())
