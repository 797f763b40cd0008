"""OWM/RLS projector math for OMoE (paper A, eqs. 12-14). Pure tensor math: no torch.distributed.

Every tensor here is fp32, whatever the model trains in, because P is a running product of
rank-1 downdates and loses its PSD property quickly in half precision.

A weight W: [d_out, d_in] with bias b is projected over its augmented input x̃ = [x; 1], so the
projector is n×n with n = d_in + 1 and the bias column moves with the weight (as in OWM).
"""
from __future__ import annotations

import torch

PROJECTOR_DTYPE = torch.float32


def identity_projector(n: int, device=None) -> torch.Tensor:
    return torch.eye(n, dtype=PROJECTOR_DTYPE, device=device)


def alpha_at(step: int, alpha0: float, lam: float, total_steps: int | None) -> float:
    """α_i = α0 · λ^(i/n) (eq. 14); constant α0 when λ = 1 (then n is not needed)."""
    if lam == 1.0:
        return float(alpha0)
    if not total_steps:
        raise ValueError("alpha_at: λ < 1 needs total_steps (n in α0·λ^(i/n))")
    return float(alpha0 * lam ** (step / total_steps))


def augmented_mean(input_sum: torch.Tensor, count: torch.Tensor | float, has_bias: bool) -> torch.Tensor:
    """Token-weighted mean of the inputs, with the constant 1 appended when the layer has a bias."""
    mean = (input_sum / float(count)).to(PROJECTOR_DTYPE)  # divide before the cast: sums may be fp64
    if has_bias:
        mean = torch.cat([mean, mean.new_ones(1)])
    return mean


def augmented_rows(X: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Rows X [rows, d_in] as X̃ = [X | 1] (or X) in the projectors' dtype: δᵀX̃ is [G_W | g_b]."""
    X = X.to(PROJECTOR_DTYPE)
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1) if has_bias else X


def rls_factor(P_nn: torch.Tensor, x_n: torch.Tensor, alpha: float) -> torch.Tensor:
    """The rank-1 factor u of one RLS step: P_new = P − u uᵀ (eq. 13).

    k = P x, c = α + xᵀ k, u = k / sqrt(c). Returning u instead of the new P is what lets ranks
    exchange O(n) floats per expert instead of the dense n×n projector.
    """
    return rls_factor_from(P_nn @ x_n, x_n, alpha)


def rls_factor_from(k_n: torch.Tensor, x_n: torch.Tensor, alpha: float) -> torch.Tensor:
    """u from k = P x however P x was formed (dense product, or x − U(Uᵀx) when P is factored)."""
    c = alpha + torch.dot(x_n, k_n)
    if not c > 0:
        raise FloatingPointError(f"RLS denominator α + xᵀPx = {float(c)} is not positive (α={alpha}); "
                                 "P has lost positive semi-definiteness")
    return k_n / torch.sqrt(c)


def apply_factors_(P_nn: torch.Tensor, U_mn: torch.Tensor) -> torch.Tensor:
    """P ← P − Σ_j u_j u_jᵀ for the rows u_j of U, in place; one GEMM so every rank that holds the
    same U gets the same bits."""
    P_nn.sub_(U_mn.T @ U_mn)
    return P_nn


def rls_update_(P_nn: torch.Tensor, x_n: torch.Tensor, alpha: float) -> torch.Tensor:
    """One RLS update in place; returns the factor u."""
    u = rls_factor(P_nn, x_n, alpha)
    P_nn.sub_(torch.outer(u, u))
    return u


def loo_divisor_value(divisor: str, num_experts: int) -> int:
    if divisor == "M-1":
        return num_experts - 1
    if divisor == "M":
        return num_experts
    raise ValueError(f"loo_divisor must be 'M-1' or 'M', got {divisor!r}")


def leave_one_out_mean(S_nn: torch.Tensor, P_nn: torch.Tensor, divisor: int) -> torch.Tensor:
    """P̄_m = (S − P_m) / divisor, with S = Σ_j P_j over all experts of the layer (eq. 12)."""
    return (S_nn - P_nn) / divisor


def project_augmented_grad(grad_w: torch.Tensor, grad_b: torch.Tensor | None, P_bar: torch.Tensor):
    """Reference form of the O-step projection: [G_W | g_b] ← [G_W | g_b] · P̄."""
    G = grad_w.to(PROJECTOR_DTYPE)
    if grad_b is not None:
        G = torch.cat([G, grad_b.to(PROJECTOR_DTYPE).unsqueeze(1)], dim=1)
    G = G @ P_bar
    if grad_b is None:
        return G.to(grad_w.dtype), None
    return G[:, :-1].to(grad_w.dtype), G[:, -1].to(grad_b.dtype)


def project_weight_grad(grad_w: torch.Tensor, bias_grad_sum: torch.Tensor | None, P_bar: torch.Tensor) -> torch.Tensor:
    """The weight half of [G_W | g_b]·P̄: G_W·A + g_b cᵀ, with P̄ = [[A, c], [cᵀ, e]].

    The weight's and the bias's gradients reach their hooks separately, so each half is computed
    from its own gradient plus a side term the layer's output-grad hook provides (g_b here).
    """
    if bias_grad_sum is None:
        return (grad_w.to(PROJECTOR_DTYPE) @ P_bar).to(grad_w.dtype)
    d_in = grad_w.shape[1]
    out = grad_w.to(PROJECTOR_DTYPE) @ P_bar[:d_in, :d_in]
    out.add_(torch.outer(bias_grad_sum.to(PROJECTOR_DTYPE), P_bar[:d_in, d_in]))
    return out.to(grad_w.dtype)


def project_bias_grad(grad_b: torch.Tensor, weight_grad_dot_c: torch.Tensor, P_bar_corner: torch.Tensor) -> torch.Tensor:
    """The bias half of [G_W | g_b]·P̄: G_W c + e g_b, where e = P̄[n−1, n−1] and G_W c = δᵀ(X c)
    comes from the output hook."""
    out = weight_grad_dot_c.to(PROJECTOR_DTYPE) + P_bar_corner * grad_b.to(PROJECTOR_DTYPE)
    return out.to(grad_b.dtype)
