"""`anima-trainer extract`: a fine-tuned DiT turned into a LoRA (the reverse of `merge`).

For every target Linear of the DiT, ΔW = W_tuned − W_base (fp32) is cut to rank R by a truncated SVD,
ΔW ≈ U_R·diag(S_R)·Vh_R, and written as `lora_up = U_R·diag(√S_R)` [out, R], `lora_down = diag(√S_R)·Vh_R`
[R, in], `alpha = R` (scale 1), under ComfyUI's names (`diffusion_model.<path>.lora_up.weight`, ...).  kohya's
`extract_lora_from_models.py` puts all of S into lora_up; the product is the same, the balanced split keeps
both factors on one scale (lower-precision storage, further training, clamping one quantile over both).

* The SVD is by default the exact `torch.linalg.svd`: the cut is the optimal rank-R approximation
  (Eckart–Young), so the reported error is the true optimum and does not depend on a random seed.  Its cost
  grows with out·in·min(out, in) whatever R is (bench/extract_svd.py: about 4 minutes per 2B block on 2 shared
  CPU cores), so `svd="lowrank"` offers `torch.svd_lowrank` (randomised, R + 8 columns, 7 power iterations,
  seed 0: cost ∝ out·in·R): close to the optimum when the spectrum decays, and the report measures what it
  lost either way.
* `clamp_quantile` (kohya's default 0.99; off by default here, so a full-rank extract is exact): both
  factors are clamped to ±the q-quantile of their values, trimming outliers at some cost in accuracy.
* Targets: the Linears a LoRA trains by default (networks/inject.py `find_targets`), every Linear
  (`all_linears`), or those whose path full-matches one of `targets` (regexes).
* Every other tensor that changed (norm gains, biases, the adapter's embedding, Linears outside the targets)
  is reported with its relative change as not representable by this LoRA; with `diffs` it is written as a
  ComfyUI full difference instead (`.diff` for a weight, `.diff_b` for a bias: docs/comfyui_formats.md §3).
* The report: per module the relative error ‖ΔW − up·down‖_F / ‖ΔW‖_F (measured on the factors as saved) and
  the retained energy Σ_{i<R} S_i² / Σ S_i²; written as JSON beside the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import anima_trainer
from anima_trainer.fileio import atomic_write_bytes, check_writable
from anima_trainer.models.model_files import expect_kind, load_state_dict
from anima_trainer.networks.convert import build_meta_dit
from anima_trainer.networks.formats import COMFY_PREFIX, NetworkError, check_comfy_keys
from anima_trainer.networks.hashes import addnet_hash_safetensors, with_hashes
from anima_trainer.networks.inject import find_targets
from anima_trainer.networks.lora import NETWORK_MODULE as LORA_MODULE
from anima_trainer.tensor_files import atomic_save

KOHYA_CLAMP_QUANTILE = 0.99  # kohya's extract_lora_from_models.py default
EXTRACT_META = "anima_trainer_extract"
SVD_METHODS = ("exact", "lowrank")
LOWRANK_OVERSAMPLE = 8   # extra columns of the random range finder
LOWRANK_ITERATIONS = 7   # power iterations: sharpen a slowly decaying spectrum
SVD_DESCRIPTIONS = {"exact": "torch.linalg.svd (exact, fp32)",
                    "lowrank": f"torch.svd_lowrank (randomised: rank + {LOWRANK_OVERSAMPLE} columns, "
                               f"{LOWRANK_ITERATIONS} power iterations, seed 0; fp32)"}
DIT_FILE_KINDS = ("anima_dit", "anima_bundle")


@dataclass
class ModuleFit:
    """How well one module's ΔW is represented by its rank-`rank` factors."""

    module: str
    shape: list[int]
    rank: int
    relative_error: float    # ‖ΔW − up·down‖_F / ‖ΔW‖_F with the factors as saved (dtype, clamping)
    retained_energy: float   # Σ_{i<rank} S_i² / ‖ΔW‖_F² (1.0: the cut drops nothing)
    delta_norm: float        # ‖ΔW‖_F
    relative_change: float   # ‖ΔW‖_F / ‖W_base‖_F


@dataclass
class ExtractResult:
    """What `extract_lora` wrote and measured (the JSON report is `asdict` of it)."""

    written: str
    report: str
    base: dict[str, str]
    tuned: dict[str, str]
    rank: int
    targets: str
    clamp_quantile: float | None
    svd: str
    save_precision: str
    modules: list[ModuleFit] = field(default_factory=list)       # worst (highest relative error) first
    unchanged: list[str] = field(default_factory=list)           # target modules whose ΔW is exactly zero
    not_extracted: list[dict] = field(default_factory=list)      # other changed tensors: name, kind, change
    summary: dict = field(default_factory=dict)


def report_path(out: str | Path) -> Path:
    """The report's default place: `<out without .safetensors>.extract.json` beside the file."""
    out = Path(out)
    return out.with_name(out.stem + ".extract.json")


def select_targets(dit: nn.Module, *, all_linears: bool = False,
                   targets: list[str] | None = None) -> dict[str, nn.Linear]:
    """{module path: Linear} to extract: the default LoRA targets, every Linear, or those whose path full-matches
    one of `targets` (an entry that matches no Linear is an error naming it)."""
    linears = {n: m for n, m in dit.named_modules() if isinstance(m, nn.Linear) and n}
    if all_linears and targets:
        raise NetworkError("extract: --all-linears and --targets choose the modules two ways; give one of them")
    if all_linears:
        return linears
    if not targets:
        return find_targets(dit)
    chosen: dict[str, nn.Linear] = {}
    for t in targets:
        try:
            pattern = re.compile(t)
        except re.error as e:
            raise NetworkError(f"extract --targets {t!r}: not a regular expression ({e})") from None
        hits = [n for n in linears if pattern.fullmatch(n)]
        if not hits:
            raise NetworkError(f"extract --targets {t!r} full-matches no Linear of the DiT (paths look like "
                               "'blocks.0.self_attn.q_proj'; e.g. 'blocks\\.\\d+\\.(self|cross)_attn\\..*')")
        chosen.update(dict.fromkeys(hits))
    return {n: linears[n] for n in linears if n in chosen}


def check_svd_method(svd: str) -> None:
    """Refuse an unknown `svd` method, naming the flag and the choices."""
    if svd not in SVD_METHODS:
        raise NetworkError(f"extract --svd {svd!r}: one of {', '.join(SVD_METHODS)}")


def low_rank_factors(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None, svd: str = "exact"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in], the singular values found) of the fp32 matrix `delta`, r = min(rank, *shape).

    up = U_r·diag(√S_r), down = diag(√S_r)·Vh_r, so with `svd="exact"` up·down is the best rank-r approximation
    (`"lowrank"`: torch.svd_lowrank's estimate, module doc); with `clamp_quantile` q < 1 both factors are clamped
    to ±(the q-quantile of their values), as kohya does."""
    check_svd_method(svd)
    columns = min(rank + LOWRANK_OVERSAMPLE, *delta.shape)
    if svd == "lowrank" and columns < min(delta.shape):
        with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
            torch.manual_seed(0)  # the same file for the same inputs
            u, s, v = torch.svd_lowrank(delta, q=columns, niter=LOWRANK_ITERATIONS)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel(), *delta.shape)
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()])
        k = min(values.numel(), max(1, math.ceil(clamp_quantile * values.numel())))
        high = values.kthvalue(k).values  # torch.quantile refuses inputs over 2^24 values
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return up, down, s


def _fit(path: str, delta: torch.Tensor, base_norm: float, up: torch.Tensor, down: torch.Tensor,
         s: torch.Tensor) -> ModuleFit:
    """The module's report row; `up`/`down` are the factors as saved (their rounding counts)."""
    norm = float(torch.linalg.vector_norm(delta))
    rest = delta - up.to(delta) @ down.to(delta)
    r = up.shape[1]
    return ModuleFit(module=path, shape=list(delta.shape), rank=r,
                     relative_error=float(torch.linalg.vector_norm(rest)) / norm,
                     retained_energy=float(s[:r].double().square().sum()) / norm**2, delta_norm=norm,
                     relative_change=norm / base_norm if base_norm > 0 else math.inf)


def _tensor_kind(name: str, dit: nn.Module, linears: set[str]) -> str:
    """What a changed tensor that is not extracted is, in words (the report's `kind`)."""
    module, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return "bias"
    if leaf == "weight" and module in linears:
        return "Linear outside the targets"
    try:
        owner = dit.get_submodule(module)
    except AttributeError:
        return "tensor"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if "norm" in type(owner).__name__.lower() or "norm" in module.rsplit(".", 1)[-1]:
        return "norm gain"
    return "tensor"


def _diff_key(name: str, params: set[str]) -> str:
    """ComfyUI's full-difference key for DiT tensor `name`: `<M>.diff` for M.weight, `<M>.diff_b` for a bias
    whose module has a weight, else `<name>.diff` (ComfyUI maps any other tensor under its own name)."""
    module, _, leaf = name.rpartition(".")
    if leaf == "weight":
        return f"{COMFY_PREFIX}{module}.diff"
    if leaf == "bias" and f"{module}.weight" in params:
        return f"{COMFY_PREFIX}{module}.diff_b"
    return f"{COMFY_PREFIX}{name}.diff"


def _check_same_layout(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], base_file: Path,
                       tuned_file: Path) -> None:
    """Refuse two checkpoints of different models, naming the first key that differs."""
    for key, t in base.items():
        if key not in tuned:
            raise NetworkError(f"--tuned {tuned_file} has no {key!r}, which --base {base_file} has; extract needs a "
                               "fine-tune of the base model (the same DiT configuration), nothing written")
        if tuple(tuned[key].shape) != tuple(t.shape):
            raise NetworkError(f"{key!r} has shape {list(tuned[key].shape)} in --tuned {tuned_file} but "
                               f"{list(t.shape)} in --base {base_file}: not a fine-tune of this base (another "
                               "model size or configuration), nothing written")
    extra = [k for k in tuned if k not in base]
    if extra:
        raise NetworkError(f"--tuned {tuned_file} has {len(extra)} tensor(s) --base {base_file} lacks (first: "
                           f"{extra[0]!r}); extract needs a fine-tune of the base model, nothing written")


def _file_identity(path: Path) -> dict[str, str]:
    with path.open("rb") as fh:
        return {"name": path.name, "sshs_model_hash": addnet_hash_safetensors(fh)}


def _summary(fits: list[ModuleFit]) -> dict:
    if not fits:
        return {"modules": 0}
    errors = [f.relative_error for f in fits]
    energies = [f.retained_energy for f in fits]
    return {"modules": len(fits), "mean_relative_error": sum(errors) / len(errors),
            "max_relative_error": max(errors), "worst_module": fits[0].module,
            "mean_retained_energy": sum(energies) / len(energies), "min_retained_energy": min(energies)}


@torch.no_grad()
def extract_lora(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int,
                 all_linears: bool = False, targets: list[str] | None = None, diffs: bool = False,
                 clamp_quantile: float | None = None, svd: str = "exact", device: str | torch.device | None = None,
                 save_dtype: torch.dtype = torch.float32, report: str | Path | None = None,
                 overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None) -> ExtractResult:
    """Write the LoRA that turns DiT `base` into `tuned` (module doc) to `out`, and its report (JSON) to `report`
    (default: report_path(out)).  Nothing is written when the files do not fit together or an output exists
    (unless `overwrite`).  `progress(done, total, module)` is called after each module."""
    base, tuned, out = Path(base), Path(tuned), Path(out)
    report = Path(report) if report is not None else report_path(out)
    if out.suffix != ".safetensors":
        raise NetworkError(f"{out}: the extracted LoRA is written as .safetensors")
    if rank < 1:
        raise NetworkError(f"extract --rank {rank}: the rank must be at least 1")
    check_svd_method(svd)
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise NetworkError(f"extract --clamp-quantile {clamp_quantile}: a quantile in (0, 1] (kohya: "
                           f"{KOHYA_CLAMP_QUANTILE})")
    check_writable(out, overwrite)
    check_writable(report, overwrite)
    if out.resolve() in (base.resolve(), tuned.resolve()):
        raise NetworkError(f"{out}: the output is one of the inputs; choose another output name")
    for path, flag in ((base, "--base"), (tuned, "--tuned")):
        if path.is_dir():
            raise NetworkError(f"{flag} {path}: extract reads single-file DiT checkpoints (.safetensors), not a "
                               "diffusers-layout folder")
    infos = [expect_kind(p, flag, DIT_FILE_KINDS) for p, flag in ((base, "--base"), (tuned, "--tuned"))]
    base_sd, tuned_sd = (load_state_dict(p, prefix=i.components.get("dit", i.prefix))
                         for p, i in zip((base, tuned), infos, strict=True))
    _check_same_layout(base_sd, tuned_sd, base, tuned)
    dit = build_meta_dit(base)  # names and shapes only: which tensors are Linear weights, the key check
    params = set(dit.state_dict(keep_vars=True))
    chosen = select_targets(dit, all_linears=all_linears, targets=targets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tensors: dict[str, torch.Tensor] = {}
    fits: list[ModuleFit] = []
    unchanged: list[str] = []
    for i, path in enumerate(chosen):
        key = path + ".weight"
        w0 = base_sd[key].to(device, torch.float32)
        delta = tuned_sd[key].to(device, torch.float32) - w0
        if not bool(delta.any()):
            unchanged.append(path)
        else:
            up, down, s = low_rank_factors(delta, rank, clamp_quantile, svd)
            up, down = up.to(save_dtype), down.to(save_dtype)
            fits.append(_fit(path, delta, float(torch.linalg.vector_norm(w0)), up, down, s))
            stem = COMFY_PREFIX + path
            tensors[stem + ".lora_up.weight"] = up.cpu().contiguous()
            tensors[stem + ".lora_down.weight"] = down.cpu().contiguous()
            tensors[stem + ".alpha"] = torch.tensor(float(up.shape[1]))  # alpha = rank: scale 1
        if progress is not None:
            progress(i + 1, len(chosen), path)

    linears = {n for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    extracted = {p + ".weight" for p in chosen}
    not_extracted = []
    for name, t0 in base_sd.items():
        t1 = tuned_sd[name]
        if name in extracted or torch.equal(t0, t1):
            continue
        entry: dict = {"tensor": name, "kind": _tensor_kind(name, dit, linears), "shape": list(t0.shape)}
        if t0.is_floating_point():
            d = t1.float() - t0.float()
            base_norm = float(torch.linalg.vector_norm(t0.float()))
            entry["relative_change"] = float(torch.linalg.vector_norm(d)) / base_norm if base_norm > 0 else math.inf
            entry["saved_as_diff"] = diffs and name in params
            if entry["saved_as_diff"]:
                tensors[_diff_key(name, params)] = d.to(save_dtype).contiguous()
        else:
            entry["relative_change"], entry["saved_as_diff"] = None, False
        not_extracted.append(entry)
    if not tensors:
        raise NetworkError(f"--tuned {tuned} and --base {base} are equal in every extracted tensor: there is "
                           "nothing to extract, nothing written")

    fits.sort(key=lambda f: f.relative_error, reverse=True)
    not_extracted.sort(key=lambda e: -(e["relative_change"] or 0.0))
    ranks = {f.rank for f in fits}
    precision = str(save_dtype).removeprefix("torch.")
    result = ExtractResult(written=str(out), report=str(report), base=_file_identity(base),
                           tuned=_file_identity(tuned), rank=rank,
                           targets="all Linears" if all_linears else f"regex {targets}" if targets else
                           "the default LoRA targets", clamp_quantile=clamp_quantile,
                           svd=SVD_DESCRIPTIONS[svd], save_precision=precision, modules=fits,
                           unchanged=unchanged, not_extracted=not_extracted, summary=_summary(fits))
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic" if ranks else str(rank)
    meta = {"ss_network_module": LORA_MODULE, "ss_network_dim": dim,
            "ss_network_alpha": f"{float(dim):.1f}" if dim.isdigit() else dim, "ss_sd_model_name": base.name,
            "anima_trainer_version": anima_trainer.__version__,
            EXTRACT_META: json.dumps({"base": result.base, "tuned": result.tuned, "rank": rank,
                                      "targets": result.targets, "clamp_quantile": clamp_quantile,
                                      "diffs": diffs, "svd": result.svd, **result.summary}, sort_keys=True)}

    def check(tmp: Path) -> None:
        check_comfy_keys(tmp, dit)  # every key loads in ComfyUI, or nothing is written
        check_writable(out, overwrite)

    check_writable(report, overwrite)
    atomic_save(tensors, out, with_hashes(tensors, meta), what="extracted LoRA ", check=check)
    atomic_write_bytes((json.dumps(asdict(result), indent=1) + "\n").encode(), report, what="extract report ")
    return result


def result_lines(result: ExtractResult, top: int = 20) -> list[str]:
    """The console report: the `top` worst modules as a table (0: all), the summary, what was left out."""
    lines = []
    shown = result.modules if top <= 0 else result.modules[:top]
    if shown:
        head = ("module", "shape", "rank", "rel. error", "energy", "|ΔW|/|W|")
        rows = [(f.module, "×".join(map(str, f.shape)), str(f.rank), f"{f.relative_error:.3e}",
                 f"{f.retained_energy:.4f}", f"{f.relative_change:.3e}") for f in shown]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        title = "worst modules first" + ("" if len(shown) == len(result.modules) else
                                         f" ({len(shown)} of {len(result.modules)}; all in the report)")
        lines.append(f"reconstruction error per module, {title}:")
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(row, widths, strict=True))) for row in (head, *rows)]
    s = result.summary
    if s.get("modules"):
        lines.append(f"{s['modules']} module(s) at rank ≤ {result.rank}: relative error mean "
                     f"{s['mean_relative_error']:.3e}, max {s['max_relative_error']:.3e} ({s['worst_module']}); "
                     f"retained energy mean {s['mean_retained_energy']:.4f}, min {s['min_retained_energy']:.4f}")
    if result.unchanged:
        lines.append(f"{len(result.unchanged)} target module(s) unchanged (ΔW = 0), skipped: "
                     f"{', '.join(result.unchanged[:5])}{' ...' if len(result.unchanged) > 5 else ''}")
    saved = [e for e in result.not_extracted if e["saved_as_diff"]]
    left = [e for e in result.not_extracted if not e["saved_as_diff"]]
    if saved:
        lines.append(f"{len(saved)} other changed tensor(s) written as full differences (.diff/.diff_b)")
    if left:
        lines.append(f"{len(left)} changed tensor(s) not in the LoRA (a LoRA cannot represent them; --diffs writes "
                     "them as full differences, --all-linears / --targets extract more Linears):")
        for e in left[:top if top > 0 else len(left)]:
            change = "n/a" if e["relative_change"] is None else f"{e['relative_change']:.3e}"
            lines.append(f"  {e['tensor']} ({e['kind']}): relative change {change}")
        if 0 < top < len(left):
            lines.append(f"  ... {len(left) - top} more in the report")
    return lines
