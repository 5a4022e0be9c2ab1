"""What is trained: adapter networks injected into the DiT, and adapter files as ComfyUI reads them.

    analysis.py          weight analysis of a network file: |dW|, effective rank, energy per block type/block
    base.py              AdapterNetwork: what LoRA, LoKr and LoHa share (targets, injection, norms, max-norm)
    convert.py           adapter key names: any naming read, renamed to ComfyUI / kohya names
    create.py            `create_network`: the algorithm table and the one entry point
    diffusers_format.py  the adapter layout diffusers' Anima loader reads (`save_format = "diffusers"`)
    factor_cast.py       speed lever: the LoRA factors cast to bf16 once per forward pass, one `cat` per block
    files.py             a network's files: tensors, metadata, checked atomic save, strict load
    full_finetune.py     the fine-tune mode: the DiT's own parameters (a selection) as the trained "network"
    formats.py           adapter file names and math exactly as ComfyUI reads them (`apply_network_file`)
    hashes.py            kohya's `sshs_*` model hashes and their check
    inject.py            which modules a network trains (kohya's rules) and how it patches their forwards
    loha.py, lokr.py, lora.py   the three algorithms' modules and builders
    merge.py             kohya's `base_weights`: files merged into the frozen DiT before training
    modules.py           AdapterModule / NormModule, the modules a network patches in
    param_groups.py      optimizer parameter groups (kohya's learning-rate rules)
    rebuild.py           the network a file describes, rebuilt from the file (`dim_from_weights`)

    net = create_network(dit, algo="lora"|"lokr"|"loha", dim=4, alpha=1.0, dropout=None,
                         text_encoder=None, train_dit=True, **network_args)   # text_encoder: the Qwen3Model
    apply_network_file(dit, path, multiplier=1.0)   # inference merge, ComfyUI rules
    apply_text_encoder_file(qwen3, path, multiplier=1.0)   # the same for the file's text-encoder keys
    net = create_network_from_weights(dit, path, dropout=None, text_encoder=None, **network_args)
"""

from anima_trainer.networks.base import AdapterModule, AdapterNetwork, NormModule
from anima_trainer.networks.create import create_network
from anima_trainer.networks.formats import (
    TE_COMFY_PREFIX,
    NetworkError,
    apply_network_file,
    apply_text_encoder_file,
    check_comfy_keys,
    comfy_key_map,
    comfy_skipped_keys,
)
from anima_trainer.networks.inject import DEFAULT_EXCLUDE, find_targets
from anima_trainer.networks.loha import LoHaModule
from anima_trainer.networks.lokr import LoKrModule
from anima_trainer.networks.lora import LoRAModule, LoRANetwork
from anima_trainer.networks.rebuild import create_network_from_weights

__all__ = [
           "DEFAULT_EXCLUDE",
           "TE_COMFY_PREFIX",
           "AdapterModule",
           "AdapterNetwork",
           "LoHaModule",
           "LoKrModule",
           "LoRAModule",
           "LoRANetwork",
           "NetworkError",
           "NormModule",
           "apply_network_file",
           "apply_text_encoder_file",
           "check_comfy_keys",
           "comfy_key_map",
           "comfy_skipped_keys",
           "create_network",
           "create_network_from_weights",
           "find_targets",
]
