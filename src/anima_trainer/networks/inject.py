"""Which DiT modules a network trains, and how it patches their forwards without changing the DiT.

Targets follow kohya's `lora_anima` (docs/kohya_anima.md §3.1): walk the DiT, and for every module whose
class is a DiT `Block`, `PatchEmbed`, `TimestepEmbedding` or `FinalLayer` (plus the LLM adapter's `LLMAdapterBlock`
with `train_llm_adapter`) take every `nn.Linear` inside it; drop those whose dotted path full-matches an
exclude regex (the built-in one always applies, `exclude_patterns` add to it) unless it full-matches an
`include_patterns` regex.  Defaults: 10 Linear per block (self/cross attention q/k/v/output_proj, mlp).
Named options add the excluded groups back (as include patterns, so they win over exclude_patterns too):
`train_adaln` the blocks' adaLN modulation Linears (6 per block), `train_final_layer` the final layer's
Linear and its adaLN modulation, `train_embedders` the patch embedding and the timestep MLP.

Text encoder (kohya's `TEXT_ENCODER_TARGET_REPLACE_MODULE`): every `nn.Linear` inside the Qwen3 modules
whose class is `Qwen3Attention` / `Qwen3MLP` (and the SDPA / FlashAttention2 variants of older transformers),
7 per layer (q/k/v/o_proj, gate/up/down_proj); the same exclude (built-in one included) / include regexes
are full-matched against the Qwen3 path (`layers.0.self_attn.q_proj`).

Injection is kohya style: the target Linear's `forward` is replaced by the adapter module's forward, which
calls the original.  The module tree and parameter names (= checkpoint keys) never change; `restore`
puts the original forward back.
"""

from __future__ import annotations

import ast
import fnmatch
import math
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from anima_trainer.config.rules import FALSE_WORDS, TRUE_WORDS
from anima_trainer.networks.formats import NetworkError

DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"
DIT_TARGET_CLASSES = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
LLM_ADAPTER_TARGET_CLASSES = ("LLMAdapterBlock",)
TE_TARGET_CLASSES = ("Qwen3Attention", "Qwen3MLP", "Qwen3SdpaAttention", "Qwen3FlashAttention2")
MERGED_ALGOS = ("lokr", "loha")  # the algorithms whose ΔW is materialised anyway (merged_forward)
# named optional target groups → the module paths they add (full match)
OPTIONAL_TARGETS = {
    "train_adaln": r"blocks\.\d+\.adaln_modulation_(self_attn|cross_attn|mlp)\.\d+",
    "train_final_layer": r"final_layer\.(linear|adaln_modulation\.\d+)",
    "train_embedders": r"(x_embedder\.proj|t_embedder)\.\d+(\.linear_\d+)?",
}
KNOWN_ARGS = ("include_patterns", "exclude_patterns", "train_llm_adapter", "train_norm", "rank_dropout",
              "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "network_reg_dims",
              "network_reg_lrs", "verbose", "target_modules", "loraplus_text_encoder_lr_ratio", "merged_forward",
              *OPTIONAL_TARGETS)
# sd-scripts-anima's default `target_modules` (DEFAULT_TARGETS_V101, seed_system.md §2.2): the same 10 Linears
# per DiT block as kohya's defaults, plus the 10 per LLM-adapter block
SD_SCRIPTS_ANIMA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "self_attn.output_proj", "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj",
                            "cross_attn.o_proj", "cross_attn.output_proj", "mlp.layer1", "mlp.layer2", "mlp.0",
                            "mlp.2")
# network_args that choose targets kohya's way; target_modules (sd-scripts-anima's way) replaces all of them
_KOHYA_TARGET_ARGS = ("include_patterns", "exclude_patterns", "train_llm_adapter", *OPTIONAL_TARGETS)


def parse_patterns(name: str, value: Any) -> list[re.Pattern]:
    """A list of regexes from a Python list or its literal string (kohya: `exclude_patterns=[".*mlp.*"]`)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise NetworkError(f"network_args {name}={value!r} is not a Python list literal of regex strings, "
                               f"e.g. {name}=['.*mlp.*']") from e
        if isinstance(value, str):
            value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise NetworkError(f"network_args {name} must be a list of regex strings, got {value!r}")
    out = []
    for pattern in value:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise NetworkError(f"network_args {name}: bad regex {pattern!r}: {e}") from e
    return out


def parse_bool(name: str, value: Any) -> bool:
    """true/false/1/0/yes/no/on/off in any case (or a bool); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise NetworkError(f"network_args {name} must be true or false (also 1/0, yes/no, on/off), got {value!r}")


def parse_float(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    """A finite number (or its string) in [low, high) (or (low, high) with low_open); else NetworkError."""
    try:
        f = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(value, bool) or not math.isfinite(f) or f < low or (low_open and f == low) or (
            high is not None and f >= high):
        span = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise NetworkError(f"network_args {name} must be a number in {span}, got {value!r}")
    return f


def parse_regex_values(name: str, value: Any, kind: type) -> list[tuple[re.Pattern, float | int]]:
    """kohya's `regex=value,regex=value` (split at ',' then at the last '='); order kept: first full match wins."""
    if value is None:
        return []
    if not isinstance(value, str):
        raise NetworkError(f"network_args {name} must be a string 'regex=value,regex=value', got {value!r}")
    out: list[tuple[re.Pattern, float | int]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        pattern, sep, raw = item.rpartition("=")
        if not sep or not pattern.strip():
            raise NetworkError(f"network_args {name}: {item!r} is not regex=value (e.g. {name}=.*mlp.*=...)")
        try:
            regex = re.compile(pattern.strip())
        except re.error as e:
            raise NetworkError(f"network_args {name}: bad regex {pattern!r}: {e}") from e
        if kind is int:
            try:
                v: float | int = int(raw.strip())
            except ValueError:
                v = -1
            if v < 0:
                raise NetworkError(f"network_args {name}: {item!r}: the dim must be an integer >= 0 (0 skips)")
        else:
            v = parse_float(f"{name} ({item!r})", raw, 0.0)
        out.append((regex, v))
    return out


def first_match(rules: list[tuple[re.Pattern, Any]], path: str) -> Any:
    """The value of the first rule whose regex full-matches `path` (None when none does)."""
    for regex, v in rules:
        if regex.fullmatch(path):
            return v
    return None


def check_network_args(network_args: dict[str, Any], algo: str = "lora",
                       extra_known: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate the shared network_args; returns the parsed values (patterns compiled, booleans parsed).

    `extra_known` are the algorithm's own keys: allowed here, parsed by the algorithm."""
    known = KNOWN_ARGS + tuple(extra_known)
    unknown = sorted(set(network_args) - set(known))
    if unknown:
        raise NetworkError(f"unknown network_args {unknown}; supported for algo={algo}: {list(known)}")
    unet_ratio, te_ratio, ratio = [parse_float(k, network_args[k], 0.0, low_open=True) if k in network_args
                                   else None for k in ("loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
                                                       "loraplus_lr_ratio")]
    target_modules = parse_target_modules(network_args.get("target_modules"))
    if target_modules is not None:
        both = [k for k in _KOHYA_TARGET_ARGS if k in network_args]
        if both:
            raise NetworkError(f"network_args target_modules (sd-scripts-anima's target list) cannot be combined "
                               f"with {both} (kohya's way of choosing targets); use one of the two")
    # LoKr/LoHa: one GEMM with W + ΔW (on by default: measured no less accurate, docs/performance.md)
    merged_forward = parse_bool("merged_forward", network_args.get("merged_forward", algo in MERGED_ALGOS))
    if merged_forward and algo not in MERGED_ALGOS:
        raise NetworkError(f"network_args merged_forward is for algo=lokr and algo=loha (one GEMM with W + ΔW); "
                           f"algo={algo} keeps its factored branch: remove merged_forward")
    return {
        "merged_forward": merged_forward,
        "target_modules": target_modules,
        "train_norm": parse_bool("train_norm", network_args.get("train_norm", False)),
        "include_patterns": parse_patterns("include_patterns", network_args.get("include_patterns")) + [
            re.compile(OPTIONAL_TARGETS[k]) for k in OPTIONAL_TARGETS if parse_bool(k, network_args.get(k, False))],
        "exclude_patterns": parse_patterns("exclude_patterns", network_args.get("exclude_patterns")),
        "train_llm_adapter": parse_bool("train_llm_adapter", network_args.get("train_llm_adapter", False)),
        "rank_dropout": parse_float("rank_dropout", network_args.get("rank_dropout", 0.0), 0.0, 1.0),
        "module_dropout": parse_float("module_dropout", network_args.get("module_dropout", 0.0), 0.0, 1.0),
        # kohya: the unet ratio wins over the general one for the DiT, the text-encoder ratio for the TE
        "loraplus_lr_ratio": unet_ratio if unet_ratio is not None else ratio,
        "loraplus_text_encoder_lr_ratio": te_ratio if te_ratio is not None else ratio,
        "network_reg_dims": parse_regex_values("network_reg_dims", network_args.get("network_reg_dims"), int),
        "network_reg_lrs": parse_regex_values("network_reg_lrs", network_args.get("network_reg_lrs"), float),
        "verbose": parse_bool("verbose", network_args.get("verbose", False)),
    }


def parse_target_modules(value: Any) -> list[str] | None:
    """sd-scripts-anima's `target_modules`: a comma-separated string (or a list, or the Python list literal its
    converter writes for a TOML list) → the stripped, non-empty entries; None when not given."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise NetworkError(f"network_args target_modules={value!r} is neither 'a,b,c' nor a list literal") from e
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise NetworkError(f"network_args target_modules must be a comma-separated string, got {value!r}")
    out = [v.strip() for v in items if v.strip()]
    if not out:
        raise NetworkError("network_args target_modules is empty; name at least one module (e.g. "
                           "target_modules=self_attn.q_proj,mlp.layer1) or leave it out for the defaults")
    for t in out:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise NetworkError(f"network_args target_modules: bad regex {t!r}: {e}") from e
    return out


def target_matches(target: str, name: str) -> bool:
    """sd-scripts-anima's rule for one `target_modules` entry against a module's dotted name:
    `re:<regex>` → regex search; else a leading `transformer.` is dropped, then `*`/`?` → glob on the whole
    name, a dotted entry → the name itself or its suffix at a dot boundary (`mlp.2` is not `..._mlp.2`), and a
    bare word → the last name component."""
    if target.startswith("re:"):
        return re.search(target[3:], name) is not None
    target = target.removeprefix("transformer.")
    if "*" in target or "?" in target:
        return fnmatch.fnmatchcase(name, target)
    if "." in target:
        return name == target or name.endswith("." + target)
    return name.rsplit(".", 1)[-1] == target


def linear_paths(dit: nn.Module) -> frozenset[str]:
    """Module paths of every Linear of the DiT (LoRA in diffusers' layout exists only for those)."""
    return frozenset(n for n, m in dit.named_modules() if isinstance(m, nn.Linear))


def find_target_modules(dit: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """{dotted path: Linear} of every Linear of the DiT (LLM adapter included) that one of `targets` matches,
    in module order.  An entry that matches no Linear is an error naming it: a typo would otherwise train
    fewer modules than asked for without a word."""
    linears = [(n, m) for n, m in dit.named_modules() if isinstance(m, nn.Linear) and n]
    found: dict[str, nn.Linear] = {}
    for t in targets:
        hits = [(n, m) for n, m in linears if target_matches(t, n)]
        if not hits:
            example = next((n for n, _ in linears if n.startswith("blocks.")), linears[0][0] if linears else "?")
            raise NetworkError(f"network_args target_modules: {t!r} matches no Linear module of the DiT (names look "
                               f"like {example!r}; an entry is re:<regex>, a glob with * or ?, a dotted suffix such "
                               "as self_attn.q_proj, or a last name such as q_proj)")
        for n, m in hits:
            found.setdefault(n, m)
    order = {n: i for i, (n, _) in enumerate(linears)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def find_targets(dit: nn.Module, include: list[re.Pattern] = (), exclude: list[re.Pattern] = (),
                 train_llm_adapter: bool = False) -> dict[str, nn.Linear]:
    """{dotted module path: Linear} to train, in module order."""
    classes = DIT_TARGET_CLASSES + (LLM_ADAPTER_TARGET_CLASSES if train_llm_adapter else ())
    excludes = [re.compile(DEFAULT_EXCLUDE), *exclude]
    targets: dict[str, nn.Linear] = {}
    for name, module in dit.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, nn.Linear) or not child_name:
                continue
            path = f"{name}.{child_name}" if name else child_name
            excluded = any(p.fullmatch(path) for p in excludes)
            if excluded and not any(p.fullmatch(path) for p in include):
                continue
            targets.setdefault(path, child)
    return targets


def find_text_encoder_targets(text_encoder: nn.Module, include: list[re.Pattern] = (),
                              exclude: list[re.Pattern] = ()) -> dict[str, nn.Linear]:
    """{Qwen3 module path: Linear} to train in the text encoder, in module order (kohya's rule, module doc)."""
    excludes = [re.compile(DEFAULT_EXCLUDE), *exclude]
    targets: dict[str, nn.Linear] = {}
    for name, module in text_encoder.named_modules():
        if type(module).__name__ not in TE_TARGET_CLASSES:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, nn.Linear) or not child_name:
                continue
            path = f"{name}.{child_name}" if name else child_name
            if any(p.fullmatch(path) for p in excludes) and not any(p.fullmatch(path) for p in include):
                continue
            targets.setdefault(path, child)
    return targets


class ForwardPatch:
    """Replaces `module.forward` by `new_forward` and restores it exactly (instance attribute or class method)."""

    def __init__(self, module: nn.Module, new_forward: Callable) -> None:
        if getattr(module, "_anima_network_patched", False):
            raise NetworkError(f"{type(module).__name__} already has a network injected; call remove() on the "
                               "existing network first")
        self.had_instance_forward = "forward" in module.__dict__
        self.org_forward = module.forward
        module.forward = new_forward
        module._anima_network_patched = True
        self.module: nn.Module | None = module

    def restore(self) -> None:
        module, self.module = self.module, None
        if module is None:
            return
        if self.had_instance_forward:
            module.forward = self.org_forward
        else:
            del module.forward
        del module._anima_network_patched
