"""What is trained: adapter networks injected into the DiT, and adapter files as ComfyUI reads them.

    net = create_network(dit, algo="lora"|"lokr"|"loha", dim=4, alpha=1.0, dropout=None, **network_args)
    apply_network_file(dit, path, multiplier=1.0)   # inference merge, ComfyUI rules
    net = create_network_from_weights(dit, path, dropout=None, **network_args)  # the file's exact network
"""

from anima_trainer.networks.base import (
    AdapterModule,
    AdapterNetwork,
    NormModule,
    create_network,
)
from anima_trainer.networks.formats import (
    NetworkError,
    apply_network_file,
    check_comfy_keys,
    comfy_key_map,
)
from anima_trainer.networks.inject import DEFAULT_EXCLUDE, find_targets
from anima_trainer.networks.loha import LoHaModule
from anima_trainer.networks.lokr import LoKrModule
from anima_trainer.networks.lora import LoRAModule, LoRANetwork
from anima_trainer.networks.rebuild import create_network_from_weights

__all__ = [
           "DEFAULT_EXCLUDE",
           "AdapterModule",
           "AdapterNetwork",
           "LoHaModule",
           "LoKrModule",
           "LoRAModule",
           "LoRANetwork",
           "NetworkError",
           "NormModule",
           "apply_network_file",
           "check_comfy_keys",
           "comfy_key_map",
           "create_network",
           "create_network_from_weights",
           "find_targets",
]
