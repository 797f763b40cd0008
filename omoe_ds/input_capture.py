"""Record, in R steps, the token-weighted input sums of every local expert's two Linears.

The expert sees a [ep_size, 1, C, d] buffer per local expert after DeepSpeed's all-to-all: one
block of C capacity slots per source rank. Each source rank fills the first n slots of a block
with its n routed tokens (locations come from a cumsum over the kept routes) and pads the rest
with zero rows; tokens masked by `used_token` (padding) are never routed. So the real inputs are
exactly the first counts[g, l] rows of block g, and the counts are what the gate hook exchanges.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from . import collectives
from .moe_layers import MoELayerInfo

ACCUMULATOR_DTYPE = torch.float64  # window sums span many steps; the bytes are negligible


class LayerInputWindow:
    """The open window of one MoE layer: per local expert, Σx for W1, Σh for W2, and the token count."""

    def __init__(self, layer: MoELayerInfo, should_capture: Callable[[], bool]):
        self.layer = layer
        self.should_capture = should_capture
        self._received_counts = None  # [ep_size, E_local] for the forward in flight
        w1, w2 = layer.local_experts[0]
        e_local = layer.num_local_experts
        device = w1.weight.device
        self.sums = [torch.zeros(e_local, w1.in_features, dtype=ACCUMULATOR_DTYPE, device=device),
                     torch.zeros(e_local, w2.in_features, dtype=ACCUMULATOR_DTYPE, device=device)]
        self.counts = torch.zeros(e_local, dtype=ACCUMULATOR_DTYPE, device=device)
        self._handles = [layer.gate.register_forward_hook(self._after_gate),
                         layer.module.register_forward_hook(self._after_layer)]
        for local_index, linears in enumerate(layer.local_experts):
            for weight_index, linear in enumerate(linears):
                self._handles.append(linear.register_forward_pre_hook(self._make_input_hook(local_index, weight_index)))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.counts.zero_()

    def _capturing(self, module) -> bool:
        return module.training and torch.is_grad_enabled() and self.should_capture()

    def _after_gate(self, gate, inputs, output) -> None:
        if not self._capturing(gate):
            self._received_counts = None
            return
        indices = output[3]  # [k, S] expert per route, −1 where the route was dropped or masked
        routed = indices[indices >= 0].to(torch.int64)
        sent = torch.bincount(routed, minlength=self.layer.num_experts)
        self._received_counts = collectives.routed_counts_to_local_experts(sent, self.layer.ep_size)

    def _after_layer(self, moe, inputs, output) -> None:
        # Counts describe this dispatch only; an expert Linear called outside it records nothing.
        self._received_counts = None

    def _make_input_hook(self, local_index: int, weight_index: int):
        def record_inputs(linear, inputs):
            if self._received_counts is None or not self._capturing(linear):
                return
            x = inputs[0].detach()
            ep_size, capacity = x.shape[0], x.shape[-2]
            counts = self._received_counts[:, local_index]
            slot_is_token = torch.arange(capacity, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
            blocks = x.reshape(ep_size, capacity, x.shape[-1]).float()
            total = torch.einsum("gc,gcd->d", slot_is_token.float(), blocks)
            self.sums[weight_index][local_index] += total.to(ACCUMULATOR_DTYPE)
            if weight_index == 0:
                self.counts[local_index] += counts.sum().to(ACCUMULATOR_DTYPE)
        return record_inputs


def flatten_windows(windows: List[LayerInputWindow]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for w in windows for t in (*w.sums, w.counts)])


def unflatten_windows_(windows: List[LayerInputWindow], flat: torch.Tensor) -> None:
    offset = 0
    for w in windows:
        for t in (*w.sums, w.counts):
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
