"""The projectors of one (MoE layer, input stream), dense or factored. Pure tensor math: no torch.distributed.

Every P_j starts at I and loses one rank-1 term per O step (RLS, eq. 13), so after t O steps
P_j = I − U_j U_jᵀ exactly, with U_j [n, t] the factors the exchange already sends. Three forms:
- factored: V [n, M, t] holds every expert's factors (all M, in global order: S needs them all), so
  P_j = I − V[:, j] V[:, j]ᵀ and S = Σ_j P_j = M·I − Σ_j V_j V_jᵀ; no n×n matrix is ever formed:
  P_j x = x − U_j(U_jᵀ x), and G·P̄_l = a·G − (G V_{-l})·V_{-l}ᵀ / divisor, a = (M − 1) / divisor,
  because S − P_l = (M − 1)·I − Σ_{j≠l} V_j V_jᵀ (V_{-l}: V without l's columns, gathered once per O step
  where few experts are local; else (G V) with l's columns zeroed);
- hybrid: S [n, n] dense and W [n, E_local, t] this rank's experts' factors only, so
  G·P̄_l = (G·S − G + (G W_l) W_lᵀ) / divisor: a row costs n² + 2·n·t, whatever M is;
- dense: P [E_local, n, n] for this rank's experts and S [n, n], updated in place (P ← P − uuᵀ).
"auto" holds the form with the fewest bytes, n·M·t, n² + n·E_local·t or (E_local + 1)·n²: factored
first, hybrid once t > n / (M − E_local), dense once t > n; it only moves forward. Every form gives
the same P̄ up to fp32 rounding (tests/test_projector.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .projector import PROJECTOR_DTYPE, augmented_rows

STORAGES = ("auto", "factored", "hybrid", "dense")
FORMS = STORAGES[1:]


class StreamProjectors:
    def __init__(self, n: int, num_experts: int, num_local: int, first_global: int, divisor: int, device=None,
                 storage: str = "auto"):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.n, self.num_experts, self.num_local, self.first_global = n, num_experts, num_local, first_global
        self.divisor, self.storage, self.device = divisor, storage, device
        self.V: Optional[torch.Tensor] = torch.zeros(n, num_experts, 0, dtype=PROJECTOR_DTYPE, device=device)
        self.W: Optional[torch.Tensor] = None   # hybrid form: local experts' factors [n, E_local, t]
        self.P: Optional[torch.Tensor] = None   # dense form
        self.S: Optional[torch.Tensor] = None   # hybrid and dense forms
        self._pbar: Optional[torch.Tensor] = None  # dense P̄ [E_local, n, n], built once per O step
        self._others: Optional[torch.Tensor] = None  # factored: V_{-l} [E_local, n, (M − 1)·t], once per O step
        if storage == "dense":
            self._to_dense()
        elif storage == "hybrid":
            self._to_hybrid()

    # ---- form ---------------------------------------------------------------------------------
    @property
    def form(self) -> str:
        return "dense" if self.P is not None else "hybrid" if self.W is not None else "factored"

    @property
    def steps(self) -> int:
        """O steps taken while factors were kept (−1 once dense: the count is not stored there)."""
        factors = self.V if self.V is not None else self.W
        return factors.shape[2] if factors is not None else -1

    def nbytes(self) -> int:
        tensors = {"factored": (self.V,), "hybrid": (self.S, self.W), "dense": (self.P, self.S)}[self.form]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_nbytes(self) -> int:
        return estimate_bytes(self.n, self.num_experts, self.num_local, 0, "dense")

    def _eye(self) -> torch.Tensor:
        return torch.eye(self.n, dtype=PROJECTOR_DTYPE, device=self.device)

    def _local_factors(self) -> torch.Tensor:
        """[n, E_local, t] of this rank's experts, from V or W."""
        if self.W is not None:
            return self.W
        return self.V[:, self.first_global:self.first_global + self.num_local]

    def _to_hybrid(self) -> None:
        flat = self.V.reshape(self.n, -1)
        self.S = self.num_experts * self._eye() - flat @ flat.T
        self.W = self._local_factors().clone()
        self.V = None

    def _to_dense(self) -> None:
        local = self._local_factors()
        self.P = self._eye() - torch.einsum("ilt,jlt->lij", local, local)
        if self.S is None:
            flat = self.V.reshape(self.n, -1)
            self.S = self.num_experts * self._eye() - flat @ flat.T
        self.V = self.W = None

    def _settle(self) -> None:
        """"auto": move forward to the form with the fewest bytes at this t."""
        if self.storage != "auto" or self.form == "dense":
            return
        t = self.steps
        sizes = {f: estimate_bytes(self.n, self.num_experts, self.num_local, t, f) for f in FORMS}
        best = min(FORMS, key=lambda f: (sizes[f], FORMS.index(f)))
        if FORMS.index(best) > FORMS.index(self.form):
            self._to_dense() if best == "dense" else self._to_hybrid()

    # ---- the RLS update -------------------------------------------------------------------------
    def times(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """P_l x for local expert l."""
        if self.P is not None:
            return self.P[local] @ x
        U = self._local_factors()[:, local]
        return x - U @ (U.T @ x)

    def apply_factors_(self, U_all: torch.Tensor) -> None:
        """One O step's factors u_j (rows of U_all [M, n], global order; 0 for an expert without tokens)."""
        local = U_all[self.first_global:self.first_global + self.num_local]  # [E_local, n]
        if self.S is not None:
            self.S.sub_(U_all.T @ U_all)  # one GEMM: every rank holding the same U gets the same bits
        if self.P is not None:
            for l in range(self.num_local):
                self.P[l].sub_(torch.outer(local[l], local[l]))
        elif self.W is not None:
            self.W = torch.cat([self.W, local.T.unsqueeze(-1)], dim=2)
        else:
            self.V = torch.cat([self.V, U_all.T.unsqueeze(-1)], dim=2)
        self._settle()
        self.release_o_step()

    # ---- P̄ = (S − P_l) / divisor --------------------------------------------------------------
    @property
    def identity_scale(self) -> float:
        return (self.num_experts - 1) / self.divisor

    def _dense_pbar(self) -> torch.Tensor:
        if self._pbar is None:
            self._pbar = (self.S.unsqueeze(0) - self.P) / self.divisor
        return self._pbar

    def release_o_step(self) -> None:
        """Drop what was built for the O step (P̄, or the leave-one-out factors): the held form's memory again."""
        self._pbar = self._others = None

    def _gathers_others(self) -> bool:
        """Factored: gather each local expert's V_{-l} once per O step where that costs at most 3× V's memory
        (few local experts), so products skip the expert's own t factors (1/M of the work, 25% at M = 4)."""
        return self.V is not None and self.num_local * (self.num_experts - 1) <= 3 * self.num_experts

    def _others_stack(self) -> torch.Tensor:
        """[E_local, n, (M − 1)·t]: every expert's factors but local expert l's, per l."""
        if self._others is None:
            keep = [[j for j in range(self.num_experts) if j != self.first_global + l] for l in range(self.num_local)]
            self._others = torch.stack([self.V[:, columns].reshape(self.n, -1) for columns in keep])
        return self._others

    def _times_others(self, G: torch.Tensor, local: int, rows: slice) -> torch.Tensor:
        """(G · V[rows] with local expert l's columns zeroed) · V[rows]ᵀ: G [.., r] → [.., r]."""
        if self._gathers_others():
            others = self._others_stack()[local, rows]
            return (G @ others) @ others.T
        V = self.V[rows].reshape(-1, self.V.shape[1] * self.V.shape[2])
        GV = (G @ V).view(*G.shape[:-1], self.num_experts, -1)
        GV[..., self.first_global + local, :] = 0
        return GV.reshape(*G.shape[:-1], -1) @ V.T

    def weight_product(self, G: torch.Tensor, local: int, d: int) -> torch.Tensor:
        """G [rows, d] · P̄_l[:d, :d], fp32 (d = n, or n − 1 where the stream has a bias)."""
        if self.P is not None:
            return G @ self._dense_pbar()[local, :d, :d]
        if self.W is not None:
            W = self.W[:d, local]
            return (G @ self.S[:d, :d] - G + (G @ W) @ W.T) / self.divisor
        return self.identity_scale * G - self._times_others(G, local, slice(0, d)) / self.divisor

    def weight_product_stack(self, G: torch.Tensor) -> torch.Tensor:
        """G [E_local, rows, n] · P̄ for every local expert (one batched product; no bias)."""
        if self.P is not None:
            return torch.bmm(G, self._dense_pbar())
        if self.W is not None:
            W = self.W.permute(1, 0, 2)  # [E_local, n, t]
            return (G @ self.S - G + torch.bmm(torch.bmm(G, W), W.transpose(1, 2))) / self.divisor
        if self._gathers_others():
            others = self._others_stack()
            return self.identity_scale * G - torch.bmm(torch.bmm(G, others), others.transpose(1, 2)) / self.divisor
        flat = self.V.reshape(self.n, -1)                       # [n, M·t]
        GV = (G @ flat).view(G.shape[0], G.shape[1], self.num_experts, -1)
        local = torch.arange(self.num_local, device=G.device)
        GV[local, :, self.first_global + local] = 0             # leave each expert's own factors out
        return self.identity_scale * G - GV.reshape(G.shape[0], G.shape[1], -1) @ flat.T / self.divisor

    def token_product(self, X: torch.Tensor, local: int) -> torch.Tensor:
        """X̃·P̄_l [rows, n] fp32 for rows X [rows, d_in] of local expert l, X̃ = [X | 1] where the stream has a
        bias (d_in = n − 1): the token side of the projection, δᵀ(X̃·P̄) = [G_W | g_b]·P̄ (P̄ is symmetric)."""
        return self.weight_product(augmented_rows(X, X.shape[-1] == self.n - 1), local, self.n)

    def row_cost(self) -> int:
        """Multiply-adds of one row times P̄: n² dense; factored, (row·V_{-l})·V_{-l}ᵀ over the other experts'
        (M − 1)·t factors (M·t where l's are zeroed instead of left out);
        hybrid, row·S plus (row·W_l)·W_lᵀ over the expert's own t."""
        if self.P is not None:
            return self.n * self.n
        if self.W is not None:
            return self.n * self.n + 2 * self.n * self.steps
        return 2 * self.n * (self.num_experts - self._gathers_others()) * self.steps

    def _bias_coordinate_of_others(self, local: int) -> torch.Tensor:
        """The bias coordinate (row n − 1) of every factor but local expert l's, flat [M·t]."""
        last = self.V[self.n - 1].clone()
        last[self.first_global + local] = 0
        return last.reshape(-1)

    def bias_column(self, local: int) -> torch.Tensor:
        """P̄_l[:-1, -1]."""
        if self.P is not None:
            return self._dense_pbar()[local, :-1, -1]
        if self.W is not None:
            return (self.S[:-1, -1] + self.W[:-1, local] @ self.W[-1, local]) / self.divisor
        return -(self.V[:-1].reshape(self.n - 1, -1) @ self._bias_coordinate_of_others(local)) / self.divisor

    def bias_corner(self, local: int) -> torch.Tensor:
        """P̄_l[-1, -1]."""
        if self.P is not None:
            return self._dense_pbar()[local, -1, -1]
        if self.W is not None:
            return (self.S[-1, -1] - 1 + self.W[-1, local] @ self.W[-1, local]) / self.divisor
        last = self._bias_coordinate_of_others(local)
        return self.identity_scale - (last @ last) / self.divisor

    # ---- inspection and checkpoints -------------------------------------------------------------
    def dense_local(self) -> torch.Tensor:
        """P [E_local, n, n] of this rank's experts, whatever the form."""
        if self.P is not None:
            return self.P
        local = self._local_factors()
        return self._eye() - torch.einsum("ilt,jlt->lij", local, local)

    def dense_sum(self) -> torch.Tensor:
        """S = Σ_j P_j over every expert, whatever the form."""
        if self.S is not None:
            return self.S
        flat = self.V.reshape(self.n, -1)
        return self.num_experts * torch.eye(self.n, dtype=PROJECTOR_DTYPE, device=self.device) - flat @ flat.T

    def load_factored_(self, V: torch.Tensor) -> None:
        """Take every expert's saved factors [n, M, t] (a factored checkpoint); other storages form theirs."""
        self.release_o_step()
        self.V, self.W, self.P, self.S = V.to(PROJECTOR_DTYPE).clone(), None, None, None
        if self.storage == "dense":
            self._to_dense()
        elif self.storage == "hybrid":
            self._to_hybrid()
        self._settle()

    def load_hybrid_(self, W_local: torch.Tensor, S: torch.Tensor, V_every: Optional[torch.Tensor] = None) -> None:
        """Take saved local factors [n, E_local, t] and S (a hybrid checkpoint); factored storage needs every
        expert's factors V [n, M, t] (each expert's file holds its own)."""
        self.release_o_step()
        self.V = self.W = self.P = self.S = None
        if self.storage == "factored":
            self.V = V_every.to(PROJECTOR_DTYPE).clone()
            return
        self.W, self.S = W_local.to(PROJECTOR_DTYPE).clone(), S.to(PROJECTOR_DTYPE).clone()
        if self.storage == "dense":
            self._to_dense()
        self._settle()

    def load_dense_(self, P_local: torch.Tensor, S: torch.Tensor, P_every: Optional[torch.Tensor] = None) -> None:
        """Take saved dense P [E_local, n, n] and S; factored storage needs every expert's P [M, n, n] and
        refactors each as I − UUᵀ, hybrid storage this rank's (exact up to the eigensolver's rounding)."""
        self.release_o_step()
        self.W = None
        if self.storage in ("auto", "dense"):
            self.P, self.S, self.V = P_local.to(PROJECTOR_DTYPE).clone(), S.to(PROJECTOR_DTYPE).clone(), None
            return
        factors = [factors_of(P) for P in (P_every if self.storage == "factored" else P_local)]
        t = max(U.shape[1] for U in factors)
        stacked = torch.stack([torch.nn.functional.pad(U, (0, t - U.shape[1])) for U in factors], dim=1)
        self.P = None
        if self.storage == "factored":
            self.V, self.S = stacked, None
        else:
            self.V, self.W, self.S = None, stacked, S.to(PROJECTOR_DTYPE).clone()


def factors_of(P: torch.Tensor) -> torch.Tensor:
    """U [n, r] with P = I − UUᵀ, from a dense projector (I − P is PSD with rank at most the updates it took)."""
    eigenvalues, vectors = torch.linalg.eigh(torch.eye(P.shape[0], dtype=torch.float64) - P.double())
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * P.shape[0] * torch.finfo(PROJECTOR_DTYPE).eps
    return (vectors[:, keep] * eigenvalues[keep].sqrt()).to(PROJECTOR_DTYPE)


def estimate_bytes(n: int, num_experts: int, num_local: int, o_steps: int, storage: str = "auto") -> int:
    """Projector bytes one rank holds for one (layer, stream) after `o_steps` O steps (fp32): every expert's
    factors n·M·t factored; S and the local factors n² + n·E_local·t hybrid; (E_local + 1)·n² dense;
    "auto" holds the smallest (the forms it moves through are in that order as t grows)."""
    item = torch.finfo(PROJECTOR_DTYPE).bits // 8
    sizes = {"factored": n * num_experts * o_steps * item, "hybrid": (n * n + n * num_local * o_steps) * item,
             "dense": (num_local + 1) * n * n * item}
    return min(sizes.values()) if storage == "auto" else sizes[storage]


def estimate_model_bytes(streams_n, num_layers: int, num_experts: int, ep_size: int, o_steps: int,
                         storage: str = "auto") -> int:
    """Per rank, for `num_layers` MoE layers whose streams have sizes `streams_n` (e.g. (d + 1, ff + 1))."""
    return num_layers * sum(estimate_bytes(n, num_experts, num_experts // ep_size, o_steps, storage)
                            for n in streams_n)
