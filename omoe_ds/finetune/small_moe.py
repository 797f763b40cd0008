"""A small MoE sequence classifier and a seeded synthetic task, for the demo job, tests and bench.

Each sequence of class y holds tokens x_t = s_t·p_y + σ·ε with random signs s_t = ±1, so mean
pooling the raw tokens cancels the class signal: the per-token nonlinear FFN experts must learn it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import make_moe_ffn


@dataclass(frozen=True)
class SmallMoESpec:
    d_in: int = 16
    d_model: int = 32
    d_ff: int = 64
    num_layers: int = 2
    num_experts: int = 4
    num_classes: int = 6
    seq_len: int = 8


class SmallMoEClassifier(nn.Module):
    def __init__(self, spec: SmallMoESpec, ep_size: int = 1):
        super().__init__()
        self.spec = spec
        self.embed = nn.Linear(spec.d_in, spec.d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(spec.d_model) for _ in range(spec.num_layers))
        # Deterministic, lossless routing and aux-loss coefficient 0: equal results across EP sizes.
        self.moes = nn.ModuleList(
            make_moe_ffn(spec.d_model, spec.d_ff, spec.num_experts, ep_size=ep_size, k=1, drop_tokens=False,
                         use_rts=False, min_capacity=0) for _ in range(spec.num_layers))
        self.head = nn.Linear(spec.d_model, spec.num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for norm, moe in zip(self.norms, self.moes):
            out, _aux_loss, _counts = moe(norm(h))
            h = h + out
        return self.head(h.mean(dim=1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), labels)


def make_task(spec: SmallMoESpec, num_samples: int, seed: int, noise: float = 1.6):
    """(x [N, T, d_in], y [N]); the class prototypes depend only on spec, the samples on seed."""
    prototypes = torch.randn(spec.num_classes, spec.d_in, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(spec.num_classes, (num_samples,), generator=g)
    signs = torch.randint(0, 2, (num_samples, spec.seq_len, 1), generator=g).float() * 2 - 1
    x = signs * prototypes[y].unsqueeze(1) + noise * torch.randn(num_samples, spec.seq_len, spec.d_in, generator=g)
    return x, y
