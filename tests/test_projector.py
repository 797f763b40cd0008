"""Projector math against closed forms (fp32, no torch.distributed)."""
import pytest
import torch

from omoe_ds.core import projector as pj

U32 = 2.0 ** -24  # fp32 unit roundoff: one rounding moves a value by at most U32 of itself


def rng(seed):
    return torch.Generator().manual_seed(seed)


def test_rls_updates_match_woodbury_closed_form_with_varying_alpha():
    g = rng(0)
    n = 48
    P = pj.identity_projector(n)
    P_inv_expected = torch.eye(n, dtype=torch.float64)
    for i in range(200):
        x = 3 * torch.randn(n, generator=g) / n ** 0.5
        alpha = pj.alpha_at(i, alpha0=2.0, lam=0.05, total_steps=200)
        pj.rls_update_(P, x, alpha)
        P_inv_expected += torch.outer(x.double(), x.double()) / alpha
    rel = (torch.linalg.inv(P.double()) - P_inv_expected).norm() / P_inv_expected.norm()
    # 200 fp32 rank-1 downdates, each rounding P by ~n·U32 ≈ 3e-6 relative, adding up like a random walk:
    # ~√200·n·U32 ≈ 4e-5 (measured: <= 5e-7 over 30 seeds)
    assert rel < 1e-4


def test_constant_alpha_matches_batch_owm_projector():
    """With constant α: P = I − A(αI + AᵀA)⁻¹Aᵀ (paper eq. 5), A holding the inputs as columns."""
    n, t, alpha = 20, 7, 0.7
    A = torch.randn(n, t, generator=rng(1))
    P = pj.identity_projector(n)
    for j in range(t):
        pj.rls_update_(P, A[:, j], alpha)
    A64 = A.double()
    expected = torch.eye(n, dtype=torch.float64) - A64 @ torch.linalg.solve(alpha * torch.eye(t, dtype=torch.float64) + A64.T @ A64, A64.T)
    # |P| <= 1 (0 ⪯ P ⪯ I); each of the t fp32 updates rounds P's entries by ~n·U32: t·n·U32 ≈ 8e-6
    torch.testing.assert_close(P.double(), expected, rtol=0, atol=1e-5)


def test_projector_stays_symmetric_psd_after_10000_updates():
    g = rng(2)
    n = 16
    P = pj.identity_projector(n)
    for i in range(10_000):
        pj.rls_update_(P, torch.randn(n, generator=g), 1.0)
    assert torch.equal(P, P.T)
    # P's entries carry roundings of ~U32·‖P‖; an n×n perturbation of that size moves an eigenvalue by at most
    # ~n·U32·‖P‖ ≈ 1e-6·‖P‖ (the exact P is positive definite: its eigenvalues are ≈ 1e-4 here)
    assert torch.linalg.eigvalsh(P.double()).min() >= -1e-6 * P.norm()


def test_factor_exchange_equals_local_update():
    """S − Σ_j u_j u_jᵀ (one GEMM over gathered factors) equals Σ_j of the individually updated P_j."""
    g = rng(3)
    n, M = 12, 4
    Ps = [pj.identity_projector(n) for _ in range(M)]
    for P in Ps:  # give each expert its own history
        for _ in range(3):
            pj.rls_update_(P, torch.randn(n, generator=g), 0.5)
    S = torch.stack(Ps).sum(0)
    xs = torch.randn(M, n, generator=g)
    U = torch.stack([pj.rls_factor(P, x, 0.5) for P, x in zip(Ps, xs)])
    pj.apply_factors_(S, U)
    for P, u in zip(Ps, U):
        pj.apply_factors_(P, u[None])
    # |S| <= M (each P ⪯ I): the two sides round ~2M times (M-term sum, M-term GEMM, subtractions) at <= M·U32
    # each: 2M·M·U32 ≈ 2e-6 (measured: one ulp of S, 4.8e-7; the former atol=1e-6 left only 2 ulps)
    torch.testing.assert_close(S, torch.stack(Ps).sum(0), rtol=0, atol=2 * M * M * U32)


@pytest.mark.parametrize("divisor,value", [("M-1", 3), ("M", 4)])
def test_leave_one_out_mean_is_mean_of_the_others(divisor, value):
    g = rng(4)
    Ps = [torch.randn(5, 5, generator=g) for _ in range(4)]
    S = torch.stack(Ps).sum(0)
    d = pj.loo_divisor_value(divisor, 4)
    assert d == value
    expected = (Ps[0] + Ps[2] + Ps[3]) / value
    # 3 + 1 adds and a divide (S − P_1) against 2 adds and a divide, each rounding at most U32·Σ|P_j|
    scale = float(sum(P.abs() for P in Ps).max())
    torch.testing.assert_close(pj.leave_one_out_mean(S, Ps[1], d), expected, rtol=0, atol=8 * U32 * scale)


def test_split_weight_and_bias_projection_equals_augmented_product():
    g = rng(5)
    d_out, d_in, T = 7, 5, 11
    X, delta = torch.randn(T, d_in, generator=g), torch.randn(T, d_out, generator=g)
    G_w, g_b = delta.T @ X, delta.sum(0)
    A = torch.randn(d_in + 1, d_in + 1, generator=g)
    P_bar = A @ A.T
    ref_w, ref_b = pj.project_augmented_grad(G_w, g_b, P_bar)
    c = P_bar[:d_in, d_in]
    got_w = pj.project_weight_grad(G_w, g_b, P_bar)
    got_b = pj.project_bias_grad(g_b, delta.T @ (X @ c), P_bar[d_in, d_in])
    # Each side sums the same products δ_ti·X_tk·P̄_kj in its own order (the bias half takes δᵀ(Xc), the reference
    # (δᵀX)c): each is within (T + d_in + 1)·U32 of the exact sum, relative to the products' magnitudes
    # ([|δ|ᵀ|X| | |g_b|]·|P̄|)_ij. Entries may cancel, so a bound relative to the result itself would not hold.
    magnitude = torch.cat([delta.abs().T @ X.abs(), g_b.abs()[:, None]], dim=1).double() @ P_bar.abs().double()
    bound = 2 * (T + d_in + 1) * U32 * magnitude  # measured: <= 2.7·U32·magnitude over 300 seeds
    assert ((got_w.double() - ref_w.double()).abs() <= bound[:, :d_in]).all()
    assert ((got_b.double() - ref_b.double()).abs() <= bound[:, d_in]).all()
    # without a bias: the same one GEMM on the same operands, bit for bit
    assert torch.equal(pj.project_weight_grad(G_w, None, P_bar[:d_in, :d_in]), G_w @ P_bar[:d_in, :d_in])


def test_alpha_schedule():
    assert pj.alpha_at(0, 2.0, 0.5, 100) == 2.0
    # Python floats: a power and a product, a few fp64 roundings (~1e-16)
    assert pj.alpha_at(50, 2.0, 0.5, 100) == pytest.approx(2.0 * 0.5 ** 0.5, rel=1e-12)
    assert pj.alpha_at(100, 2.0, 0.5, 100) == pytest.approx(1.0, rel=1e-12)
    assert pj.alpha_at(77, 3.0, 1.0, None) == 3.0
    with pytest.raises(ValueError, match="total_steps"):
        pj.alpha_at(1, 1.0, 0.5, None)


def test_augmented_mean_appends_one_only_with_bias():
    s = torch.tensor([2.0, 4.0], dtype=torch.float64)
    assert torch.equal(pj.augmented_mean(s, 2, True), torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(pj.augmented_mean(s, 2, False), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("M, E, first", [(4, 2, 2), (8, 6, 2)])
def test_every_projector_form_agrees_with_fp64_over_200_o_steps(M, E, first):
    """4 experts (2 of them local, global ids 2, 3: factored products leave each expert's factors out), or 8
    (6 local, ids 2..7: they zero its columns), n = 25 with a bias coordinate, α decaying with λ = 0.5,
    200 O steps of exchanged factors. Every form applies the same fp32 factors; the reference runs the RLS
    recursion in fp64. A P̄·v entry is an n-term fp32 dot product of v with entries |P̄| ≤ 1 (a mean of
    contractions): its rounding is at most n·2⁻²⁴·Σ|v|, whatever form produced P̄."""
    from omoe_ds.core.projector_state import StreamProjectors
    n, T = 25, 200
    stores = {form: StreamProjectors(n, M, E, first, M - 1, storage=form) for form in ("factored", "hybrid", "dense")}
    assert stores["factored"]._gathers_others() == (M == 4)
    ref = [torch.eye(n, dtype=torch.float64) for _ in range(M)]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g)
    bound = n * U32 * v.abs().sum().item()
    for t in range(1, T + 1):
        alpha = pj.alpha_at(t, 1.0, 0.5, T)
        xs = 2 * torch.randn(M, n, generator=g) / n ** 0.5
        xs[:, -1] = 1.0
        U = torch.stack([pj.rls_factor(ref[j].float(), xs[j], alpha) for j in range(M)])
        for j in range(M):
            k = ref[j] @ xs[j].double()
            u = k / (alpha + xs[j].double() @ k).sqrt()
            ref[j] -= torch.outer(u, u)
        for store in stores.values():
            store.apply_factors_(U)
        if t in (1, 10, 50, 200):
            S = sum(ref)
            for l in range(E):
                want = v.double() @ ((S - ref[first + l]) / (M - 1))
                got = {form: s.weight_product(v[None], l, n)[0] for form, s in stores.items()}
                for form in stores:
                    assert (got[form].double() - want).abs().max() <= bound, (t, form)
                    assert (got[form] - got["dense"]).abs().max() <= 1e-6 * v.abs().max(), (t, form)
                    # the bias column and corner, the batched product and the token side give the same P̄
                    Pbar = ((S - ref[first + l]) / (M - 1))
                    store = stores[form]
                    assert (store.bias_column(l).double() - Pbar[:-1, -1]).abs().max() <= n * U32, (t, form)
                    assert abs(store.bias_corner(l).item() - Pbar[-1, -1].item()) <= n * U32, (t, form)
                    x = torch.cat([v[:-1], v.new_ones(1)])  # a token row: the bias coordinate is 1
                    got_x = store.token_product(x[None, :-1], l)[0].double()
                    assert (got_x - x.double() @ Pbar).abs().max() <= n * U32 * x.abs().sum().item(), (t, form)
            V2 = torch.stack([v, -v])[None].expand(E, 2, n).contiguous()
            stacks = {form: s.weight_product_stack(V2) for form, s in stores.items()}
            for form in stores:
                assert (stacks[form] - stacks["dense"]).abs().max() <= 2 * bound, (t, form)
            for store in stores.values():
                store.release_o_step()
    assert stores["factored"].form == "factored" and stores["factored"].V.shape == (n, M, T)
    assert stores["hybrid"].form == "hybrid" and stores["hybrid"].W.shape == (n, E, T)
    assert stores["hybrid"].nbytes() == (n * n + n * E * T) * 4


def test_auto_storage_turns_dense_when_factors_outgrow_the_dense_form():
    """n·M·t bytes of factors against (E_local + 1)·n² dense: with n = 8, M = 4, E_local = 4 the switch
    comes after t = 10 O steps (4·10·8 ≤ 5·64 < 4·11·8); P̄ keeps its value across it (fp32 rounding of
    8-term sums of entries ≤ 1: within 8·2⁻²⁴·Σ|G| per entry)."""
    from omoe_ds.core.projector_state import StreamProjectors
    auto, factored = (StreamProjectors(8, 4, 4, 0, 3, storage=s) for s in ("auto", "factored"))
    g = torch.Generator().manual_seed(2)
    G = torch.randn(3, 8, generator=g)
    for t in range(1, 13):
        U = 0.3 * torch.randn(4, 8, generator=g)
        auto.apply_factors_(U)
        factored.apply_factors_(U)
        assert auto.form == ("factored" if t <= 10 else "dense"), t
    bound = 8 * U32 * G.abs().sum(1, keepdim=True)
    for l in range(4):
        assert ((auto.weight_product(G, l, 8) - factored.weight_product(G, l, 8)).abs() <= bound).all()
    assert auto.nbytes() == auto.dense_nbytes() < factored.nbytes()


def test_auto_storage_moves_factored_then_hybrid_then_dense():
    """n = 8, M = 4, E_local = 2 (bytes: 32·t factored, 64 + 16·t hybrid, 192 dense): factored while t ≤ 4,
    hybrid for 4 < t ≤ 8, dense after; P̄ keeps its value across both switches (8-term fp32 sums)."""
    from omoe_ds.core.projector_state import StreamProjectors
    auto, factored = (StreamProjectors(8, 4, 2, 2, 3, storage=s) for s in ("auto", "factored"))
    g = torch.Generator().manual_seed(4)
    G = torch.randn(3, 8, generator=g)
    bound = 8 * U32 * G.abs().sum(1, keepdim=True)
    for t in range(1, 11):
        U = 0.3 * torch.randn(4, 8, generator=g)
        auto.apply_factors_(U)
        factored.apply_factors_(U)
        assert auto.form == ("factored" if t <= 4 else "hybrid" if t <= 8 else "dense"), t
        for l in range(2):
            assert ((auto.weight_product(G, l, 8) - factored.weight_product(G, l, 8)).abs() <= 2 * bound).all(), t
        auto.release_o_step()


@pytest.mark.parametrize("storage", ["auto", "factored", "hybrid", "dense"])
def test_memory_estimate_is_the_bytes_the_store_holds(storage):
    from omoe_ds.core.projector_state import StreamProjectors, estimate_bytes
    store = StreamProjectors(6, 4, 2, 2, 3, storage=storage)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 9):
        store.apply_factors_(0.2 * torch.randn(4, 6, generator=g))
        assert store.nbytes() == estimate_bytes(6, 4, 2, t, storage), t
