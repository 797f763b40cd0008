"""Find the stock DeepSpeed MoE layers of a model and check that OMoE can drive their experts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn
from deepspeed.moe.layer import MoE

from .core.config import OMoEConfigError

WEIGHT_NAMES = ("w1", "w2")  # input→hidden, hidden→output


@dataclass
class MoELayerInfo:
    index: int                 # order of the MoE layer in model.modules()
    name: str                  # qualified module name, for messages
    module: MoE
    num_experts: int           # M, global
    ep_size: int
    num_local_experts: int
    local_experts: List[List[nn.Linear]]  # [local expert][w1, w2]

    @property
    def gate(self):
        return self.module.deepspeed_moe.gate


def expert_linears(expert: nn.Module, where: str) -> List[nn.Linear]:
    """The expert's two nn.Linear in forward order (input→hidden, hidden→output), or a clear error."""
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    linear_params = {id(p) for linear in linears for p in linear.parameters()}
    others = [name for name, p in expert.named_parameters() if id(p) not in linear_params]
    if len(linears) != 2 or others:
        raise OMoEConfigError(
            f"{where}: OMoE needs each expert to hold exactly two nn.Linear (input→hidden, hidden→output) and no "
            f"other parameters, but the expert module {type(expert).__name__} has {len(linears)} nn.Linear"
            + (f" and other parameters {others}" if others else "")
            + "; build the expert as nn.Sequential(nn.Linear(d, d_ff), activation, nn.Linear(d_ff, d))")
    w1, w2 = linears
    if w1.out_features != w2.in_features or w1.in_features != w2.out_features:
        raise OMoEConfigError(
            f"{where}: the expert {type(expert).__name__} has Linear shapes {w1.in_features}→{w1.out_features} and "
            f"{w2.in_features}→{w2.out_features}; OMoE expects d→d_ff then d_ff→d in that registration order")
    return [w1, w2]


def find_moe_layers(model: nn.Module) -> List[MoELayerInfo]:
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        where = f"MoE layer {name or '<root>'}"
        if module.num_experts < 2:
            raise OMoEConfigError(
                f"{where} has num_experts={module.num_experts}: OMoE projects each expert's gradient by the mean "
                "projector of the *other* experts, which needs at least 2 experts; use num_experts >= 2")
        if module.num_experts % module.ep_size:
            raise OMoEConfigError(f"{where}: num_experts={module.num_experts} is not divisible by ep_size="
                                  f"{module.ep_size}; pick an ep_size that divides the expert count")
        if getattr(module.deepspeed_moe, "use_tutel", False):
            raise OMoEConfigError(f"{where} uses Tutel dispatch; OMoE reads DeepSpeed's own dispatch, build the "
                                  "layer with use_tutel=False")
        experts = module.deepspeed_moe.experts.deepspeed_experts
        local = [expert_linears(e, f"{where}, local expert {i}") for i, e in enumerate(experts)]
        layers.append(MoELayerInfo(len(layers), name, module, module.num_experts, module.ep_size,
                                   module.num_local_experts, local))
    return layers


def check_ep_sizes(layers: List[MoELayerInfo], world_size: int) -> None:
    for layer in layers:
        if world_size % layer.ep_size:
            raise OMoEConfigError(f"MoE layer {layer.name}: ep_size={layer.ep_size} does not divide the world size "
                                  f"{world_size}; launch a multiple of {layer.ep_size} ranks or change ep_size")


def make_moe_ffn(d_model: int, d_ff: int, num_experts: int, ep_size: int = 1, k: int = 1, activation=nn.GELU,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: bool = True, use_rts: bool = True, noisy_gate_policy=None) -> MoE:
    """A stock DeepSpeed MoE layer whose experts are Linear→activation→Linear FFNs, checked first.

    drop_tokens=False, use_rts=False and noisy_gate_policy=None make routing deterministic and
    lossless, which is what equality across EP sizes needs.
    """
    if num_experts < 2:
        raise OMoEConfigError(f"num_experts={num_experts}: OMoE needs at least 2 experts per MoE layer")
    if ep_size < 1 or num_experts % ep_size:
        raise OMoEConfigError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; "
                              "choose an ep_size that divides the expert count")
    if k not in (1, 2):
        raise OMoEConfigError(f"k={k}: DeepSpeed's MoE gate supports top-1 and top-2 routing; use k=1 or k=2")
    expert = nn.Sequential(nn.Linear(d_model, d_ff), activation(), nn.Linear(d_ff, d_model))
    return MoE(hidden_size=d_model, expert=expert, num_experts=num_experts, ep_size=ep_size, k=k,
               capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
               drop_tokens=drop_tokens, use_rts=use_rts, noisy_gate_policy=noisy_gate_policy)


def expert_key(layer_index: int, global_expert: int, weight_index: int) -> str:
    """Stable name of one expert weight across EP sizes: "layer{L}.expert{g}.{w1|w2}"."""
    return f"layer{layer_index}.expert{global_expert}.{WEIGHT_NAMES[weight_index]}"


def expert_parameters_by_global_id(layers: List[MoELayerInfo]) -> dict:
    """{"layer{L}.expert{g}.{w1|w2}.{weight|bias}": parameter} for this rank's local experts."""
    from .core import collectives
    out = {}
    for layer in layers:
        first = collectives.ep_rank(layer.ep_size) * layer.num_local_experts
        for l, linears in enumerate(layer.local_experts):
            for w, linear in enumerate(linears):
                for pname, p in linear.named_parameters():
                    out[f"{expert_key(layer.index, first + l, w)}.{pname}"] = p
    return out
