"""LoRA for the Anima DiT: y = W x + multiplier · (alpha/dim) · up(dropout(down(x))).

Parameters are always fp32; the branch runs in the input's dtype (weights cast in forward), so a bf16 DiT,
autocast and non-reentrant checkpointing all work.  `down` is Kaiming-uniform (a=√5), `up` zero, so the
network starts as the identity.  Files use ComfyUI's native names (`diffusion_model.<path>.lora_down.weight`
[r, in], `.lora_up.weight` [out, r], `.alpha` fp32 scalar); kohya's `lora_unet_<path_>` files load too.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import anima_trainer
from anima_trainer.fileio import atomic_save, check_writable
from anima_trainer.networks.formats import COMFY_PREFIX, KOHYA_PREFIX, NetworkError, check_comfy_keys
from anima_trainer.networks.inject import ForwardHook, check_network_args, find_targets

NETWORK_MODULE = "anima_trainer.networks.lora"
# suffix in a file → (our tensor, spelling); lora_A/lora_B is what kohya's ComfyUI converter writes
LOAD_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
                 ".lora_B.weight": "up", ".alpha": "alpha"}


class LoRAModule(nn.Module):
    """The low-rank branch for one Linear; hooked into the Linear's forward by `inject()`."""

    def __init__(self, path: str, org: nn.Linear, dim: int, alpha: float, dropout: float | None) -> None:
        super().__init__()
        self.path = path
        self.in_features, self.out_features = org.in_features, org.out_features
        device = org.weight.device  # fp32 on the DiT's device (meta stays meta: shapes only)
        self.lora_down = nn.Linear(self.in_features, dim, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(dim, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dim = dim
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=device))
        self.scale = float(alpha) / dim
        self.dropout = dropout
        self.multiplier = 1.0
        self._org = (org,)  # a tuple: not registered as a submodule, so no DiT weights in our state_dict
        self._hook: ForwardHook | None = None

    def inject(self) -> None:
        self._hook = ForwardHook(self._org[0], self.forward)

    def restore(self) -> None:
        if self._hook is not None:
            self._hook.restore()
            self._hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._hook.org_forward(x)
        if self.multiplier == 0.0:
            return out
        lx = F.linear(x, self.lora_down.weight.to(x.dtype))
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        lx = F.linear(lx, self.lora_up.weight.to(lx.dtype))
        return out + lx * (self.multiplier * self.scale)

    def delta_weight(self) -> torch.Tensor:
        """alpha/dim · up @ down in fp32 (what a merge adds to W at multiplier 1)."""
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)


class LoRANetwork(nn.Module):
    """All LoRA modules of one DiT; created already injected by `create_network`."""

    def __init__(self, dit: nn.Module, dim: int, alpha: float, dropout: float | None,
                 network_args: dict[str, Any]) -> None:
        super().__init__()
        parsed = check_network_args(network_args)
        targets = find_targets(dit, parsed["include_patterns"], parsed["exclude_patterns"],
                               parsed["train_llm_adapter"])
        if not targets:
            raise NetworkError("no DiT module matches the network targets; check include_patterns/exclude_patterns")
        self.dim, self.alpha, self.dropout = dim, float(alpha), dropout
        self.network_args = {k: (v if isinstance(v, str) else repr(v)) for k, v in network_args.items()}
        self._dit = (dit,)
        self.lora_modules = nn.ModuleList(LoRAModule(p, m, dim, alpha, dropout) for p, m in targets.items())
        self.modules_by_name: dict[str, LoRAModule] = {m.path: m for m in self.lora_modules}
        self.injected = False
        self.inject()

    # ------------------------------------------------------------------------------------ lifecycle --
    def inject(self) -> None:
        if self.injected:
            return
        done = []
        try:
            for m in self.lora_modules:
                m.inject()
                done.append(m)
        except NetworkError:
            for m in done:
                m.restore()
            raise
        self.injected = True

    def remove(self) -> None:
        """Restore the DiT's original forwards (the network keeps its weights; `inject()` re-hooks)."""
        for m in self.lora_modules:
            m.restore()
        self.injected = False

    def set_multiplier(self, m: float) -> None:
        for module in self.lora_modules:
            module.multiplier = float(m)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.lora_modules for p in (m.lora_down.weight, m.lora_up.weight)]

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": self.trainable_parameters(), "lr": float(lr)}]

    # ----------------------------------------------------------------------------------------- files --
    def state_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors `save` writes, ComfyUI-native names; weights in `dtype` (default fp32), alpha fp32."""
        dtype = dtype or torch.float32
        out = {}
        for m in self.lora_modules:
            key = COMFY_PREFIX + m.path
            out[key + ".lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[key + ".lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[key + ".alpha"] = m.alpha.detach().to("cpu", torch.float32).clone()
        return out

    def metadata(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        meta = {}
        for k, v in (extra or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise NetworkError(f"metadata {k!r}: keys and values must be str (got {type(v).__name__}); "
                                   "stringify numbers, json.dumps structures")
            meta[k] = v
        # dim/alpha describe this file and always win; module name and args may come from the caller
        meta.setdefault("ss_network_module", NETWORK_MODULE)
        if self.network_args:
            meta.setdefault("ss_network_args", json.dumps(self.network_args, sort_keys=True))
        meta.update({"ss_network_dim": str(self.dim), "ss_network_alpha": str(self.alpha),
                     "anima_trainer_version": anima_trainer.__version__})
        return meta

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
             overwrite: bool = False) -> Path:
        """Atomic write; the file is checked against ComfyUI's key rules before it takes `path`'s name."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise NetworkError(f"{path}: network files are .safetensors")
        check_writable(path, overwrite)
        tmp = path.with_name(f".{path.name}.check.tmp")
        atomic_save(self.state_tensors(dtype), tmp, self.metadata(metadata))
        try:
            check_comfy_keys(tmp, self._dit[0])
            check_writable(path, overwrite)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def load_weights(self, path: str | Path) -> None:
        """Load our (`diffusion_model.*`) or kohya (`lora_unet_*`) LoRA file into this network, strictly."""
        path = Path(path)
        if not path.is_file():
            raise NetworkError(f"network weights {path} do not exist")
        with safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        names = {}
        for p in self.modules_by_name:
            names[COMFY_PREFIX + p] = p
            names[KOHYA_PREFIX + p.replace(".", "_")] = p
        found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        unknown = []
        for key, tensor in sd.items():
            hit = next(((key[: -len(s)], r) for s, r in LOAD_SUFFIXES.items()
                        if key.endswith(s) and key[: -len(s)] in names), None)
            if hit is None:
                unknown.append(key)
                continue
            slot = found.setdefault(names[hit[0]], {})
            if hit[1] in slot:
                raise NetworkError(f"{path}: module {names[hit[0]]} appears twice ({slot[hit[1]][0]} and {key})")
            slot[hit[1]] = (key, tensor)
        if unknown:
            raise NetworkError(f"{path}: {len(unknown)} key(s) are not LoRA weights of this network's modules "
                               f"(different targets or algorithm?): {sorted(unknown)[:8]}")
        missing = [p for p in self.modules_by_name if not {"down", "up"} <= set(found.get(p, {}))]
        if missing:
            raise NetworkError(f"{path}: no lora_down/lora_up weights for {len(missing)} module(s) of this "
                               f"network: {missing[:8]}")
        for p, m in self.modules_by_name.items():
            slot = found[p]
            down, up = slot["down"][1], slot["up"][1]
            if down.dim() != 2 or up.dim() != 2 or down.shape[1] != m.in_features or up.shape[0] != m.out_features:
                raise NetworkError(f"{path}: module {p}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do "
                                   f"not fit Linear({m.in_features}->{m.out_features})")
            if down.shape[0] != m.dim or up.shape[1] != m.dim:
                raise NetworkError(f"{path}: module {p}: file has dim (rank) {down.shape[0]}, network has dim "
                                   f"{m.dim}; create the network with dim={down.shape[0]}")
            file_alpha = slot["alpha"][1] if "alpha" in slot else torch.tensor(float(m.dim))  # ComfyUI: none = rank
            ours = torch.tensor(self.alpha, dtype=file_alpha.dtype)
            if float(file_alpha) != float(ours):
                raise NetworkError(f"{path}: module {p}: file has alpha {float(file_alpha):g}, network has alpha "
                                   f"{self.alpha:g}; create the network with alpha={float(file_alpha):g}")
        with torch.no_grad():
            for p, slot in found.items():
                m = self.modules_by_name[p]
                m.lora_down.weight.copy_(slot["down"][1].to(torch.float32))
                m.lora_up.weight.copy_(slot["up"][1].to(torch.float32))


def create_network(dit: nn.Module, algo: str = "lora", dim: int = 4, alpha: float | None = 1.0,
                   dropout: float | None = None, **network_args: Any) -> LoRANetwork:
    """Build a network for `dit` and inject it (the DiT's forwards now include the adapter branch)."""
    if algo != "lora":
        raise NetworkError(f"algo={algo!r} is not supported yet; use algo='lora'")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise NetworkError(f"network dim must be a positive integer, got {dim!r}")
    if alpha is None or alpha == 0:  # kohya: no alpha means alpha = dim (scale 1)
        alpha = float(dim)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise NetworkError(f"network alpha must be a finite number >= 0, got {alpha!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise NetworkError(f"network_dropout must be in [0, 1), got {dropout!r}")
    return LoRANetwork(dit, dim, float(alpha), float(dropout) if dropout else None, network_args)
