"""What is trained: adapter networks injected into the DiT, and adapter files as ComfyUI reads them.

    net = create_network(dit, algo="lora"|"lokr"|"loha", dim=4, alpha=1.0, dropout=None,
                         text_encoder=None, train_dit=True, **network_args)   # text_encoder: the Qwen3Model
    apply_network_file(dit, path, multiplier=1.0)   # inference merge, ComfyUI rules
    apply_text_encoder_file(qwen3, path, multiplier=1.0)   # the same for the file's text-encoder keys
    net = create_network_from_weights(dit, path, dropout=None, text_encoder=None, **network_args)
"""

from anima_trainer.networks.base import (
    AdapterModule,
    AdapterNetwork,
    NormModule,
    create_network,
)
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
