"""Expert-diversity figures that work on expert-sharded models: only per-expert rows cross ranks.

- parameter variance across the M experts of a layer, averaged over parameters (paper A, Tables I/II);
- token load per expert, counted at the gate.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from . import collectives
from .moe_layers import MoELayerInfo


@torch.no_grad()
def expert_parameter_variance(layers: List[MoELayerInfo]) -> List[Dict[str, float]]:
    """Per MoE layer: mean over parameter positions of the variance across experts, for W1 and W2 ([W|b] each)."""
    out = []
    for layer in layers:
        per_weight = {}
        for w, name in enumerate(("w1", "w2")):
            local = torch.stack([torch.cat([p.detach().reshape(-1).float() for p in linears[w].parameters()])
                                 for linears in layer.local_experts])
            every_expert = collectives.gather_over_ep(local, layer.ep_size)  # [M, params]
            per_weight[name] = float(every_expert.var(dim=0, unbiased=False).mean())
        per_weight["mean"] = (per_weight["w1"] + per_weight["w2"]) / 2
        out.append(per_weight)
    return out


class ExpertLoadCounter:
    """Counts the tokens each gate sends to each expert while enabled; summed over all ranks on read."""

    def __init__(self, layers: List[MoELayerInfo]):
        self.layers = layers
        self.enabled = False
        self.counts = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers]
        self._handles = [layer.gate.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]

    def _make_hook(self, index: int):
        def count(gate, inputs, output):
            if self.enabled:
                indices = output[3]
                routed = indices[indices >= 0].to(torch.int64)
                self.counts[index] += torch.bincount(routed, minlength=self.layers[index].num_experts).double().cpu()
        return count

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def read(self) -> List[Dict[str, object]]:
        """Per layer: tokens per expert, their share, and the routing entropy of that share (nats)."""
        result = []
        for c in self.counts:
            total = collectives.sum_over_world_(c.clone())
            share = total / total.sum().clamp(min=1)
            entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
            result.append({"tokens": total.tolist(), "share": share.tolist(), "entropy": entropy})
        return result

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
