"""OMoE-LoRA (paper B): the mixture layer's Gram–Schmidt against QR, init, what trains, files, merge, refusals."""
import os

import pytest
import torch
from torch import nn

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.lora import (DECODER_TARGETS, LoRAMixtureConfig, LoRAMixtureLinear, gram_schmidt, inject,
                          load_adapter, merge_and_unload, save_adapter)

pytestmark = pytest.mark.lora

KINDS = ("lora", "moe-lora", "omoe-lora")
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def load_bert(path):
    from transformers import BertForSequenceClassification
    return BertForSequenceClassification.from_pretrained(path)


def bert_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, batch, steps=3, lr=1e-2):
    """AdamW over *all* parameters (frozen ones have no grad, so AdamW must leave them); returns, per parameter
    name, whether it had a grad and the largest |grad| seen."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    had_grad, largest = {}, {}
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, parameter in model.named_parameters():
            had_grad[name] = had_grad.get(name, False) or parameter.grad is not None
            if parameter.grad is not None:
                largest[name] = max(largest.get(name, 0.0), parameter.grad.abs().max().item())
        optimizer.step()
    return had_grad, largest


def randomize_B(model, std=0.5, seed=3):
    """Trained-looking adapters: a nonzero, random B (PEFT's lora_B.default.weight or the mixture's lora_B)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


# ---- Gram–Schmidt of the mixture layer, against an independent fp64 QR
def qr_reference(layer, x, eps):
    """u and y from the layer's parameters in fp64, with the documented convention: u_i = R_ii q_i of the thin QR of
    E = [e_1 … e_N] per token; normalised: sign(R_ii) q_i · |R_ii| / (|R_ii| + √ε)."""
    x64 = x.reshape(-1, layer.in_features).double()
    experts = torch.einsum("td,nrd->tnr", x64, layer.lora_A.double())
    experts = torch.einsum("tnr,nor->tno", experts, layer.lora_B.double()) * layer.scaling
    q, r = torch.linalg.qr(experts.transpose(1, 2))  # [T, d_out, N], [T, N, N]
    r_diag = torch.diagonal(r, dim1=1, dim2=2)
    if layer.normalize:
        r_diag = r_diag.sign() * r_diag.abs() / (r_diag.abs() + eps.double().sqrt())
    u = (q * r_diag[:, None, :]).transpose(1, 2)
    gates = torch.softmax(x64 @ layer.router.weight.double().T, dim=-1)
    y = x64 @ layer.base_layer.weight.double().T + layer.base_layer.bias.double() + torch.einsum("tn,tno->to", gates, u)
    return experts, u, y


@pytest.mark.parametrize("num_experts,normalize", [(2, False), (4, False), (8, False), (4, True)])
def test_gram_schmidt_is_orthogonal_and_matches_qr(num_experts, normalize):
    torch.manual_seed(0)
    d_in, d_out, r = 64, 48, 8
    layer = LoRAMixtureLinear(nn.Linear(d_in, d_out), r, 16, num_experts, normalize=normalize).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(4, 16, d_in)
    with torch.no_grad():
        parts, y = layer.mixture_parts(x), layer(x)
    experts, u_ref, y_ref = qr_reference(layer, x, parts.eps)
    u = parts.representations.double()
    # The regime of the contract, ‖u_j‖² ≫ ε, checked on the unnormalised form (R_ii² = ‖u_j‖²).
    r_squared = torch.linalg.qr(experts.transpose(1, 2)).R.diagonal(dim1=1, dim2=2).square()
    eps_share = (parts.eps.double() / r_squared).max().item()
    assert eps_share < 1e-5

    norms = u.norm(dim=-1)
    cosines = (u @ u.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :])
    off_diagonal = cosines.abs() * (1 - torch.eye(num_experts, dtype=torch.float64))
    assert off_diagonal.max().item() <= 1e-5, off_diagonal.max().item()

    # fp32 error bound: e comes from two matmuls (inner sizes d_in and r: γ ≈ (d_in + r)·u), MGS adds O(N·κ·u);
    # ε's damping perturbs each coefficient by ε/‖u_j‖², amplified at most κ. Measured errors are ~10x below.
    condition = torch.linalg.cond(experts.transpose(1, 2)).max().item()
    tolerance = (d_in + r + num_experts * condition) * FP32_UNIT_ROUNDOFF + condition * eps_share
    scale = 1.0 if normalize else experts.norm(dim=-1).amax(-1, keepdim=True)  # per token: the largest ‖e_i‖
    u_error = ((u - u_ref).norm(dim=-1) / scale).max().item()
    y_error = ((y.reshape(-1, d_out).double() - y_ref).norm(dim=-1) / y_ref.norm(dim=-1)).max().item()
    print(f"N={num_experts} normalize={normalize}: max|cos|={off_diagonal.max().item():.2e} "
          f"u-vs-QR={u_error:.2e} y-vs-QR={y_error:.2e} tol={tolerance:.2e} cond={condition:.2f} "
          f"eps/|u|^2<={eps_share:.1e}")
    assert u_error <= tolerance
    assert y_error <= tolerance


def test_gram_schmidt_gradients():
    torch.manual_seed(0)
    experts = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    eps = torch.full((3, 1), 1e-6, dtype=torch.float64)
    for normalize in (False, True):
        assert torch.autograd.gradcheck(lambda e: gram_schmidt(e, eps, normalize), (experts,))


def test_zero_experts_give_zero_without_nan():
    """B = 0: every e_i is 0, and ε makes each projection 0/ε = 0 (normalised too: 0/√ε)."""
    for normalize in (False, True):
        u = gram_schmidt(torch.zeros(5, 4, 8), torch.full((5, 1), 1e-6), normalize)
        assert torch.equal(u, torch.zeros_like(u))


def test_topk_gates_are_renormalised():
    torch.manual_seed(0)
    layer = LoRAMixtureLinear(nn.Linear(16, 8), 4, 8, 4, routing="topk", top_k=2)
    x = torch.randn(20, 16)
    gates = layer.gate_weights(x)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(20))
    logits = layer.router(x)
    top, index = logits.topk(2, dim=-1)
    torch.testing.assert_close(gates.gather(-1, index), torch.softmax(top, dim=-1))


# ---- the injector on Hugging Face models
@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base_bit_for_bit_bert(tiny_bert, kind):
    batch = bert_batch()
    base_logits = logits_of(load_bert(tiny_bert), batch)
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(kind=kind))
    assert len(report.adapted_modules) == 2 * 6 and not any("pooler" in n for n in report.adapted_modules)
    assert report.head_modules == ("classifier",)
    assert 0 < report.trainable_share < 1
    assert torch.equal(logits_of(model, batch), base_logits)


@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base_bit_for_bit_llama(kind):
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    base = tiny_llama().eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = tiny_llama()
    report = inject(model, LoRAMixtureConfig(kind=kind))
    assert len(report.adapted_modules) == 2 * 7
    assert {name.rpartition(".")[2] for name in report.adapted_modules} == set(DECODER_TARGETS)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)


def is_adapter_or_head(name):
    return "lora_A" in name or "lora_B" in name or ".router." in name or name.startswith("classifier.")


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_routers_and_head_train(tiny_bert, kind):
    torch.manual_seed(0)
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(kind=kind))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    had_grad, largest = train_steps(model, bert_batch())
    expected = {name for name in before if is_adapter_or_head(name)}
    assert {name for name, flag in had_grad.items() if flag} == expected
    assert all(largest[name] > 0 for name in expected)  # A and the routers too, once B ≠ 0
    assert any(".router." in name for name in expected) == (kind != "lora")
    assert report.trainable_parameters == sum(before[name].numel() for name in expected)
    for name, parameter in model.named_parameters():
        if name in expected:
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact(tiny_bert, tmp_path, kind):
    torch.manual_seed(0)
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(kind=kind, routing="topk" if kind == "moe-lora" else "soft"))
    batch = bert_batch()
    train_steps(model, batch)
    logits = logits_of(model, batch)
    weights_path, _ = save_adapter(model, report, tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(weights_path)
    assert sum(t.numel() for t in saved.values()) == report.trainable_parameters  # the adapter alone, no base
    assert os.path.getsize(weights_path) < sum(p.numel() * 4 for p in model.parameters()) / 2

    fresh = load_bert(tiny_bert)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.config == report.config and loaded.adapted_modules == report.adapted_modules
    trained = dict(model.named_parameters())
    for name, parameter in fresh.named_parameters():
        assert torch.equal(parameter, trained[name]), name
    assert torch.equal(logits_of(fresh, batch), logits)


def test_lora_merge_matches_unmerged(tiny_bert):
    torch.manual_seed(0)
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(kind="lora"))
    randomize_B(model)
    batch = bert_batch()
    unmerged = logits_of(model, batch)
    merged_model = merge_and_unload(model, report)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert set(merged_model.state_dict()) == set(load_bert(tiny_bert).state_dict())
    merged = logits_of(merged_model, batch)
    # W0x + s·B(Ax) vs (W0 + s·BA)x differ by rounding only: per adapted layer at most γ ≈ (d_in + r + 1)·u of
    # |W0||x| + s|B||A||x|, for 2 layers × 6 adapted Linears in series (LayerNorm keeps the amplification O(1)).
    adapted_in_series, widest = len(report.adapted_modules), max(model.config.intermediate_size,
                                                                 model.config.hidden_size)
    tolerance = adapted_in_series * (widest + report.config.r + 1) * FP32_UNIT_ROUNDOFF * unmerged.abs().max()
    difference = (merged - unmerged).abs().max()
    print(f"lora merge: max|Δlogits|={difference.item():.2e} tol={tolerance.item():.2e}")
    assert 0 < (unmerged - logits_of(load_bert(tiny_bert), batch)).abs().max()  # the adapter does something
    assert difference <= tolerance


@pytest.mark.parametrize("kind", ["moe-lora", "omoe-lora"])
def test_mixture_refuses_to_merge(tiny_bert, kind):
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(kind=kind))
    with pytest.raises(OMoEConfigError, match="routed mixture .* cannot be merged"):
        merge_and_unload(model, report)


def test_targets_by_name_and_regex(tiny_bert):
    model = load_bert(tiny_bert)
    report = inject(model, LoRAMixtureConfig(targets=(r".*layer\.0\.attention\.self\.(query|value)", "key")))
    assert report.adapted_modules == ("bert.encoder.layer.0.attention.self.query",
                                      "bert.encoder.layer.0.attention.self.key",
                                      "bert.encoder.layer.0.attention.self.value",
                                      "bert.encoder.layer.1.attention.self.key")


# ---- refusals, before anything is built
@pytest.mark.parametrize("settings,message", [
    (dict(r=0), "r=0"), (dict(r=-4), "r=-4"),
    (dict(num_experts=1), "at least 2"), (dict(kind="moe-lora", num_experts=1), "at least 2"),
    (dict(top_k=5), "top_k=5"), (dict(top_k=0, routing="topk"), "top_k=0"),
    (dict(routing="hard"), "routing='hard'"), (dict(kind="xlora"), "kind='xlora'"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(kind="moe-lora", normalize=True), "normalize"), (dict(targets=()), "targets"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(OMoEConfigError, match=message.replace("(", r"\(")):
        LoRAMixtureConfig(**settings)


@pytest.mark.parametrize("kind", KINDS)
def test_unmatched_target_is_refused_before_touching_the_model(tiny_bert, kind):
    model = load_bert(tiny_bert)
    before = [(name, type(module)) for name, module in model.named_modules()]
    with pytest.raises(OMoEConfigError, match=r"'q_proj' matches no nn.Linear .*attention\.self\.query"):
        inject(model, LoRAMixtureConfig(kind=kind, targets=("query", "q_proj")))
    assert [(name, type(module)) for name, module in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_injecting_twice_is_refused(tiny_bert):
    model = load_bert(tiny_bert)
    inject(model, LoRAMixtureConfig())
    with pytest.raises(OMoEConfigError, match="already carries LoRA adapters"):
        inject(model, LoRAMixtureConfig(kind="lora"))
