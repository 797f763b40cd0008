"""Record, in R steps, the token-weighted input sums of every expert's two Linears, with no collective.

Both streams are laid out per *global* expert, so that one all-reduce over the whole world per O step
(OMoE.update_projectors) turns every rank's partial sums into every expert's totals:
- x (input of W1) is summed on the *sending* side: the gate hook sees the gate's input tokens and their
  routes (expert index per route, −1 where dropped or masked, so padding is never counted) and adds
  each routed token to its global expert's row, local or not.
- h (input of W2) exists only where the expert runs. DeepSpeed fills each source rank's block of C
  capacity slots from slot 0 and pads it with exact zero rows (`_sparse_encode`), so the receiving
  rank finds its filled slots itself: a slot is filled iff its W1 input row is nonzero. The W1
  pre-hook stashes that mask for the W2 pre-hook of the same local expert, which adds Σh and the
  count to its global row; other experts' rows stay 0 on this rank.
Caveat (measure zero): a real token whose hidden state is exactly the zero vector is counted in the
x stream but taken for an empty slot in the h stream. Otherwise the two counts agree; each mean uses
its own count.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .core import collectives
from .moe_layers import MoELayerInfo

ACCUMULATOR_DTYPE = torch.float64  # window sums span many steps; the bytes are negligible


class LayerInputWindow:
    """The open window of one MoE layer, this rank's partial sums, per global expert g:
    sums[0][g] = Σx (tokens this rank sent to g), sums[1][g] = Σh (g's filled slots here, 0 unless g is
    local), counts[0][g] / counts[1][g] the matching token counts ([2, M])."""

    def __init__(self, layer: MoELayerInfo, should_capture: Callable[[], bool]):
        self.layer = layer
        self.should_capture = should_capture
        self.first_global = collectives.ep_rank(layer.ep_size) * layer.num_local_experts
        w1, w2 = layer.local_experts[0]
        device = w1.weight.device
        M = layer.num_experts
        self.sums = [torch.zeros(M, w1.in_features, dtype=ACCUMULATOR_DTYPE, device=device),
                     torch.zeros(M, w2.in_features, dtype=ACCUMULATOR_DTYPE, device=device)]
        self.counts = torch.zeros(2, M, dtype=ACCUMULATOR_DTYPE, device=device)
        self._in_dispatch = False
        self._filled: List[Optional[torch.Tensor]] = [None] * layer.num_local_experts
        self._handles = [layer.gate.register_forward_hook(self._after_gate),
                         layer.module.register_forward_hook(self._after_layer)]
        for local_index, (w1, w2) in enumerate(layer.local_experts):
            self._handles.append(w1.register_forward_pre_hook(self._make_w1_hook(local_index)))
            self._handles.append(w2.register_forward_pre_hook(self._make_w2_hook(local_index)))

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
        self._in_dispatch = self._capturing(gate)
        if not self._in_dispatch:
            return
        x = inputs[0].detach()  # [S, d], the tokens the MoE layer dispatches (gate logits use a jittered copy)
        indices = output[3].to(torch.int64)  # [k, S] global expert per route, −1 where dropped or masked
        experts = torch.arange(self.layer.num_experts, device=indices.device)
        routed = (indices.unsqueeze(-1) == experts).any(0).float()  # [S, M]; the k routes name distinct experts
        self.sums[0] += (routed.t() @ x.reshape(routed.shape[0], -1).float()).to(ACCUMULATOR_DTYPE)
        self.counts[0] += routed.sum(0).to(ACCUMULATOR_DTYPE)

    def _after_layer(self, moe, inputs, output) -> None:
        # The masks describe this dispatch only; an expert Linear called outside it records nothing.
        self._in_dispatch = False
        self._filled = [None] * self.layer.num_local_experts

    def _make_w1_hook(self, local_index: int):
        def find_filled_slots(linear, inputs):
            if not self._in_dispatch or not self._capturing(linear):
                return
            x = inputs[0].detach()  # [ep_size, 1, C, d]: one block of C slots per source rank
            self._filled[local_index] = (x != 0).any(-1).reshape(-1)
        return find_filled_slots

    def _make_w2_hook(self, local_index: int):
        def record_hidden(linear, inputs):
            filled = self._filled[local_index]
            if filled is None or not self._capturing(linear):
                return
            self._filled[local_index] = None
            h = inputs[0].detach().reshape(filled.shape[0], -1)
            g = self.first_global + local_index
            self.sums[1][g] += (filled.float() @ h.float()).to(ACCUMULATOR_DTYPE)
            self.counts[1][g] += filled.sum().to(ACCUMULATOR_DTYPE)
        return record_hidden


def flatten_windows(windows: List[LayerInputWindow]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for w in windows for t in (*w.sums, w.counts)])


def unflatten_windows_(windows: List[LayerInputWindow], flat: torch.Tensor) -> None:
    offset = 0
    for w in windows:
        for t in (*w.sums, w.counts):
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
