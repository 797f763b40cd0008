"""The O-step projection on the token side, δᵀ(X̃·P̄) in place of autograd's δᵀX̃, against the gradient side
[G_W | g_b]·P̄, on every expert layout (the tiny models of tests/layouts_worker.py, and DeepSpeed AutoEP's
for-loop, grouped_mm and fused gate/up experts) in every projector form, with two micro-batches accumulated in one
O step; and the side the cost model picks."""
import os
import sys

import pytest
import torch
import transformers

from omoe_ds.core.config import OMoEConfig, OMoEConfigError
from omoe_ds.core.projection_side import LayerProjection, choose_side, side_costs
from omoe_ds.core.projector_state import StreamProjectors
from omoe_ds.experts import find_expert_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layouts_worker import CASES, HF_CONFIGS, IMPLEMENTATION, NativeNet  # noqa: E402

U32 = 2.0 ** -24
T_t = 3  # O steps of factors in each store


# DeepSpeed AutoEP at EP = 1 in this process: Mixtral through its for-loop experts (torch.matmul per expert),
# Qwen3-MoE through torch._grouped_mm, with gate and up as two GEMMs or one over [w1 | w3].
AUTOEP_CASES = {"autoep_mixtral": {"use_grouped_mm": False}, "autoep_qwen3_moe": {"use_grouped_mm": True},
                "autoep_qwen3_moe_fused_gate_up": {"use_grouped_mm": True, "gate_up_impl": "fused"}}


def make(case):
    torch.manual_seed(0)
    if case.startswith("native_"):
        return NativeNet(case[len("native_"):], ep_size=1)
    if case in AUTOEP_CASES:
        return autoep_module(case)
    return transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[case](), experts_implementation=IMPLEMENTATION[case])


def autoep_module(case):
    """The model after deepspeed.initialize swapped its MoE blocks for AutoEP layers (plain DeepSpeed: the test
    attaches the projection itself; autograd.grad leaves ZeRO-2's reduction hooks unrun)."""
    import deepspeed
    family = case[len("autoep_"):].replace("_fused_gate_up", "")
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]())
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": family, **AUTOEP_CASES[case]}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.module


def count_alignment_rows(layers) -> list:
    """[zero rows the AutoEP experts received within their aligned counts], summed over forwards."""
    seen = [0]

    def count(experts, args):
        x, aligned = args[0], int(args[1].sum())
        seen[0] += aligned - int((x[:aligned] != 0).any(-1).sum())
    for layer in layers:
        layer.experts.register_forward_pre_hook(count)
    return seen


def count_empty_slots(layers) -> list:
    """[capacity slots DeepSpeed's native experts received without a token (zero rows)], summed over forwards."""
    seen = [0]

    def count(experts, args):
        seen[0] += int((args[0] == 0).all(-1).sum())
    for layer in layers:
        layer.module.deepspeed_moe.experts.register_forward_pre_hook(count)
    return seen


def micro_batch_loss(model, case, seed):
    g = torch.Generator().manual_seed(seed)
    if case.startswith("native_"):
        return model(torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4,), generator=g))
    ids = torch.randint(3, 48, (4, 6), generator=g)
    return model(input_ids=ids, labels=ids).loss


def projected_stores(layer, storage, g):
    stores = []
    for stream in layer.streams:
        store = StreamProjectors(stream.n, layer.num_experts, layer.num_local_experts, 0, layer.num_experts - 1,
                                 storage=storage)
        for _ in range(T_t):  # |u| ≈ 0.5: P̄ far from I, so an unprojected gradient is off by ~10 %
            store.apply_factors_(0.5 * torch.randn(layer.num_experts, stream.n, generator=g) / stream.n ** 0.5)
        stores.append(store)
    return stores


@pytest.mark.parametrize("storage", ["factored", "hybrid", "dense"])
@pytest.mark.parametrize("case", [*CASES, *AUTOEP_CASES])
def test_token_side_equals_gradient_side(single_process_group, monkeypatch, case, storage):
    monkeypatch.setenv("LOCAL_RANK", "0")
    model = make(case)
    layers = find_expert_layers(model)
    g = torch.Generator().manual_seed(5)
    stores = [projected_stores(layer, storage, g) for layer in layers]
    active, side = [False], ["gradient"]
    views = [LayerProjection(lambda L=L: stores[L], lambda: side[0]) for L in range(len(layers))]
    for L, layer in enumerate(layers):
        layer.attach_projection(views[L], lambda: active[0], [0.0])
    params = [p for layer in layers for p in layer.expert_parameters()]
    alignment_rows = count_alignment_rows(layers) if case in AUTOEP_CASES else None
    empty_slots = count_empty_slots(layers) if case.startswith("native_") else None

    def o_step(which):
        """Σ over two micro-batches of the expert gradients (None: unprojected), P̄ built once for the step."""
        for view in views:
            view.end_o_step()
        for per_layer in stores:
            for store in per_layer:
                store.release_o_step()
        active[0], side[0] = which is not None, which or "gradient"
        total, built = None, []
        for seed in (7, 8):
            grads = torch.autograd.grad(micro_batch_loss(model, case, seed), params)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            built.append([store._pbar for per_layer in stores for store in per_layer])
        if which is not None:
            assert {view.side(s) for view in views for s in range(2)} == {which}
            # dense: one P̄ per store, the same object in both micro-batches; factored, hybrid: no P̄ stack formed
            assert all(a is b and (a is None) == (storage != "dense") for a, b in zip(*built))
        return total

    raw, gradient, token = o_step(None), o_step("gradient"), o_step("token")
    # Each entry is an fp32 sum of the same T·n products δ_ti·X̃_tk·P̄_kj (T ≤ 96 routed rows per micro-batch,
    # n ≤ 25, and the 2·M·t = 24 factor terms of P̄ when factored), in another order on each side: by Higham's γ_m
    # each is within (T + n + 2·M·t)·2⁻²⁴ ≈ 9e-6 of its terms' absolute sum; these inputs keep that sum within
    # a few times the largest entry (measured: ≤ 5.5e-7 of it, AutoEP included), so 2e-5 of the largest entry.
    # AutoEP's alignment rows (zero rows up to multiples of 8) are exact zeros in X̃·P̄: they add no rounding;
    # native empty capacity slots enter the token side as one rank-1 term (Σ_empty δ)ᵀ(r̃₀·P̄), whose δ are 0.
    tol = 2e-5
    for p, r, a, b in zip(params, raw, gradient, token):
        scale = a.abs().max()
        assert (a - b).abs().max() <= tol * scale, (case, storage, tuple(p.shape), ((a - b).abs().max() / scale).item())
        assert (a - r).abs().max() > 1e-2 * scale  # the projection is not the identity: the test can fail
    if case.startswith("native_"):  # both sides skip the capacity padding: against autograd's G times P̄, closed form
        expected = iter(native_projected(layers, stores, raw))
        for p, a, b in zip(params, gradient, token):
            want = next(expected)
            scale = want.abs().max()
            assert (a - want).abs().max() <= tol * scale and (b - want).abs().max() <= tol * scale, (case, storage)
    if alignment_rows is not None:
        assert alignment_rows[0] > 0  # both sides saw AutoEP's zero rows, and they agree
    if empty_slots is not None:  # the token side covered filled slots plus one empty row (biased h: act(b1) ≠ 0)
        assert empty_slots[0] > 0


def native_projected(layers, stores, raw):
    """[G_W | g_b]·P̄_l of each native expert Linear from unprojected gradients (expert_parameters' order: per
    local expert, per Linear, weight then bias), with P̄_l = (S − P_l) / divisor formed densely."""
    raw, out = iter(raw), []
    for layer, per_layer in zip(layers, stores):
        for local, linears in enumerate(layer.local_experts):
            for linear, stream in zip(linears, layer.matrix_streams):
                store = per_layer[stream]
                pbar = (store.dense_sum() - store.dense_local()[local]) / store.divisor
                G = next(raw)
                if linear.bias is not None:
                    projected = torch.cat([G, next(raw)[:, None]], 1) @ pbar
                    out += [projected[:, :-1], projected[:, -1]]
                else:
                    out.append(G @ pbar)
    return out


def test_cost_model_counts_the_weight_gradient_product_once():
    # one expert reading a stream of n = 769 (BERT-base x̃) with 3072 out features, 4 local experts of 8
    dense = 769 * 769
    few = side_costs(token_rows=512, out_features=3072, num_local=4, n=769, row_cost=dense)
    many = side_costs(token_rows=65536, out_features=3072, num_local=4, n=769, row_cost=dense)
    gemm = 512 * 3072 * 769
    assert few == {"gradient": gemm + 4 * 3072 * dense, "token": 512 * dense + gemm}
    assert choose_side("auto", few) == "token" and choose_side("auto", many) == "gradient"
    assert choose_side("gradient", few) == "gradient" and choose_side("token", many) == "token"
    # the token side does not grow with the local experts; the gradient side does
    wide = side_costs(token_rows=512, out_features=3072, num_local=32, n=769, row_cost=dense)
    assert wide["token"] == few["token"] and wide["gradient"] > few["gradient"]


def test_projection_side_config_is_validated():
    assert OMoEConfig().projection_side == "auto"
    assert OMoEConfig(projection_side="token").projection_side == "token"
    with pytest.raises(OMoEConfigError, match=r"projection_side='tokens'.*\"auto\".*\"gradient\".*\"token\""):
        OMoEConfig(projection_side="tokens")


@pytest.mark.parametrize("bias", [True, False])
def test_token_product_over_filled_slots_is_exact_for_any_gradient(bias):
    """Capacity slots: the token side takes X̃·P̄ of the filled rows plus the one row every empty slot holds, and
    adds (Σ_empty δ)ᵀ(r̃₀·P̄). Against δᵀ(X̃·P̄) over every row, with δ nonzero on the empty rows too (a token whose
    row is exactly r₀ counts as empty), and the input gradient unchanged."""
    from omoe_ds.core.projection_hooks import LinearTokenSide, TokenProduct
    g = torch.Generator().manual_seed(11)
    d, out, rows = 6, 5, 10
    n = d + bias
    pbar = torch.randn(n, n, generator=g)
    pbar = pbar + pbar.T
    x = torch.randn(rows, d, generator=g)
    empty_row = torch.randn(d, generator=g)
    filled = torch.tensor([True, True, False, True, False, False, True, True, False, True])
    x[~filled] = empty_row
    linear = torch.nn.Linear(d, out, bias=bias)
    delta = torch.randn(rows, out, generator=g)

    def augmented(t):
        return torch.cat([t, t.new_ones(t.shape[0], 1)], 1) if bias else t
    product = TokenProduct(lambda r: augmented(r) @ pbar, [0.0], lambda: filled)
    LinearTokenSide(linear, lambda _: product)
    x_in = x.clone().requires_grad_()
    (linear(x_in) * delta).sum().backward()
    expected = delta.T @ (augmented(x) @ pbar)  # [out, n] = [G_W | g_b]·P̄ over every row
    # fp32 sums of 10 rows in another order: ~10·2⁻²⁴ of the terms' absolute sum (≤ 10·|δ||X̃P̄| ≈ 1e2 here)
    assert torch.allclose(linear.weight.grad, expected[:, :d], rtol=0, atol=1e-4)
    if bias:
        assert torch.allclose(linear.bias.grad, expected[:, d], rtol=0, atol=1e-4)
    assert torch.allclose(x_in.grad, delta @ linear.weight.detach(), rtol=0, atol=1e-6)
    # the padding is skipped in the forward too: every empty row's output is F.linear(r₀), each a sum of d products
    assert torch.allclose(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias), rtol=0, atol=1e-6)
    # the product saw the filled rows and one empty row only
    product_rows = []
    counting = TokenProduct(lambda r: product_rows.append(r.shape[0]) or augmented(r) @ pbar, [0.0], lambda: filled)
    counting(x)
    assert product_rows == [int(filled.sum()) + 1]


def test_token_side_skips_capacity_padding_in_every_gemm():
    """With δ = 0 on the empty slots (DeepSpeed's combine weights are 0 there), the forward, the input gradient and
    the projected weight gradient each multiply the filled rows only (+ r₀ once in the forward): counted in flops,
    with the same output and input gradient as the plain Linear."""
    from torch.utils.flop_counter import FlopCounterMode
    from omoe_ds.core.projection_hooks import LinearTokenSide, TokenProduct
    g = torch.Generator().manual_seed(12)
    d, out, rows, k = 8, 6, 40, 9
    x = torch.zeros(rows, d)
    filled = torch.zeros(rows, dtype=torch.bool)
    filled[torch.randperm(rows, generator=g)[:k]] = True
    x[filled] = torch.randn(k, d, generator=g)
    delta = torch.randn(rows, out, generator=g) * filled[:, None]
    linear = torch.nn.Linear(d, out)
    pbar = torch.randn(d + 1, d + 1, generator=g)
    product = TokenProduct(lambda r: torch.cat([r, r.new_ones(r.shape[0], 1)], 1) @ pbar, [0.0], lambda: filled)
    LinearTokenSide(linear, lambda _: product)
    x_in = x.clone().requires_grad_()
    with FlopCounterMode(display=False) as forward:
        y = linear(x_in)
    with FlopCounterMode(display=False) as backward:
        (y * delta).sum().backward()
    plain = torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert torch.allclose(y, plain, rtol=0, atol=1e-6)  # sums of 8 products in another order
    assert torch.equal(x_in.grad[~filled], torch.zeros(rows - k, d))
    assert torch.allclose(x_in.grad, delta @ linear.weight.detach(), rtol=0, atol=1e-6)
    product_flops = 2 * (k + 1) * (d + 1) ** 2
    assert forward.get_total_flops() == product_flops + 2 * (k + 1) * d * out
    assert backward.get_total_flops() == 2 * k * out * d + 2 * out * k * (d + 1)  # δW and δᵀ(X̃·P̄), filled rows
