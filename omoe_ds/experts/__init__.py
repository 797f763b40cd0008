"""Expert-layout adapters: each describes its MoE layers to the OMoE core (see base.py for the seam).

    deepspeed_moe   DeepSpeed's native MoE layer, FFN or SwiGLU experts, expert-parallel
    hf_fused        transformers' fused experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3), replicated
    autoep          DeepSpeed AutoEP layers (w1/w3/w2), expert-parallel, found on engine.module after init
"""
from __future__ import annotations

from typing import List

from torch import nn

from ..core import collectives
from ..core.config import OMoEConfigError
from . import autoep, deepspeed_moe, hf_fused
from .base import STREAMS, ExpertLayer, Stream, expert_key
from .deepspeed_moe import SwiGLUExpert, make_moe_ffn

ADAPTERS = (deepspeed_moe.describe, hf_fused.describe, autoep.describe)  # tried in order; the first that claims a module wins


def find_expert_layers(model: nn.Module) -> List[ExpertLayer]:
    """Every MoE layer of the model that some adapter claims, in model.modules() order."""
    layers: List[ExpertLayer] = []
    claimed = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in claimed):
            continue
        for describe in ADAPTERS:
            layer = describe(len(layers), name, module)
            if layer is not None:
                layers.append(layer)
                claimed.add(f"{name}." if name else "")
                break
    return layers


def check_ep_sizes(layers: List[ExpertLayer], world_size: int) -> None:
    for layer in layers:
        if world_size % layer.ep_size:
            raise OMoEConfigError(f"MoE layer {layer.name}: ep_size={layer.ep_size} does not divide the world size "
                                  f"{world_size}; launch a multiple of {layer.ep_size} ranks or change ep_size")


def expert_parameters_by_global_id(layers: List[ExpertLayer]) -> dict:
    """{"layer{L}.expert{g}.{matrix}.{weight|bias}": view} for this rank's experts."""
    out = {}
    for layer in layers:
        out.update(layer.parameters_by_name(collectives.ep_rank(layer.ep_size) * layer.num_local_experts))
    return out


__all__ = ["ADAPTERS", "SwiGLUExpert", "make_moe_ffn", "STREAMS", "ExpertLayer", "Stream", "expert_key", "find_expert_layers", "check_ep_sizes",
           "expert_parameters_by_global_id"]
