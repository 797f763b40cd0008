"""The projectors of one (MoE layer, input stream), dense or factored. Pure tensor math: no torch.distributed.

Every P_j starts at I and loses one rank-1 term per O step (RLS, eq. 13), so after t O steps
P_j = I − U_j U_jᵀ exactly, with U_j [n, t] the factors the exchange already sends. Two forms:
- factored: V [n, M, t] holds every expert's factors (all M, in global order: S needs them all), so
  P_j = I − V[:, j] V[:, j]ᵀ and S = Σ_j P_j = M·I − Σ_j V_j V_jᵀ; no n×n matrix is ever formed:
  P_j x = x − U_j(U_jᵀ x), and G·P̄_l = a·G − ((G V) with l's columns zeroed)·Vᵀ / divisor,
  a = (M − 1) / divisor, because S − P_l = (M − 1)·I − Σ_{j≠l} V_j V_jᵀ;
- dense: P [E_local, n, n] for this rank's experts and S [n, n], updated in place (P ← P − uuᵀ).
"auto" stays factored while its bytes, n·M·t, are below the dense form's, (E_local + 1)·n², then
turns dense for good. Both forms give the same P̄ up to fp32 rounding (tests/test_projector.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .projector import PROJECTOR_DTYPE

STORAGES = ("auto", "factored", "dense")


class StreamProjectors:
    def __init__(self, n: int, num_experts: int, num_local: int, first_global: int, divisor: int, device=None,
                 storage: str = "auto"):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.n, self.num_experts, self.num_local, self.first_global = n, num_experts, num_local, first_global
        self.divisor, self.storage, self.device = divisor, storage, device
        self.V: Optional[torch.Tensor] = torch.zeros(n, num_experts, 0, dtype=PROJECTOR_DTYPE, device=device)
        self.P: Optional[torch.Tensor] = None   # dense form
        self.S: Optional[torch.Tensor] = None
        self._pbar: Optional[torch.Tensor] = None  # dense P̄ [E_local, n, n], built once per O step
        if storage == "dense":
            self._to_dense()

    # ---- form ---------------------------------------------------------------------------------
    @property
    def form(self) -> str:
        return "dense" if self.P is not None else "factored"

    @property
    def steps(self) -> int:
        return self.V.shape[2] if self.V is not None else -1

    def nbytes(self) -> int:
        tensors = (self.V,) if self.P is None else (self.P, self.S)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_nbytes(self) -> int:
        return (self.num_local + 1) * self.n * self.n * torch.finfo(PROJECTOR_DTYPE).bits // 8

    def _to_dense(self) -> None:
        eye = torch.eye(self.n, dtype=PROJECTOR_DTYPE, device=self.device)
        V = self.V
        local = V[:, self.first_global:self.first_global + self.num_local]  # [n, E_local, t]
        self.P = eye - torch.einsum("ilt,jlt->lij", local, local)
        flat = V.reshape(self.n, -1)
        self.S = self.num_experts * eye - flat @ flat.T
        self.V = None

    # ---- the RLS update -------------------------------------------------------------------------
    def times(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """P_l x for local expert l."""
        if self.P is not None:
            return self.P[local] @ x
        U = self.V[:, self.first_global + local]
        return x - U @ (U.T @ x)

    def apply_factors_(self, U_all: torch.Tensor) -> None:
        """One O step's factors u_j (rows of U_all [M, n], global order; 0 for an expert without tokens)."""
        if self.P is not None:
            self.S.sub_(U_all.T @ U_all)  # one GEMM: every rank holding the same U gets the same bits
            for l in range(self.num_local):
                u = U_all[self.first_global + l]
                self.P[l].sub_(torch.outer(u, u))
        else:
            self.V = torch.cat([self.V, U_all.T.unsqueeze(-1)], dim=2)
            if self.storage == "auto" and self.nbytes() > self.dense_nbytes():
                self._to_dense()
        self._pbar = None

    # ---- P̄ = (S − P_l) / divisor --------------------------------------------------------------
    @property
    def identity_scale(self) -> float:
        return (self.num_experts - 1) / self.divisor

    def _dense_pbar(self) -> torch.Tensor:
        if self._pbar is None:
            self._pbar = (self.S.unsqueeze(0) - self.P) / self.divisor
        return self._pbar

    def release_o_step(self) -> None:
        """Drop the P̄ built for the O step (its memory is the dense form's again)."""
        self._pbar = None

    def _times_others(self, G: torch.Tensor, local: int, rows: slice) -> torch.Tensor:
        """(G · V[rows] with local expert l's columns zeroed) · V[rows]ᵀ: G [.., r] → [.., r]."""
        V = self.V[rows].reshape(-1, self.V.shape[1] * self.V.shape[2])
        GV = (G @ V).view(*G.shape[:-1], self.num_experts, -1)
        GV[..., self.first_global + local, :] = 0
        return GV.reshape(*G.shape[:-1], -1) @ V.T

    def weight_product(self, G: torch.Tensor, local: int, d: int) -> torch.Tensor:
        """G [rows, d] · P̄_l[:d, :d], fp32 (d = n, or n − 1 where the stream has a bias)."""
        if self.P is not None:
            return G @ self._dense_pbar()[local, :d, :d]
        return self.identity_scale * G - self._times_others(G, local, slice(0, d)) / self.divisor

    def weight_product_stack(self, G: torch.Tensor) -> torch.Tensor:
        """G [E_local, rows, n] · P̄ for every local expert (one batched product; no bias)."""
        if self.P is not None:
            return torch.bmm(G, self._dense_pbar())
        flat = self.V.reshape(self.n, -1)                       # [n, M·t]
        GV = (G @ flat).view(G.shape[0], G.shape[1], self.num_experts, -1)
        local = torch.arange(self.num_local, device=G.device)
        GV[local, :, self.first_global + local] = 0             # leave each expert's own factors out
        return self.identity_scale * G - GV.reshape(G.shape[0], G.shape[1], -1) @ flat.T / self.divisor

    def token_product(self, X: torch.Tensor, local: int) -> torch.Tensor:
        """X̃·P̄_l [rows, n] fp32 for rows X [rows, d_in] of local expert l, X̃ = [X | 1] where the stream has a
        bias (d_in = n − 1): the token side of the projection, δᵀ(X̃·P̄) = [G_W | g_b]·P̄ (P̄ is symmetric)."""
        X = X.to(PROJECTOR_DTYPE)
        if X.shape[-1] == self.n - 1:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        return self.weight_product(X, local, self.n)

    def row_cost(self) -> int:
        """Multiply-adds of one row times P̄: n² dense; factored, (row·V)·Vᵀ over every expert's M·t factors."""
        return self.n * self.n if self.P is not None else 2 * self.n * self.num_experts * self.steps

    def _bias_coordinate_of_others(self, local: int) -> torch.Tensor:
        """The bias coordinate (row n − 1) of every factor but local expert l's, flat [M·t]."""
        last = self.V[self.n - 1].clone()
        last[self.first_global + local] = 0
        return last.reshape(-1)

    def bias_column(self, local: int) -> torch.Tensor:
        """P̄_l[:-1, -1]."""
        if self.P is not None:
            return self._dense_pbar()[local, :-1, -1]
        return -(self.V[:-1].reshape(self.n - 1, -1) @ self._bias_coordinate_of_others(local)) / self.divisor

    def bias_corner(self, local: int) -> torch.Tensor:
        """P̄_l[-1, -1]."""
        if self.P is not None:
            return self._dense_pbar()[local, -1, -1]
        last = self._bias_coordinate_of_others(local)
        return self.identity_scale - (last @ last) / self.divisor

    # ---- inspection and checkpoints -------------------------------------------------------------
    def dense_local(self) -> torch.Tensor:
        """P [E_local, n, n] of this rank's experts, whatever the form."""
        if self.P is not None:
            return self.P
        eye = torch.eye(self.n, dtype=PROJECTOR_DTYPE, device=self.device)
        local = self.V[:, self.first_global:self.first_global + self.num_local]
        return eye - torch.einsum("ilt,jlt->lij", local, local)

    def dense_sum(self) -> torch.Tensor:
        """S = Σ_j P_j over every expert, whatever the form."""
        if self.S is not None:
            return self.S
        flat = self.V.reshape(self.n, -1)
        return self.num_experts * torch.eye(self.n, dtype=PROJECTOR_DTYPE, device=self.device) - flat @ flat.T

    def load_factored_(self, V: torch.Tensor) -> None:
        """Take every expert's saved factors [n, M, t]; dense storage forms P and S from them."""
        self.V, self.P, self.S, self._pbar = V.to(PROJECTOR_DTYPE).clone(), None, None, None
        if self.storage == "dense" or (self.storage == "auto" and self.nbytes() > self.dense_nbytes()):
            self._to_dense()

    def load_dense_(self, P_local: torch.Tensor, S: torch.Tensor, P_every: Optional[torch.Tensor] = None) -> None:
        """Take saved dense P [E_local, n, n] and S; factored storage needs every expert's P [M, n, n] and
        refactors each as I − UUᵀ (exact up to the eigensolver's rounding)."""
        self._pbar = None
        if self.storage != "factored":
            self.P, self.S, self.V = P_local.to(PROJECTOR_DTYPE).clone(), S.to(PROJECTOR_DTYPE).clone(), None
            return
        factors = [factors_of(P) for P in P_every]
        t = max(U.shape[1] for U in factors)
        self.V = torch.stack([torch.nn.functional.pad(U, (0, t - U.shape[1])) for U in factors], dim=1)
        self.P = self.S = None


def factors_of(P: torch.Tensor) -> torch.Tensor:
    """U [n, r] with P = I − UUᵀ, from a dense projector (I − P is PSD with rank at most the updates it took)."""
    eigenvalues, vectors = torch.linalg.eigh(torch.eye(P.shape[0], dtype=torch.float64) - P.double())
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * P.shape[0] * torch.finfo(PROJECTOR_DTYPE).eps
    return (vectors[:, keep] * eigenvalues[keep].sqrt()).to(PROJECTOR_DTYPE)


def estimate_bytes(n: int, num_experts: int, num_local: int, o_steps: int, storage: str = "auto") -> int:
    """Projector bytes one rank holds for one (layer, stream) after `o_steps` O steps: the factors of every
    expert (n·M·t fp32) while factored, (E_local + 1)·n² fp32 once dense; "auto" holds the smaller."""
    item = torch.finfo(PROJECTOR_DTYPE).bits // 8
    factored, dense = n * num_experts * o_steps * item, (num_local + 1) * n * n * item
    return {"factored": factored, "dense": dense, "auto": factored if factored <= dense else dense}[storage]


def estimate_model_bytes(streams_n, num_layers: int, num_experts: int, ep_size: int, o_steps: int,
                         storage: str = "auto") -> int:
    """Per rank, for `num_layers` MoE layers whose streams have sizes `streams_n` (e.g. (d + 1, ff + 1))."""
    return num_layers * sum(estimate_bytes(n, num_experts, num_experts // ep_size, o_steps, storage)
                            for n in streams_n)
