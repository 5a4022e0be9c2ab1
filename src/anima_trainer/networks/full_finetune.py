"""Fine-tuning the DiT's own parameters (kohya's `anima_train.py`): the whole DiT or a selection of it.

`DiTFinetune` gives the training loop the interface it uses from an adapter network (networks/base.py): the
trained tensors (`trainable_parameters`, `state_dict` for training states), kohya's optimizer groups
(`param_groups` with the component learning rates), the saved file (`save`: a whole DiT checkpoint in the base
file's layout, models/dit_checkpoint.py) and the flags the loop reads (`trains_text_encoder`, ...).  It holds no
weights of its own: the selected DiT parameters train in place (requires_grad on), every other parameter stays
frozen (requires_grad off) and untouched.

Selection (`trainable_patterns`): Python regexes searched (`re.search`) in each parameter name of the DiT
(`blocks.14.cross_attn.q_proj.weight`), so `^blocks\\.(1[4-8])\\.` selects blocks 14-18, `\\.cross_attn\\.` the
cross-attention layers and `cross_attn` those plus their adaLN modulation (`adaln_modulation_cross_attn`); a
parameter trains when any pattern matches.  No patterns: every parameter.
The LLM adapter (`llm_adapter.*`) is opt-in (`train_llm_adapter`): without it no llm_adapter parameter is
selected, whatever the patterns say.  Why its own module, not an AdapterNetwork subclass: nothing is injected
and no factor is cast; only the loop-facing names are shared.

Strength (`set_multiplier`): a fine-tune's strength m means what a LoRA's does for its ΔW, and what a ComfyUI
model merge at ratio m gives: W(m) = W0 + m·(W − W0) for every trained tensor, W0 the base file's value (m = 0
the base model, 1 the fine-tune).  It serves the evaluation (drift, response, leak at strength 0 vs 1,
eval_every_n_*) and the preservation loss (the base model's output at strength 0), which hold the network at a
strength only outside a training step's gradient-carrying forward/backward (`evaluation.strength.at_strength`
puts 1 back, also when a measurement raises).  How: with `keep_base` (the loop sets it when the run evaluates or
uses the preservation loss) the network copies W0 when it is built — on the host, pinned when CUDA is available,
in the trained weights' dtype: **2 bytes per trained parameter for bf16 weights, 4 for fp32** of host memory (the
whole DiT, 2.1 B parameters in bf16: ≈ 4.2 GB).  A resumed run builds the network on the freshly loaded base file
before the training state restores the trained values in place, so W0 is the base file's, never the resumed
weights.  At m ≠ 1 each trained parameter's data is replaced by a new tensor W0 + m·(W − W0) (computed in fp32,
cast to the weights' dtype; W0 itself at m = 0) and the trained tensor is kept aside, unchanged: m = 1 puts that
very tensor back, bit for bit, nothing recomputed.  While m ≠ 1 the device holds one more copy of the trained
tensors (the mixed ones).  Replacing `.data` (not writing in place) leaves the parameters' autograd version
counters alone, so the preservation loss's base forward between a step's forward and its backward is safe.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from anima_trainer.fileio import check_writable
from anima_trainer.models.dit import load_dit
from anima_trainer.models.dit_checkpoint import COMFY_FORMAT_METADATA, DitLayout, dit_layout, save_dit_checkpoint
from anima_trainer.models.fp8 import Fp8Linear
from anima_trainer.models.model_files import DIT_KINDS, expect_kind, load_state_dict
from anima_trainer.networks.formats import NetworkError
from anima_trainer.networks.param_groups import COMPONENTS, anima_component

FINETUNE_ALGO = "finetune"
LLM_ADAPTER_PREFIX = "llm_adapter."
ARCHITECTURE_KEY = "modelspec.architecture"


def compile_patterns(patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    """The trainable_patterns as compiled regexes; a broken one is a NetworkError naming it."""
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise NetworkError(f"trainable_patterns: {p!r} is not a regular expression ({e})") from None
    return out


def select_parameters(dit: nn.Module, patterns: Sequence[str] | None = None,
                      train_llm_adapter: bool = False) -> dict[str, nn.Parameter]:
    """{name: parameter} of the DiT that a fine-tune with these settings trains (see the module doc), in the
    DiT's parameter order.  Nothing selected is a NetworkError saying why."""
    compiled = compile_patterns(patterns)
    selected = {}
    for name, p in dit.named_parameters():
        if name.startswith(LLM_ADAPTER_PREFIX) and not train_llm_adapter:
            continue
        if not compiled or any(c.search(name) for c in compiled):
            selected[name] = p
    if not selected:
        adapter_only = any(c.search(n) for c in compiled for n, _ in dit.named_parameters()
                           if n.startswith(LLM_ADAPTER_PREFIX))
        hint = " (they match only LLM-adapter parameters: set train_llm_adapter = true)" if adapter_only else ""
        raise NetworkError(f"trainable_patterns {list(patterns or [])}: no DiT parameter matches{hint}; parameter "
                           "names look like blocks.14.cross_attn.q_proj.weight")
    return selected


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the host, pinned when CUDA is available (fast, asynchronous copies to the device)."""
    out = t.to("cpu", copy=True)
    return out.pin_memory() if torch.cuda.is_available() else out


def read_base_tensors(base_file: str | Path, names: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{name: tensor} of the named DiT tensors (`load_dit`'s names) from the base file, as `load_dit(base_file,
    dtype=dtype)` holds them, bit for bit.  A single file (any DiT prefix, a bundle, scaled fp8) reads only these
    tensors from its mmap; a diffusers layout, whose keys are renamed and split, is loaded whole."""
    info = expect_kind(base_file, "--pretrained_model_name_or_path", DIT_KINDS)
    if info.kind in ("anima_diffusers", "diffusers_dit"):
        state = load_dit(base_file, dtype=dtype).state_dict()
    else:
        state = load_state_dict(base_file, prefix=info.components.get("dit", info.prefix), dtype=dtype,
                                names=set(names))
    missing = [n for n in names if n not in state]
    if missing:
        raise NetworkError(f"{base_file}: no DiT tensor {missing[0]} (fp8-stored frozen weights are saved with the "
                           "base file's values)")
    return {n: state[n] for n in names}


class DiTFinetune(nn.Module):
    """The selected parameters of one DiT, trained in place (see the module doc).  `base_file`: the DiT file (or
    diffusers folder) the DiT was loaded from; saves follow its layout (None: no `save`)."""

    algo = FINETUNE_ALGO

    def __init__(self, dit: nn.Module, *, trainable_patterns: Sequence[str] | None = None,
                 train_llm_adapter: bool = False, base_file: str | Path | None = None,
                 keep_base: bool = True) -> None:
        super().__init__()
        self._dit = (dit,)  # not a submodule: .to() / state_dict() must not reach the whole DiT
        self.trainable_patterns = list(trainable_patterns or [])
        self.train_llm_adapter_opt = bool(train_llm_adapter)
        self.selected: dict[str, nn.Parameter] = select_parameters(dit, trainable_patterns, train_llm_adapter)
        dit.requires_grad_(False)
        for p in self.selected.values():
            p.requires_grad_(True)
        self.base_file = Path(base_file) if base_file is not None else None
        self._layout: DitLayout | None = None
        # strength (module doc): the base values W0 on the host, the trained tensors aside while the strength ≠ 1
        self._base: dict[str, torch.Tensor] | None = (
            {n: _host_copy(p.detach()) for n, p in self.selected.items()} if keep_base else None)
        self._trained: dict[str, torch.Tensor] = {}
        self.multiplier = 1.0
        # the adapter-network names the loop and its helpers read: a fine-tune has no modules or norm gains
        self.lora_modules: list = []
        self.modules_by_name: dict = {}
        self.norms_by_name: dict = {}

    @property
    def dit(self) -> nn.Module:
        return self._dit[0]

    @property
    def text_encoder(self) -> None:
        return None

    trains_text_encoder = False
    trains_dit = True

    @property
    def trains_llm_adapter(self) -> bool:
        """Whether an LLM-adapter parameter trains (then its output cannot be cached)."""
        return any(n.startswith(LLM_ADAPTER_PREFIX) and p.requires_grad for n, p in self.selected.items())

    def dit_modules(self) -> list:
        return []

    def text_encoder_modules(self) -> list:
        return []

    def parameter_count(self) -> int:
        """How many DiT weights train (the start-up line)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def target_table(self) -> list[tuple[str, str, int, float, str]]:
        """(parameter name, "finetune", elements, 0, component) per selected parameter."""
        return [(n, self.algo, p.numel(), 0.0, anima_component(n)) for n, p in self.selected.items()]

    # ---------------------------------------------------------------------------------- what trains --
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The selected parameters still trained (a component at lr 0 is frozen by `param_groups`)."""
        return [p for p in self.selected.values() if p.requires_grad]

    def param_groups(self, lr: float, component_lrs: dict[str, float | None] | None = None,
                     text_encoder_lr: float | None = None) -> list[dict]:
        """kohya's get_anima_param_groups: each selected parameter in the group of its component
        (`anima_component`: self_attn, cross_attn, mlp, mod, llm_adapter, else base) at that component's lr
        (None: `lr`); a component at lr 0 is frozen (requires_grad off, no group).  `text_encoder_lr` is
        unused (a fine-tune trains no text encoder)."""
        comp = {k: v for k, v in (component_lrs or {}).items() if v is not None}
        unknown = sorted(set(comp) - set(COMPONENTS))
        if unknown:
            raise NetworkError(f"unknown component lr(s) {unknown}; known: {list(COMPONENTS)}")
        groups: dict[str, dict] = {}
        for name, p in self.selected.items():
            component = anima_component(name)
            group_lr = comp.get(component, lr)
            if group_lr == 0:
                p.requires_grad_(False)
                continue
            key = component if component in comp else "base"
            groups.setdefault(key, {"params": [], "lr": group_lr, "name": key})["params"].append(p)
        if not groups:
            raise NetworkError("every selected parameter is in a component at lr 0: nothing trains")
        return list(groups.values())

    def set_multiplier(self, m: float) -> None:
        """The trained tensors at strength `m`: W0 + m·(W − W0); 1 puts the trained tensors back bit for bit (see
        the module doc).  Without the base copy (`keep_base` off) only 1 is possible."""
        m = float(m)
        if m == 1.0 and not self._trained:
            self.multiplier = 1.0
            return
        if m != 1.0 and self._base is None:
            raise NetworkError(f"this fine-tune was built without a copy of its base weights (keep_base), so it "
                               f"cannot be set to strength {m:g}")
        with torch.no_grad():
            for name, p in self.selected.items():
                trained = self._trained.get(name, p.data)
                if m == 1.0:
                    p.data = trained
                    continue
                self._trained[name] = trained  # aside before p.data changes: a failure below loses nothing
                base = self._base[name].to(trained.device, copy=True, non_blocking=True)
                p.data = base.to(trained.dtype) if m == 0.0 else (
                    base.float() + m * (trained.float() - base.float())).to(trained.dtype)
        if m == 1.0:
            self._trained.clear()
        self.multiplier = m

    def inject(self) -> None:
        """Nothing to inject: the DiT's own parameters train."""

    def remove(self) -> None:
        """Nothing to remove: the trained parameters are the DiT's."""

    def cast_trainable(self, dtype: torch.dtype) -> None:
        """full_bf16 / full_fp16: the trained parameters (and so their gradients and optimizer state) in `dtype`."""
        if self._trained:
            raise NetworkError("cast_trainable at a strength other than 1: set_multiplier(1) first")
        for p in self.selected.values():
            p.data = p.data.to(dtype)
        if self._base is not None:  # W0 in the weights' dtype (the same rounding as the weights' own cast)
            self._base = {n: _host_copy(b.to(dtype)) for n, b in self._base.items()}

    def max_norm_notice(self) -> str | None:
        return None

    # ---------------------------------------------------------------------------------------- files --
    def _dense_state(self) -> dict[str, torch.Tensor]:
        """The DiT's state for a checkpoint: frozen Linears stored in fp8 (fp8_base, models/fp8.py) are written
        with the base file's weights, read again (so the file holds what the run's non-fp8 twin would)."""
        state = self.dit.state_dict()
        fp8 = {path: m for path, m in self.dit.named_modules() if isinstance(m, Fp8Linear)}
        if not fp8:
            return state
        if self.base_file is None:
            raise NetworkError("fp8-stored frozen weights need the base file to be saved")
        base = read_base_tensors(self.base_file, [f"{path}.weight" for path in fp8],
                            dtype=next(iter(fp8.values())).compute_dtype)
        for path in fp8:
            state[f"{path}.weight"] = base[f"{path}.weight"]
            del state[f"{path}.weight_scale"]
        return state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """{name: live parameter} of the selected parameters: what a training state holds and restores in place
        (the frozen rest is the base file's)."""
        return dict(self.selected)

    def load_weights(self, path: str | Path) -> list[str]:
        """Load the selected parameters from a DiT checkpoint (any layout `load_dit` reads, e.g. an earlier
        fine-tune's file); returns the names of the parameters set.  A missing or misshaped one is an error."""

        state = load_dit(path, dtype=torch.float32).state_dict()
        with torch.no_grad():
            for name, p in self.selected.items():
                if name not in state or state[name].shape != p.shape:
                    raise NetworkError(f"{path}: no DiT tensor {name} of shape {list(p.shape)}")
                p.copy_(state[name].to(p.dtype))
        return list(self.selected)

    def metadata(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The checkpoint's metadata: the caller's `extra` (the run's metadata) without what describes an adapter
        (`ss_network_*`; modelspec's architecture without its `/lora` part: this is a whole model), kohya's
        `format=pt`, what was trained."""
        meta = {k: v for k, v in (extra or {}).items() if not k.startswith("ss_network_")}
        if meta.get(ARCHITECTURE_KEY, "").endswith("/lora"):
            meta[ARCHITECTURE_KEY] = meta[ARCHITECTURE_KEY][:-len("/lora")]
        meta.update({**COMFY_FORMAT_METADATA, "anima_trainer_training_mode": FINETUNE_ALGO})
        if self.trainable_patterns:
            meta["anima_trainer_trainable_patterns"] = repr(self.trainable_patterns)
        meta["anima_trainer_train_llm_adapter"] = str(self.train_llm_adapter_opt).lower()
        return meta

    def layout(self) -> DitLayout:
        if self.base_file is None:
            raise NetworkError("this fine-tune was created without its base file: there is no layout to save in")
        if self._layout is None:
            self._layout = dit_layout(self.base_file)
        return self._layout

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
             overwrite: bool = False, save_format: str = "comfy", state: dict[str, torch.Tensor] | None = None) -> Path:
        """The whole DiT as a checkpoint ComfyUI loads as a diffusion model (the base file's key layout: see
        models/dit_checkpoint.py) in `dtype` (None: the base file's dtypes); atomic, NaN/Inf refused, key-checked.
        `save_format` is an adapter-file setting and does not apply.  `state`: the DiT's weights when they are
        not `self.dit.state_dict()` (a sharded DiT's, gathered: train/sharded_run.py)."""

        path = Path(path)
        if path.suffix != ".safetensors":
            raise NetworkError(f"{path}: DiT checkpoints are written as .safetensors")
        check_writable(path, overwrite)
        weights = self._dense_state() if state is None else state
        return save_dit_checkpoint(self.layout(), weights, path, save_dtype=dtype,
                                   metadata=self.metadata(metadata), what="fine-tuned DiT ",
                                   check=lambda _tmp: check_writable(path, overwrite))
