"""Optimizer parameter groups of an adapter network: kohya's learning-rate rules for the DiT and the text encoder.

kohya (`prepare_optimizer_params_with_multiple_te_lrs`): the text-encoder modules and the DiT modules are
assembled separately — the TE at `text_encoder_lr` (default: the base learning rate), the DiT at the base lr
(or `unet_lr`, which is the base lr here).  Within each side a `network_reg_lrs` rule that full-matches the
module's path (`layers.0.self_attn.q_proj` for the TE) puts it in a group of its own at that lr; with LoRA+
the algorithm's "up" factors go to a `/plus` group at lr × ratio (DiT: loraplus_unet_lr_ratio else
loraplus_lr_ratio; TE: loraplus_text_encoder_lr_ratio else loraplus_lr_ratio).  Groups at lr 0 are dropped.
Component learning rates (kohya v0.11's --self_attn_lr ...) are DiT-only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from anima_trainer.networks.formats import NetworkError

if TYPE_CHECKING:
    from anima_trainer.networks.base import AdapterNetwork

logger = logging.getLogger(__name__)

COMPONENTS = ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")
TE_GROUP = "text_encoder"


def anima_component(path: str) -> str:
    """kohya's get_anima_param_groups rule for a DiT path: anything under `llm_adapter` first, then
    `.self_attn`, `.cross_attn`, `.mlp`, `.adaln_modulation` (→ "mod") as substrings, else "base"."""
    if "llm_adapter" in path:
        return "llm_adapter"
    for key, name in ((".self_attn", "self_attn"), (".cross_attn", "cross_attn"), (".mlp", "mlp"),
                      (".adaln_modulation", "mod")):
        if key in path:
            return name
    return "base"


def param_groups(network: AdapterNetwork, lr: float, component_lrs: dict[str, float | None] | None = None,
                 text_encoder_lr: float | None = None) -> list[dict]:
    """Optimizer groups: one per lr (the base `lr`, then each distinct network_reg_lrs value in module
    order), each split in two with LoRA+ (the algorithm's PLUS_SUFFIXES at lr × ratio).
    A group whose lr is 0 is dropped (kohya): those factors stay fixed.

    Text-encoder modules train in the group `text_encoder` at `text_encoder_lr` (None: `lr`, kohya's
    default_lr), `text_encoder/reg_lr=<lr>` where a network_reg_lrs rule matches, `…/plus` for the LoRA+ half
    (ratio loraplus_text_encoder_lr_ratio, else loraplus_lr_ratio).  A text-encoder group at lr 0 is dropped and
    its tensors get requires_grad off (nothing of the TE trains, so no gradient flows into it).

    component_lrs ({"self_attn"|"cross_attn"|"mlp"|"mod"|"llm_adapter": lr or None}, kohya v0.11's
    --self_attn_lr ...): a DiT module (or norm gain) of that component (`anima_component`) trains in a group
    named after it at that lr; None = the base lr; 0 = frozen (requires_grad off, as kohya's
    get_anima_param_groups).  A network_reg_lrs rule matching the module wins over its component's lr.
    Every group has a `name`: `base`, `reg_lr=<lr>`, the component or `text_encoder…`, with `/plus` for the
    LoRA+ half."""
    comp = {k: v for k, v in (component_lrs or {}).items() if v is not None}
    unknown = sorted(set(comp) - set(COMPONENTS))
    if unknown:
        raise NetworkError(f"component learning rates: unknown component(s) {unknown}; known: {COMPONENTS}")
    te_lr = float(lr) if text_encoder_lr is None else float(text_encoder_lr)
    # name → (lr, plain, plus, LoRA+ ratio)
    buckets: dict[str, tuple[float, list[nn.Parameter], list[nn.Parameter], float | None]] = {}
    counts: dict[str, int] = dict.fromkeys(comp, 0)
    frozen: list[nn.Parameter] = []
    dit_ratio, te_ratio = network.loraplus_lr_ratio, network.loraplus_text_encoder_lr_ratio

    def group_of(name: str, model: str, path: str) -> tuple[str, float]:
        te = model == "text_encoder"
        if name in network.reg_lrs:
            return (f"{TE_GROUP}/" if te else "") + f"reg_lr={network.reg_lrs[name]:g}", network.reg_lrs[name]
        if te:
            return TE_GROUP, te_lr
        c = anima_component(path)
        if c in comp:
            counts[c] += 1
            return c, float(comp[c])
        return "base", float(lr)

    buckets["base"] = (float(lr), [], [], dit_ratio)
    for name, m in network.modules_by_name.items():
        group, group_lr = group_of(name, m.model, m.path)
        if group_lr == 0 and (group in comp or m.model == "text_encoder"):
            frozen.extend(m.tensors().values())
            continue
        ratio = te_ratio if m.model == "text_encoder" else dit_ratio
        _, plain, plus, _ = buckets.setdefault(group, (group_lr, [], [], ratio))
        for suffix, t in m.tensors().items():
            (plus if ratio is not None and suffix in m.PLUS_SUFFIXES else plain).append(t)
    for p, m in network.norms_by_name.items():
        c = anima_component(p)
        group, group_lr = (c, float(comp[c])) if c in comp else ("base", float(lr))
        if group in comp:
            counts[c] += 1
            if group_lr == 0:
                frozen.append(m.weight)
                continue
        buckets.setdefault(group, (group_lr, [], [], dit_ratio))[1].append(m.weight)
    for t in frozen:
        t.requires_grad_(False)
    if comp:
        logger.info("component learning rates (kohya's --*_lr): %s", ", ".join(
            f"{c} {'frozen' if v == 0 else f'{v:g}'} ({counts[c]} module(s))" for c, v in comp.items()))
        for c in (c for c, n in counts.items() if n == 0):
            hint = {"llm_adapter": " (set network_args train_llm_adapter=true to train it)",
                    "mod": " (the AdaLN modulation Linears are excluded by default; include_patterns "
                           "['.*adaln_modulation.*'] trains them)"}.get(c, "")
            logger.warning("%s_lr = %g: no trained module belongs to %s, so it changes nothing%s", c, comp[c],
                           c, hint)
    groups = []
    for name, (group_lr, plain, plus, ratio) in buckets.items():
        if plain:
            groups.append({"params": plain, "lr": group_lr, "name": name})
        if plus:
            groups.append({"params": plus, "lr": group_lr * ratio, "name": name + "/plus"})
    groups = [g for g in groups if g["lr"] > 0]
    if not groups:
        raise NetworkError("every parameter group has lr 0 (learning rate / text_encoder_lr / network_reg_lrs / "
                           "component lrs): nothing to train")
    return groups
