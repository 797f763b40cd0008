"""Padding is never routed (k=1 and k=2), and the R-step windows hold exactly the real tokens' sums.

Every recorded window (the native adapter's recorder filling a core.windows.InputWindow, in-process at EP=1) is compared with an
independent recomputation over real tokens only: routes from the top-k of the gate's logits (the second
expert's Gumbel sampling is switched off so that the reference can name it), DeepSpeed's position
order for slots, and h = act(W1 x + b1) in fp64. Tolerance: the window adds fp32 rows per forward (n ≤ a
few hundred terms) of h from an fp32 GEMM over d = 32 inputs, so |recorded − exact| ≤ ~(n + d)·2⁻²⁴ times
the sums of absolute terms (of the GEMM too, for h); 1e-5 times those bounds it.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating

from omoe_ds.checkpoint.layout import WINDOW_LAYOUT, CheckpointError, window_partials
from omoe_ds.finetune.convert import (MoEConversionConfig, PaddingMaskedTopKGate, _masked_top2gating,
                                      bind_expert_groups, convert_to_moe, mask_padding_in_gate)
from omoe_ds.core.windows import InputWindow
from omoe_ds.experts.base import RecordContext
from omoe_ds.experts import find_expert_layers, make_moe_ffn

pytestmark = pytest.mark.usefixtures("single_process_group")
D, D_FF, M = 16, 24, 4
RTOL_OF_ABS_SUM = 1e-5


# ---- the independent reference ------------------------------------------------------------------
def reference_routes(x, used, wg, k, capacity=None):
    """[(token, expert)] kept for x [S, d]: top-k of the logits over real tokens, slots in DeepSpeed's order
    (all first routes in token order, then the second routes after each expert's first-route count), a
    route kept iff its slot < capacity (None: no dropping)."""
    logits = x.double() @ wg.double().t()
    top = logits.topk(k + 1 if k + 1 <= logits.shape[1] else k, dim=1)
    real = used.bool()
    if top.values.shape[1] > k:  # fp32 logits must rank the experts as these fp64 ones do
        assert (top.values[real, k - 1] - top.values[real, k]).min() > 1e-4, "near tie: pick another seed"
    kept, filled = [], [0] * wg.shape[0]
    for r in range(k):
        for t in torch.nonzero(real).flatten().tolist():
            e = int(top.indices[t, r])
            if capacity is None or filled[e] < capacity:
                kept.append((t, e))
            filled[e] += 1  # a dropped route still takes its position, as in DeepSpeed's cumsum
    return kept


def recording_window(layer):
    """A window the layer's recorder fills in every training forward, as OMoE's R steps do."""
    window = InputWindow(layer.num_experts, [s.d_in for s in layer.streams], layer.device)
    layer.attach_recorder(RecordContext(lambda m: m.training and torch.is_grad_enabled(), lambda h: None, window))
    return window


def reference_window(x, kept, experts):
    """Σx, Σh [M, ·] fp64, their error scales and counts [M] of the kept routes; experts[e] = (W1, act).
    Scales: Σ|x|, and for h the fp32 W1 GEMM's (|W1|·|x| + |b1|, times act' ≤ 1.13 for GELU) plus Σ|h|."""
    sx, sh = torch.zeros(M, x.shape[1], dtype=torch.float64), torch.zeros(M, experts[0][0].out_features, dtype=torch.float64)
    ax, ah = torch.zeros_like(sx), torch.zeros_like(sh)
    counts = torch.zeros(M, dtype=torch.float64)
    for t, e in kept:
        w1, act = experts[e]
        xt = x[t].double()
        h = act(F.linear(xt, w1.weight.double(), w1.bias.double()))
        sx[e] += xt
        ax[e] += xt.abs()
        sh[e] += h
        ah[e] += h.abs() + F.linear(xt.abs(), w1.weight.double().abs(), w1.bias.double().abs())
        counts[e] += 1
    return sx, sh, ax, ah, counts


def assert_window(window, ref):
    sx, sh, ax, ah, counts = ref
    assert torch.equal(window.counts[0], counts) and torch.equal(window.counts[1], counts)
    for got, want, scale in ((window.sums[0], sx, ax), (window.sums[1], sh, ah)):
        excess = (got - want).abs() - RTOL_OF_ABS_SUM * scale
        assert excess.max() <= 0, f"window off by {(got - want).abs().max():.3g}"


def expert_pairs(layer):
    return [(linears[0], expert[1]) for linears, expert in
            zip(layer.local_experts, layer.module.deepspeed_moe.experts.deepspeed_experts)]


def perturb_experts(model, seed):
    """Distinct experts (a converter copies one FFN into all), so that routing matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_expert_layers(model):
            for linears in layer.local_experts:
                for linear in linears:
                    linear.weight.add_(0.2 * torch.randn(linear.weight.shape, generator=g))
                    linear.bias.add_(0.2 * torch.randn(linear.bias.shape, generator=g))


def padded_mask(lengths, seq_len):
    return (torch.arange(seq_len) < torch.tensor(lengths).unsqueeze(1)).long()


LENGTHS, SEQ = (3, 12, 2, 12, 7, 12, 1, 9), 12  # right padding: early rows' padding precedes later real tokens


# ---- one DeepSpeed MoE called with a used_token mask ---------------------------------------------
def masked_moe(k, drop_tokens, capacity_factor=1.0, seed=0):
    torch.manual_seed(seed)
    moe = make_moe_ffn(D, D_FF, M, k=k, drop_tokens=drop_tokens, use_rts=False, min_capacity=0,
                       capacity_factor=capacity_factor)
    mask_padding_in_gate(moe)
    moe.deepspeed_moe.gate.top2_2nd_expert_sampling = False  # the reference names the second expert
    moe.set_deepspeed_parallelism()
    perturb_experts(moe, seed + 1)
    moe.train()
    return moe


def moe_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), SEQ, D, generator=g)
    return x, padded_mask(LENGTHS, SEQ).reshape(-1)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [False, True], ids=["keep", "drop"])
def test_window_of_a_masked_moe_equals_real_token_reference(k, drop_tokens):
    x, used = moe_inputs()
    S, real = used.numel(), int(used.sum())
    moe = masked_moe(k, drop_tokens)
    wg = moe.deepspeed_moe.gate.wg.weight.detach()
    flat = x.reshape(-1, D)
    capacity = None
    if drop_tokens:
        if k == 1:
            # k=1 keeps an overflowing expert's tokens in an unspecified order: make the capacity exactly the
            # busiest expert's real load, below its load with padding routed (so padding would have taken slots).
            loads = torch.bincount(torch.tensor([e for _, e in reference_routes(flat, used, wg, 1)]), minlength=M)
            padded = torch.bincount((flat.double() @ wg.double().t()).argmax(1), minlength=M)
            capacity = int(loads.max())
            assert (padded > capacity).any()
            moe.deepspeed_moe.gate.capacity_factor = (capacity - 0.5) * M / S  # ceil(S/M·cf) = capacity
        else:
            moe.deepspeed_moe.gate.capacity_factor = 0.4
            capacity = math.ceil(S / M * 0.4 * 2)
    kept = reference_routes(flat, used, wg, k, capacity)
    if drop_tokens and k == 2:
        # Stock DeepSpeed routes padding too; it then drops real routes that fit once padding is masked.
        stock = top2gating((flat @ wg.t()).float(), 0.4, 0, drop_tokens=True, top2_2nd_expert_sampling=False,
                           sparse_routes=True)
        assert int((stock[3][:, used.bool()] >= 0).sum()) < len(kept) < k * real
    window = recording_window(find_expert_layers(moe)[0])
    outputs = []
    moe.deepspeed_moe.gate.register_forward_hook(lambda gate, inputs, output: outputs.append(output))
    moe(x, used)
    (out,) = outputs
    if capacity is not None:
        assert int(out[1]) == capacity  # derived from the padded B·L
    indices = out[3]
    assert (indices[:, used == 0] == -1).all()  # padding: no route, no slot
    assert int((indices >= 0).sum()) == len(kept)
    assert int(out[6].sum()) == k * real  # exp_counts: real tokens' routing decisions, before the capacity
    assert_window(window, reference_window(flat, kept, expert_pairs(find_expert_layers(moe)[0])))


def test_real_slots_start_at_zero_and_stay_contiguous():
    x, used = moe_inputs(seed=3)
    moe = masked_moe(2, drop_tokens=True, capacity_factor=0.4, seed=3)
    outputs = []
    moe.deepspeed_moe.gate.register_forward_hook(lambda gate, inputs, output: outputs.append(output))
    moe(x, used)
    (out,) = outputs
    indices, locations = out[3], out[4]
    for e in range(M):
        slots = locations[indices == e].sort().values
        assert torch.equal(slots, torch.arange(len(slots), dtype=slots.dtype))


@pytest.mark.parametrize("drop_tokens", [False, True])
@pytest.mark.parametrize("sampling", [False, True])
def test_masked_top2_with_no_padding_is_deepspeeds_top2(drop_tokens, sampling):
    """Guards the line-for-line copy against DeepSpeed: an all-ones mask gives DeepSpeed's outputs, bit for bit."""
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        logits = torch.randn(64, M, generator=g)
        torch.manual_seed(trial)
        want = top2gating(logits.clone(), 0.5, 1, drop_tokens=drop_tokens, top2_2nd_expert_sampling=sampling,
                          sparse_routes=True)
        torch.manual_seed(trial)
        got = _masked_top2gating(logits.clone(), torch.ones(64, dtype=torch.long), 0.5, 1, drop_tokens, None, sampling)
        for a, b in zip(got, want):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_k1_gate_is_deepspeeds_own():
    """With k=1 the wrapper hands over to DeepSpeed's top-1 gate, which already honours used_token."""
    moe = masked_moe(1, drop_tokens=False)
    gate = moe.deepspeed_moe.gate
    x, used = moe_inputs()
    flat = x.reshape(-1, D)
    got = gate(flat, used, True)
    want = top1gating(F.linear(flat.float(), gate.wg.weight.float()), 1.0, 0, used, None, False, False, None, True)
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# ---- a converted tiny BERT ---------------------------------------------------------------------
def tiny_bert_config(num_labels=3):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=D_FF, num_labels=num_labels, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def converted_bert(model_class, k, drop_tokens=False, capacity_factor=1.0, seed=0):
    torch.manual_seed(seed)
    model = convert_to_moe(model_class(tiny_bert_config()),
                           MoEConversionConfig(num_experts=M, k=k, drop_tokens=drop_tokens,
                                               capacity_factor=capacity_factor))
    bind_expert_groups(model)
    perturb_experts(model, seed + 1)
    for layer in find_expert_layers(model):
        assert isinstance(layer.gate, PaddingMaskedTopKGate)
    return model.train()


def token_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = padded_mask(LENGTHS, SEQ)
    ids = torch.randint(3, 100, mask.shape, generator=g).masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("k,drop_tokens,capacity_factor", [(1, False, 1.0), (2, False, 1.0), (2, True, 0.4)],
                         ids=["k1", "k2", "k2-drop"])
def test_window_of_a_converted_bert_equals_real_token_reference(k, drop_tokens, capacity_factor):
    model = converted_bert(transformers.BertForSequenceClassification, k, drop_tokens, capacity_factor)
    layers = find_expert_layers(model)
    windows = [recording_window(layer) for layer in layers]
    inputs = []
    for layer in layers:
        layer.gate.top2_2nd_expert_sampling = False
        layer.module.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().reshape(-1, 32)))
    ids, mask = token_batch()
    used = mask.reshape(-1)
    S = used.numel()
    for step in range(2):  # the window spans several forwards
        model(input_ids=ids, attention_mask=mask)
    assert len(inputs) == 2 * len(layers)
    capacity = math.ceil(S / M * capacity_factor * 2) if drop_tokens else None
    for L, (layer, window) in enumerate(zip(layers, windows)):
        wg = layer.gate.wg.weight.detach()
        refs = [reference_window(x, reference_routes(x, used, wg, k, capacity), expert_pairs(layer))
                for x in inputs[L::len(layers)]]
        total = [sum(parts) for parts in zip(*refs)]
        assert total[4].sum() <= k * 2 * int(used.sum())
        if drop_tokens:
            assert total[4].sum() < k * 2 * int(used.sum())  # the capacity really drops routes
        assert_window(window, total)


def test_real_token_outputs_equal_deepspeeds_stock_gate_without_capacity_pressure():
    """k=2, no dropping: the masked gate routes real tokens to DeepSpeed's experts with DeepSpeed's weights
    (same Gumbel draws), so the real positions' logits are the stock gate's. fp32 GEMMs over capacity
    buffers of other shapes may round differently: ~1e-6 relative per op, 1e-5 over two layers."""
    model = converted_bert(transformers.BertForTokenClassification, k=2)
    stock = converted_bert(transformers.BertForTokenClassification, k=2)  # the same seeds: the same weights
    for layer in find_expert_layers(stock):
        layer.gate.__class__ = TopKGate
    ids, mask = token_batch(seed=1)
    real = mask.bool()
    routes = {}
    for name, m in (("masked", model), ("stock", stock)):
        routes[name] = []
        for layer in find_expert_layers(m):
            layer.gate.register_forward_hook(lambda gate, i, out, r=routes[name]: r.append(out))
    torch.manual_seed(11)
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(11)
    want = stock(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    flat_real = mask.reshape(-1).bool()
    for ours, theirs in zip(routes["masked"], routes["stock"]):
        assert (ours[3][:, ~flat_real] == -1).all() and (theirs[3][:, ~flat_real] >= 0).all()
        assert torch.equal(ours[3][:, flat_real], theirs[3][:, flat_real])  # the same experts
        assert torch.equal(ours[5][:, flat_real], theirs[5][:, flat_real])  # the same combine weights


# ---- saved windows ------------------------------------------------------------------------------
def test_window_saved_in_the_old_layout_loads_into_its_experts_rows():
    g = torch.Generator().manual_seed(0)
    old = {"global_ids": [2, 3], "sums": [torch.randn(2, D, generator=g, dtype=torch.float64),
                                         torch.randn(2, D_FF, generator=g, dtype=torch.float64)],
           "counts": torch.tensor([5.0, 7.0], dtype=torch.float64)}
    sums, counts = window_partials(old, M, "omoe_rank1.pt")
    assert torch.equal(sums[0][2:], old["sums"][0]) and torch.equal(sums[1][2:], old["sums"][1])
    assert not sums[0][:2].any() and not sums[1][:2].any()
    assert counts.tolist() == [[0, 0, 5, 7], [0, 0, 5, 7]]
    new = {"layout": WINDOW_LAYOUT, "sums": sums, "counts": counts}
    assert window_partials(new, M, "x")[1] is counts
    with pytest.raises(CheckpointError, match=r"omoe_rank1.pt: .*unknown layout 'v9'"):
        window_partials({"layout": "v9"}, M, "omoe_rank1.pt")
    with pytest.raises(CheckpointError, match=r"do not fit 8 experts"):
        window_partials(new, 8, "omoe_rank1.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonzero_rows_is_any_nonzero_entry(dtype):
    """The filled-slot test equals (x != 0).any(-1) on every kind of row: zeros, −0.0, one nonzero entry of
    either sign, NaN, and a block with no rows (an expert that received nothing)."""
    from omoe_ds.experts.base import nonzero_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g).to(dtype)
    x[0, :3] = 0
    x[1, 0] = -0.0
    x[1, 1] = 0
    x[1, 1, 2] = -1e-30 if dtype == torch.float32 else -1e-3
    x[2, 4] = 0
    x[2, 4, 4] = float("nan")
    assert torch.equal(nonzero_rows(x), (x != 0).any(-1))
    assert nonzero_rows(x)[0, :3].sum() == 0 and bool(nonzero_rows(x)[1, 1])
    assert nonzero_rows(torch.zeros(0, 5, dtype=dtype)).shape == (0,)
