"""Sharded fine-tuning of the DiT across processes with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

The engine is torch's; this module only decides how the DiT is cut and how its state is saved:

- **Block-level wrapping** (`shard_dit`): one FSDP unit per DiT block, one for the LLM adapter when it
  trains (a frozen one stays whole in every process: `shard_units`), then the root (patch embedding, timestep
  embedding, final layer) — the wrapping accelerate's FSDP2 plugin applies with `transformer_cls_names_to_wrap`.
  `dit.encode_context` (the adapter's entry, called outside `dit.forward`) is registered as a forward method of
  the root when the adapter trains, so its unit gathers there too.  Each
  unit's parameters are sharded over the processes (dim 0, DTensors); a unit's full weights exist only while
  its forward or backward runs.  Gradients are reduce-scattered (averaged) per unit during the backward, so
  each process keeps only its shard of the gradients and of the optimizer state.
- **Mixed precision** (`mixed_precision_policy`, `upcast_trained`): the trained parameters are fp32 (the
  sharded master copy the optimizer steps: a bf16 run's are upcast before sharding, kohya's meaning of
  mixed_precision bf16), all-gathered in bf16 for compute, and gradients are reduced in fp32 — on CUDA always,
  on the CPU (gloo, which all-gathers bf16) when asked (`compute_dtype`, a bf16 run); a CPU fp32 run casts
  nothing.  Block inputs are never cast by FSDP (`cast_forward_inputs=False`): the DiT keeps its own fp32
  residual stream under bf16 weights exactly as it does unsharded.
- **Frozen parameters** (a partial fine-tune): FSDP2 allows frozen and trained parameters in one unit (frozen
  ones are sharded too and get no gradient or reduce-scatter) but needs one dtype among each unit's *trained*
  parameters; `shard_dit` checks that before sharding and names the unit.  A fully frozen block is sharded as
  well: it costs no gradient or optimizer memory and only 1/N of its weights.
- **State**: `save_sharded` / `load_sharded` write and read model + optimizer state with torch.distributed
  .checkpoint (DCP: one file per process plus metadata, re-shardable to another process count), through
  `get_state_dict` / `set_state_dict`, so a resumed run continues bitwise; `full_state_dict` gathers the
  unsharded weights on rank 0 (CPU) for the final checkpoint file.

Why `fully_shard` directly and not `accelerator.prepare` with `FullyShardedDataParallelPlugin(fsdp_version=2)`:
see docs/DESIGN.md ("FSDP2 without accelerator.prepare").  `accelerate launch --num_processes N` remains the
launch path (docs/multi_gpu.md, "Fine-tuning across GPUs (FSDP2)").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from anima_trainer.train.training_state import SHARDED_STATE

SHARDED_FOLDER = SHARDED_STATE  # inside a state folder: the DCP checkpoint (__0_0.distcp, …, .metadata)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (its memory, not a copy); a plain tensor as it is (unsharded runs)."""
    return t.to_local() if hasattr(t, "to_local") else t


def mixed_precision_policy(device: torch.device | str,
                           compute_dtype: torch.dtype | None = None) -> MixedPrecisionPolicy:
    """FSDP2's precision policy: all-gather and compute in `compute_dtype` with fp32 gradient reduction, on any
    device (gloo all-gathers bf16 too); `compute_dtype` None is bf16 on CUDA and no casts at all elsewhere (the
    CPU under gloo, where an fp32 run is compared with an unsharded fp32 one).  Inputs are never cast by FSDP:
    the DiT casts them itself and keeps its residual stream fp32 under reduced-precision weights."""
    if compute_dtype is None and torch.device(device).type != "cuda":
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=compute_dtype or torch.bfloat16, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def upcast_trained(dit: nn.Module) -> int:
    """Every trained parameter of `dit` to fp32 in place, before sharding (frozen ones keep their dtype): the
    fp32 master copy that each process then holds 1/N of, while `mixed_precision_policy(..., bf16)` gathers
    and computes in bf16.  Returns how many tensors were upcast."""
    upcast = 0
    for p in dit.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            upcast += 1
    return upcast


def trains_llm_adapter(dit: nn.Module) -> bool:
    """Whether the model has an LLM adapter and any of its parameters trains."""
    adapter = getattr(dit, "llm_adapter", None)
    return adapter is not None and any(p.requires_grad for p in adapter.parameters())


def shard_units(dit: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every FSDP unit below the root, in forward order: each DiT block, then the LLM
    adapter when it trains.  The root unit (everything else) is the DiT itself.  A frozen LLM adapter is not
    sharded at all (`unsharded_parameters`): it runs in `encode_context`, which each process calls as often as
    its own captions need (memoised contexts, its share of a cache), and a sharded unit would make every such
    call a collective that the other processes do not join."""
    units = [(f"blocks.{i}", block) for i, block in enumerate(dit.blocks)]
    if trains_llm_adapter(dit):
        units.append(("llm_adapter", dit.llm_adapter))
    return units


def unsharded_parameters(dit: nn.Module) -> set[nn.Parameter]:
    """The parameters `shard_dit` leaves whole in every process: a frozen LLM adapter's (see `shard_units`)."""
    adapter = getattr(dit, "llm_adapter", None)
    return set() if adapter is None or trains_llm_adapter(dit) else set(adapter.parameters())


def _own_parameters(name: str, module: nn.Module, inner: set[int]) -> Iterator[tuple[str, nn.Parameter]]:
    for pname, p in module.named_parameters():
        if id(p) not in inner:
            yield f"{name}.{pname}" if name else pname, p


def check_trained_dtypes(dit: nn.Module) -> None:
    """ValueError naming the unit when one FSDP unit's trained parameters have more than one dtype (FSDP2
    reduce-scatters a unit's gradients as one buffer); frozen parameters may have any dtype."""
    units = shard_units(dit)
    inner = {id(p) for _, m in units for p in m.parameters()} | {id(p) for p in unsharded_parameters(dit)}
    for name, params in [*[(n, list(_own_parameters(n, m, set()))) for n, m in units],
                         ("the root (embeddings, final layer)", list(_own_parameters("", dit, inner)))]:
        dtypes = {p.dtype for _, p in params if p.requires_grad}
        if len(dtypes) > 1:
            listed = ", ".join(f"{n} {p.dtype}" for n, p in params if p.requires_grad)
            raise ValueError(f"FSDP unit {name} trains parameters of several dtypes ({listed}); FSDP2 needs one "
                             "dtype per unit's trained parameters: keep the trained ones fp32 (the master copy)")


def shard_dit(dit: nn.Module, *, device: torch.device | str, mp_policy: MixedPrecisionPolicy | None = None,
              reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """Shard `dit` in place over the default process group (or `mesh`) with FSDP2, block by block then the
    root, and return it.  Set `requires_grad` (the fine-tune selection) BEFORE calling this, and build the
    optimizer AFTER it from `dit.parameters()` that require grad: sharding replaces every parameter by a
    DTensor shard.  Block swap and activation offload stream whole weights between CPU and device and cannot
    run on shards; they are refused.  `reshard_after_forward=False` keeps each block's full weights from the
    forward to its backward (one all-gather less per block, ZeRO-2-like memory).  `mp_policy`: None is
    `mixed_precision_policy(device)`; frozen parameters may be stored in bf16 beside fp32 trained ones."""
    runner = getattr(dit, "runner", None)
    if runner is not None and (runner.swapper is not None or runner.offloader is not None):
        raise ValueError("blocks_to_swap and activation offload cannot be combined with FSDP sharding: each "
                         "process already holds only 1/N of the weights; turn them off")
    check_trained_dtypes(dit)
    if not tdist.is_initialized():
        raise RuntimeError("shard_dit needs an initialised process group (accelerate launch / torchrun)")
    options = {"mesh": mesh, "mp_policy": mp_policy or mixed_precision_policy(device)}
    if torch.device(device).type != "cpu":
        dit.to(device)
    for _, unit in shard_units(dit):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    # the root: its parameters stay gathered between forward and backward
    fully_shard(dit, ignored_params=unsharded_parameters(dit) or None, **options)
    if trains_llm_adapter(dit):
        # the adapter runs in `encode_context`, outside `dit.forward`: without the root's hooks there the
        # adapter's unit would be initialised as a root of its own and the first call fails
        register_fsdp_forward_method(dit, "encode_context")
    return dit


def is_sharded(module: nn.Module) -> bool:
    """Whether `shard_dit` (or any `fully_shard`) has wrapped `module`."""
    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> None:
    """Free every unit's gathered weights below `module` (and its own): the root keeps its weights gathered
    after a forward for the backward, so after a forward without one (a preview, the validation) the next
    forward would reuse them even when the sharded weights were changed in between (the EMA swapped in or
    out); after this, the next forward gathers the shards as they are."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextmanager
def micro_batch(dit: nn.Module, *, last: bool) -> Iterator[None]:
    """Gradient accumulation under FSDP2: the backward inside reduce-scatters gradients only for the step's
    `last` micro-batch; earlier ones accumulate unsharded local gradients (more memory, one reduction per
    step — the same contract as the data-parallel `GradientSync.backward(last=...)`)."""
    dit.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        dit.set_requires_gradient_sync(True)


def save_sharded(folder: str | Path, dit: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the sharded model and optimizer state to `folder`/fsdp with DCP (every process writes its own
    shards; collective: all processes call it), and `extra` (DTensors laid out like the parameters: the EMA's
    shadows, `NetworkEMA.sharded_state`) when given.  Returns the DCP folder."""
    target = Path(folder) / SHARDED_FOLDER
    model_state, optim_state = get_state_dict(dit, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, **({"extra": extra} if extra else {})},
             checkpoint_id=str(target))
    return target


def load_sharded(folder: str | Path, dit: nn.Module, optimizer: torch.optim.Optimizer, *,
                 model_only: bool = False, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Read what `save_sharded` wrote into the sharded `dit` and its `optimizer` (collective).  The model must
    be sharded and the optimizer built the same way as when it was saved (the process count may differ:
    DCP re-shards).  `model_only`: the weights only, the optimizer keeps its (fresh) state.  `extra`: the
    DTensors saved as `extra`, loaded in place (they must have been saved)."""
    more = {"extra": extra} if extra else {}
    if model_only:
        model_state = get_model_state_dict(dit)
        dcp.load({"model": model_state, **more}, checkpoint_id=str(Path(folder) / SHARDED_FOLDER))
        set_model_state_dict(dit, model_state)
        return
    model_state, optim_state = get_state_dict(dit, optimizer)
    state = {"model": model_state, "optimizer": optim_state, **more}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_FOLDER))
    set_state_dict(dit, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(dit: nn.Module, *, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights, keyed by the DiT's parameter names (the checkpoint keys), as CPU tensors on rank 0
    and an empty dict on the other ranks (collective: all processes call it).  `trained_only` keeps only the
    parameters that require grad (for a partial fine-tune's delta)."""
    state = get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trained_only:
        trained = {name for name, p in dit.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return state
