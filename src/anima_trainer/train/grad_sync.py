"""Averaging the network's gradients over data-parallel processes, overlapped with the backward pass.

The gradients of the trainable parameters are all-reduced in buckets (about `bucket_cap_mb` each, per device
and dtype), in reverse registration order: the order the backward produces them (the last DiT blocks first).
On the accumulation's last micro-batch a hook (`Tensor.register_post_accumulate_grad_hook`) marks each
parameter whose gradient is final; once every parameter of a bucket is marked, the bucket is copied into one
flat buffer and its SUM all-reduce starts asynchronously while the backward goes on through the earlier blocks.
`finish()` (where the optimizer step begins, before `scaler.unscale_` and clipping) launches the buckets still
waiting — those holding a parameter without a gradient in this process, or all of them without overlap — waits
for every all-reduce, divides by the number of processes and writes the means back.

The result is the flat one-shot average's (`Distributed.average_gradients` is this class with one bucket per
device and dtype): a process without a gradient for a parameter adds zeros, a parameter without a gradient in
every process keeps `grad = None` (each bucket carries one has-a-gradient flag per parameter), Inf/NaN reach
every process (all of them skip the same step), and each element is the same sum of the same per-process
values — bitwise equal to the flat path for 2 processes (a + b = b + a); with more processes a collective may
add the addends in an order that depends on the element's position in its buffer (rounding-level).

Buckets are launched strictly in their order, the same in every process, even when one fills earlier in one
process than in another (collectives are matched by their order).  A bucket holding a parameter without a
gradient in some process would hold back every later bucket; after the first step (whose all-reduce tells every
process the same has-a-gradient counts) such parameters move to trailing buckets that always wait for
`finish()`.  Earlier micro-batches of an accumulation do not communicate.
Used through `Distributed.gradient_sync` (train/distributed.py); docs/multi_gpu.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist

DEFAULT_BUCKET_CAP_MB = 25.0  # DDP's default bucket size


def plan_buckets(params: Iterable[torch.nn.Parameter], bucket_cap_mb: float) -> list[list[torch.nn.Parameter]]:
    """The parameters grouped into all-reduce buckets, in launch order.

    `bucket_cap_mb` > 0: reverse registration order (≈ the order the backward finishes them), a new bucket per
    device and dtype whenever the next parameter would take the open one past the cap (a parameter larger than
    the cap gets a bucket of its own); buckets are ordered by their first parameter.  0: one bucket per device
    and dtype in registration order (the one flat all-reduce after the backward)."""
    params = list(params)
    if bucket_cap_mb <= 0:
        flat: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in params:
            flat.setdefault((p.device, p.dtype), []).append(p)
        return list(flat.values())
    cap = bucket_cap_mb * 2 ** 20
    buckets: list[list[torch.nn.Parameter]] = []
    open_bucket: dict[tuple[torch.device, torch.dtype], tuple[list[torch.nn.Parameter], int]] = {}
    for p in reversed(params):
        key, size = (p.device, p.dtype), p.numel() * p.element_size()
        bucket, used = open_bucket.get(key, (None, 0))
        if bucket is None or (used + size > cap and bucket):
            bucket, used = [], 0
            buckets.append(bucket)
        bucket.append(p)
        open_bucket[key] = (bucket, used + size)
    return buckets


class GradientSync:
    """Averages the gradients of `params` over `world_size` processes once per optimizer step.

    Around every micro-batch's backward: `with sync.backward(last=...)`; `last` is true on the accumulation's
    last micro-batch (the one whose backward leaves the gradients the optimizer will use).  Then `finish()`
    before unscaling/clipping.  `bucket_cap_mb = 0`: no hooks, everything in `finish()`.
    With one process every call is a no-op.  `close()` (or leaving a `with GradientSync(...)` block) removes
    the hooks."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, world_size: int,
                 bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, group: Any = None) -> None:
        self.world_size = world_size
        self.group = group
        self.bucket_cap_mb = bucket_cap_mb
        self.params = list(params) if world_size > 1 else []
        self._plan(self.params, [])
        self._handles: list[Any] = []
        if world_size > 1 and bucket_cap_mb > 0:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]
        self._armed = False
        self._first_step = True
        self._reset()

    def _plan(self, on_time: list[torch.nn.Parameter], late: list[torch.nn.Parameter]) -> None:
        """Hooks complete the buckets of `on_time`; the buckets of `late` (parameters that lacked a gradient in
        some process at the first step) always wait for `finish()`, so they never hold the others back."""
        hooked = plan_buckets(on_time, self.bucket_cap_mb)
        self.buckets, self._hooked = hooked + plan_buckets(late, self.bucket_cap_mb), len(hooked)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}

    @property
    def overlaps(self) -> bool:
        """Whether all-reduces start from gradient hooks during the backward."""
        return bool(self._handles)

    def _reset(self) -> None:
        self._final: list[set[int]] = [set() for _ in self.buckets]  # ids of the parameters with a final gradient
        self._launched: list[tuple[list[torch.nn.Parameter], torch.Tensor, Any]] = []

    @contextmanager
    def backward(self, *, last: bool) -> Iterator[None]:
        """Around one micro-batch's backward; on the last micro-batch of the step (`last`) the hooks launch the
        all-reduce of every bucket whose gradients are complete."""
        self._armed = last and self.overlaps
        try:
            yield
        finally:
            self._armed = False

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        if i >= self._hooked:
            return
        if i < len(self._launched):
            raise RuntimeError("a parameter's gradient changed after its bucket's all-reduce started (a parameter "
                               "used in two backward passes of one micro-batch, e.g. a reentrant checkpoint); "
                               "set ddp_bucket_cap_mb = 0 to average after the backward")
        self._final[i].add(id(p))
        while len(self._launched) < self._hooked and \
                len(self._final[len(self._launched)]) == len(self.buckets[len(self._launched)]):
            self._launch(len(self._launched))  # in order: every process issues the same collectives in turn

    def _launch(self, i: int) -> None:
        ps = self.buckets[i]
        device, dtype = ps[0].device, ps[0].dtype
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        has = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=device)
        flat = torch.cat([*parts, has])
        work = tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=self.group, async_op=True)
        self._launched.append((ps, flat, work))

    def finish(self) -> None:
        """Every parameter's gradient becomes its mean over the processes (zeros where a process had none;
        `None` stays where no process had one).  Call once per optimizer step, after the last backward and
        before `scaler.unscale_` / clipping: the mean of the scaled gradients is the scaled mean, and an
        Inf/NaN in any process reaches all of them."""
        if self.world_size <= 1:
            return
        for i in range(len(self._launched), len(self.buckets)):
            self._launch(i)
        launched = self._launched
        late: list[torch.nn.Parameter] = []
        for ps, flat, work in launched:
            work.wait()
            n = flat.numel() - len(ps)
            grads = flat[:n].div_(self.world_size)
            # how many processes had each gradient: only needed (a host read) where this one had none, and once
            # at the first step, to put the parameters some process had no gradient for into trailing buckets
            read = self._first_step and self.overlaps
            counts = flat[n:].tolist() if read or any(p.grad is None for p in ps) else None
            if read:
                late += [p for p, count in zip(ps, counts, strict=True) if count < self.world_size]
            offset = 0
            for j, p in enumerate(ps):
                g = grads[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    p.grad.copy_(g)
                elif counts[j] > 0:
                    p.grad = g.clone()
        if self._first_step and late:  # the same counts in every process: the same new plan everywhere
            late_ids = {id(p) for p in late}
            self._plan([p for p in self.params if id(p) not in late_ids], late)
        self._first_step = False
        self._reset()

    def close(self) -> None:
        """Remove the gradient hooks (the parameters are back as they were)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GradientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
