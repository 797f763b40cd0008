"""Which side of the weight gradient an O step projects on, per (layer, stream), and the layer's ProjectorView.

The same [G_W | g_b]·P̄ comes two ways (P̄ symmetric, X̃ = [X | 1] where the matrices have a bias):
- gradient side: autograd forms G = δᵀX̃ (T·D·n multiply-adds), then a hook projects it, E_local·D·c;
- token side: X̃·P̄ (T·c), then δᵀ(X̃·P̄) *in place of* autograd's product (T·D·n, the same GEMM's size),
where T = rows the stream's local experts received (native DeepSpeed experts: the filled capacity slots; in O
steps OMoE runs their Linears on those rows on either side, so the padding costs neither), D = Σ out features
of one expert's matrices reading the stream (SwiGLU's gate and up share X̃·P̄), c = one row times P̄ (n² dense,
2·n·M·t factored). The choice is made at the stream's first forward of each O step, from that micro-batch's T,
and kept for the step's other micro-batches (either side is exact; a fixed side keeps the step's report simple).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .projector_state import StreamProjectors

SIDES = ("auto", "gradient", "token")


def side_costs(token_rows: int, out_features: int, num_local: int, n: int, row_cost: int) -> Dict[str, int]:
    """Multiply-adds of one micro-batch's projected weight gradients for one (layer, stream), both sides."""
    gemm = token_rows * out_features * n  # δᵀX̃ (autograd) or δᵀ(X̃·P̄) (token side): one of them always runs
    return {"gradient": gemm + num_local * out_features * row_cost, "token": token_rows * row_cost + gemm}


def choose_side(mode: str, costs: Dict[str, int]) -> str:
    if mode not in SIDES:
        raise ValueError(f"projection side must be one of {SIDES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "token" if costs["token"] < costs["gradient"] else "gradient"


class LayerProjection:
    """The ProjectorView of one MoE layer (experts/base.py): products with P̄ in the stored form, and the
    side each stream projects on in the current O step."""

    def __init__(self, stores: Callable[[], Sequence[StreamProjectors]], mode: Callable[[], str]):
        self._stores, self._mode = stores, mode
        self._sides: Dict[int, Dict[str, object]] = {}  # this O step's decision per stream
        self.last_sides: Dict[int, Dict[str, object]] = {}  # the last finished O step's, for reports

    # ---- products -----------------------------------------------------------------------------
    def weight_product(self, s: int, l: int, G: torch.Tensor, d: int) -> torch.Tensor:
        return self._stores()[s].weight_product(G, l, d)

    def weight_product_stack(self, s: int, G: torch.Tensor) -> torch.Tensor:
        return self._stores()[s].weight_product_stack(G)

    def bias_column(self, s: int, l: int) -> torch.Tensor:
        return self._stores()[s].bias_column(l)

    def bias_corner(self, s: int, l: int) -> torch.Tensor:
        return self._stores()[s].bias_corner(l)

    def token_product(self, s: int, l: int, X: torch.Tensor) -> torch.Tensor:
        return self._stores()[s].token_product(X, l)

    # ---- the side -----------------------------------------------------------------------------
    def side(self, s: int) -> Optional[str]:
        """The side stream s projects on in this O step; None before its first forward decided it."""
        decision = self._sides.get(s)
        return None if decision is None else decision["side"]

    def choose(self, s: int, token_rows: int, out_features: int) -> str:
        """Decide stream s's side for this O step (first call) and return it."""
        if s not in self._sides:
            store = self._stores()[s]
            costs = side_costs(token_rows, out_features, store.num_local, store.n, store.row_cost())
            mode = self._mode()
            self._sides[s] = {"side": choose_side(mode, costs), "mode": mode, "token_rows": token_rows,
                              "out_features": out_features, "cost_gradient": costs["gradient"],
                              "cost_token": costs["token"]}
        return self._sides[s]["side"]

    def end_o_step(self) -> None:
        if self._sides:
            self.last_sides = self._sides
        self._sides = {}

    def report(self, s: int) -> Optional[Dict[str, object]]:
        return self._sides.get(s, self.last_sides.get(s))


def side_report(projections: List[LayerProjection], streams: Sequence[str]) -> List[Dict[str, object]]:
    """Per layer and stream: the side of the current (or last) O step and both sides' multiply-adds."""
    return [{"layer": L, "stream": name, **(view.report(s) or {"side": None})}
            for L, view in enumerate(projections) for s, name in enumerate(streams)]
