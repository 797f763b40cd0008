"""Projector math against closed forms (fp32, no torch.distributed)."""
import pytest
import torch

from omoe_ds import projector as pj


def test_rls_updates_match_woodbury_closed_form_with_varying_alpha():
    torch.manual_seed(0)
    n = 48
    P = pj.identity_projector(n)
    P_inv_expected = torch.eye(n, dtype=torch.float64)
    for i in range(200):
        x = 3 * torch.randn(n) / n ** 0.5
        alpha = pj.alpha_at(i, alpha0=2.0, lam=0.05, total_steps=200)
        pj.rls_update_(P, x, alpha)
        P_inv_expected += torch.outer(x.double(), x.double()) / alpha
    rel = (torch.linalg.inv(P.double()) - P_inv_expected).norm() / P_inv_expected.norm()
    assert rel < 1e-4


def test_constant_alpha_matches_batch_owm_projector():
    """With constant α: P = I − A(αI + AᵀA)⁻¹Aᵀ (paper eq. 5), A holding the inputs as columns."""
    torch.manual_seed(1)
    n, t, alpha = 20, 7, 0.7
    A = torch.randn(n, t)
    P = pj.identity_projector(n)
    for j in range(t):
        pj.rls_update_(P, A[:, j], alpha)
    A64 = A.double()
    expected = torch.eye(n, dtype=torch.float64) - A64 @ torch.linalg.solve(alpha * torch.eye(t, dtype=torch.float64) + A64.T @ A64, A64.T)
    torch.testing.assert_close(P.double(), expected, rtol=0, atol=1e-5)


def test_projector_stays_symmetric_psd_after_10000_updates():
    torch.manual_seed(2)
    n = 16
    P = pj.identity_projector(n)
    for i in range(10_000):
        pj.rls_update_(P, torch.randn(n), 1.0)
    assert torch.equal(P, P.T)
    assert torch.linalg.eigvalsh(P.double()).min() >= -1e-6 * P.norm()


def test_factor_exchange_equals_local_update():
    """S − Σ_j u_j u_jᵀ (one GEMM over gathered factors) equals Σ_j of the individually updated P_j."""
    torch.manual_seed(3)
    n, M = 12, 4
    Ps = [pj.identity_projector(n) for _ in range(M)]
    for P in Ps:  # give each expert its own history
        for _ in range(3):
            pj.rls_update_(P, torch.randn(n), 0.5)
    S = torch.stack(Ps).sum(0)
    xs = torch.randn(M, n)
    U = torch.stack([pj.rls_factor(P, x, 0.5) for P, x in zip(Ps, xs)])
    pj.apply_factors_(S, U)
    for P, u in zip(Ps, U):
        pj.apply_factors_(P, u[None])
    torch.testing.assert_close(S, torch.stack(Ps).sum(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("divisor,value", [("M-1", 3), ("M", 4)])
def test_leave_one_out_mean_is_mean_of_the_others(divisor, value):
    torch.manual_seed(4)
    Ps = [torch.randn(5, 5) for _ in range(4)]
    S = torch.stack(Ps).sum(0)
    d = pj.loo_divisor_value(divisor, 4)
    assert d == value
    expected = (Ps[0] + Ps[2] + Ps[3]) / value
    torch.testing.assert_close(pj.leave_one_out_mean(S, Ps[1], d), expected)


def test_split_weight_and_bias_projection_equals_augmented_product():
    torch.manual_seed(5)
    d_out, d_in, T = 7, 5, 11
    X, delta = torch.randn(T, d_in), torch.randn(T, d_out)
    G_w, g_b = delta.T @ X, delta.sum(0)
    A = torch.randn(d_in + 1, d_in + 1)
    P_bar = A @ A.T
    ref_w, ref_b = pj.project_augmented_grad(G_w, g_b, P_bar)
    c = P_bar[:d_in, d_in]
    got_w = pj.project_weight_grad(G_w, g_b, P_bar)
    got_b = pj.project_bias_grad(g_b, delta.T @ (X @ c), P_bar[d_in, d_in])
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_b, ref_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pj.project_weight_grad(G_w, None, P_bar[:d_in, :d_in]), G_w @ P_bar[:d_in, :d_in])


def test_alpha_schedule():
    assert pj.alpha_at(0, 2.0, 0.5, 100) == 2.0
    assert pj.alpha_at(50, 2.0, 0.5, 100) == pytest.approx(2.0 * 0.5 ** 0.5)
    assert pj.alpha_at(100, 2.0, 0.5, 100) == pytest.approx(1.0)
    assert pj.alpha_at(77, 3.0, 1.0, None) == 3.0
    with pytest.raises(ValueError, match="total_steps"):
        pj.alpha_at(1, 1.0, 0.5, None)


def test_augmented_mean_appends_one_only_with_bias():
    s = torch.tensor([2.0, 4.0], dtype=torch.float64)
    assert torch.equal(pj.augmented_mean(s, 2, True), torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(pj.augmented_mean(s, 2, False), torch.tensor([1.0, 2.0]))
