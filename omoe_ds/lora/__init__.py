"""OMoE-LoRA (paper B, arXiv 2501.10062): LoRA, mixtures of LoRA experts, and their per-token orthogonal form."""
from omoe_ds.lora.config import (ADAPTER_KINDS, DECODER_TARGETS, ENCODER_TARGETS, HEAD_MODULES, ROUTINGS,
                                 LoRAMixtureConfig)
from omoe_ds.lora.diversity import collect_representations, lora_diversity, plot_expert_pca
from omoe_ds.lora.inject import LoRAReport, adapter_parameter_names, inject, merge_and_unload, resolve_modules
from omoe_ds.lora.io import load_adapter, save_adapter
from omoe_ds.lora.layers import LoRAMixtureLinear, MixtureParts
from omoe_ds.lora.orthogonal import gram_schmidt

__all__ = ["ADAPTER_KINDS", "DECODER_TARGETS", "ENCODER_TARGETS", "HEAD_MODULES", "ROUTINGS", "LoRAMixtureConfig",
           "LoRAReport", "LoRAMixtureLinear", "MixtureParts", "adapter_parameter_names", "collect_representations",
           "gram_schmidt", "inject", "load_adapter", "lora_diversity", "merge_and_unload", "plot_expert_pca",
           "resolve_modules", "save_adapter"]
