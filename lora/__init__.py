"""LoRA for the Llama model: config, the `LoRALinear` layer, PEFT-format adapters, merging, accounting."""

from .adapter import (
    AdapterFile,
    ModelCard,
    adapter_state_dict,
    count_parameters,
    disabled,
    load_adapter,
    lora_layers,
    merge,
    read_adapter_config,
    read_adapter_file,
    save_adapter,
    tensor_problem,
)
from .config import ALL_TARGETS, ATTENTION_TARGETS, MLP_TARGETS, LoRAConfig, resolve_targets
from .layer import LoRALinear

__all__ = ["LoRAConfig", "LoRALinear", "MLP_TARGETS", "ATTENTION_TARGETS", "ALL_TARGETS", "count_parameters",
           "save_adapter", "load_adapter", "read_adapter_config", "read_adapter_file", "AdapterFile", "merge",
           "lora_layers", "disabled", "ModelCard", "adapter_state_dict", "tensor_problem", "resolve_targets"]
