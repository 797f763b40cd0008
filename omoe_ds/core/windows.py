"""The R-step input windows: per MoE layer and global expert, each stream's input sums and counts.

Laid out per *global* expert on every rank, so one all-reduce over the whole world per O step turns
every rank's partial sums into every expert's totals, whatever the layout adds where: DeepSpeed's
native layer adds both streams where the expert runs; the fused layouts add x where the tokens are
routed. Recorders (one per layout, omoe_ds/experts) fill it through the add_* methods; nothing here
knows a MoE class or a collective.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

ACCUMULATOR_DTYPE = torch.float64  # window sums span many steps; the bytes are negligible


class InputWindow:
    """The open window of one MoE layer, this rank's partial sums: sums[s] [M, d_s] (s = 0 for x,
    1 for h), counts [2, M]."""

    def __init__(self, num_experts: int, dims: Sequence[int], device):
        self.num_experts = num_experts
        self.sums = [torch.zeros(num_experts, d, dtype=ACCUMULATOR_DTYPE, device=device) for d in dims]
        self.counts = torch.zeros(len(dims), num_experts, dtype=ACCUMULATOR_DTYPE, device=device)

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.counts.zero_()

    def add_routed(self, stream: int, routed: torch.Tensor, rows: torch.Tensor) -> None:
        """routed [T, M] 0/1 (token t went to expert g; its k routes name distinct experts), rows [T, d]."""
        routed = routed.float()
        self.sums[stream] += (routed.t() @ rows.reshape(routed.shape[0], -1).float()).to(ACCUMULATOR_DTYPE)
        self.counts[stream] += routed.sum(0).to(ACCUMULATOR_DTYPE)

    def add_expert(self, stream: int, global_expert: int, row_sum: torch.Tensor, count) -> None:
        self.sums[stream][global_expert] += row_sum.to(ACCUMULATOR_DTYPE)
        self.counts[stream][global_expert] += torch.as_tensor(count, dtype=ACCUMULATOR_DTYPE)

    def add_experts(self, stream: int, first_global: int, row_sums: torch.Tensor, counts: torch.Tensor) -> None:
        """row_sums [E, d] and counts [E] of global experts first_global .. first_global + E − 1."""
        block = slice(first_global, first_global + row_sums.shape[0])
        self.sums[stream][block] += row_sums.to(ACCUMULATOR_DTYPE)
        self.counts[stream][block] += counts.to(ACCUMULATOR_DTYPE)

    def add_per_expert(self, stream: int, expert_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [R, d], expert_ids [R] global expert of each row (one row per token and route)."""
        self.sums[stream].index_add_(0, expert_ids, rows.to(ACCUMULATOR_DTYPE))
        self.counts[stream].index_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=ACCUMULATOR_DTYPE))


def flatten_windows(windows: List[InputWindow]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for w in windows for t in (*w.sums, w.counts)])


def unflatten_windows_(windows: List[InputWindow], flat: torch.Tensor) -> None:
    offset = 0
    for w in windows:
        for t in (*w.sums, w.counts):
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
