"""Diversity figures of LoRA-expert mixtures against independent fp64 per-token computations (one process)."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.lora import LoRAMixtureConfig, LoRAMixtureLinear, inject
from omoe_ds.lora.diversity import lora_diversity, mixture_modules, plot_expert_pca

pytestmark = pytest.mark.lora

FP32_UNIT_ROUNDOFF = 2.0 ** -24
D_IN, D_OUT, R, N = 24, 20, 4, 4


class Toy(nn.Module):
    """One mixture layer fed the input directly, so padded positions can hold anything (even NaN)."""

    def __init__(self, kind="omoe-lora", routing="soft", top_k=2):
        super().__init__()
        self.proj = LoRAMixtureLinear(nn.Linear(D_IN, D_OUT), R, 8, N, routing=routing, top_k=top_k,
                                      orthogonalize=kind == "omoe-lora")

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def set_B(model, shared=0.0, std=0.5, seed=3):
    """Trained-looking experts: B_i = shared·B_0 + std·noise_i (shared > 0 makes the experts' outputs correlated)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in mixture_modules(model).values():
            common = torch.randn(module.lora_B.shape[1:], generator=generator)
            noise = torch.randn(module.lora_B.shape, generator=generator)
            module.lora_B.copy_(shared * common + std * noise)
            if shared:  # a shared A too, or B_0 alone would not correlate outputs of different A_i
                module.lora_A.copy_(module.lora_A[:1].expand_as(module.lora_A) + 0.3 * module.lora_A)


def toy(kind="omoe-lora", seed=0, **options):
    torch.manual_seed(seed)
    return Toy(kind, **options)


def toy_batch(seed=1, tokens=(3, 10)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, D_IN, generator=generator)
    mask = torch.ones(tokens, dtype=torch.long)
    mask[0, 7:], mask[2, 4:] = 0, 0
    return {"x": x, "attention_mask": mask}


def tiny_llama(kind, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    inject(model, LoRAMixtureConfig(kind=kind, r=4, num_experts=N, dropout=0.1))  # dropout: must be off in figures
    return model


def llama_batch(seed=2):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:], mask[2, 3:] = 0, 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


# ---- an independent reference: the module's own parameters in fp64, per real token, pair by pair
def reference(module, x, mask):
    x64 = x.reshape(-1, module.in_features).double()[mask.reshape(-1) != 0].numpy()
    A, B = module.lora_A.detach().double().numpy(), module.lora_B.detach().double().numpy()
    experts = np.stack([module.scaling * (x64 @ A[i].T) @ B[i].T for i in range(module.num_experts)], axis=1)
    pairs = list(itertools.combinations(range(module.num_experts), 2))
    per_token = [np.mean([e[i] @ e[j] / (np.linalg.norm(e[i]) * np.linalg.norm(e[j])) for i, j in pairs])
                 for e in experts]
    logits = x64 @ module.router.weight.detach().double().numpy().T
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    load = gates.mean(0)
    # fp32 rounding bounds. e_i = s·B_i(A_i x): elementwise |δe_i| ≤ γ·s|B_i||A_i||x| with γ = (d_in + r)·u, so
    # ‖δe_i‖/‖e_i‖ ≤ ρ_i; a cosine moves by at most ~2(ρ_i + ρ_j) ≤ 4 max ρ. A logit moves by ≤ γ_din·|W_g||x|,
    # a gate relatively by twice that, and an entropy by ≤ 2·δlogit·(log N + 1).
    gamma = (module.in_features + module.r) * FP32_UNIT_ROUNDOFF
    bound = np.stack([module.scaling * (np.abs(x64) @ np.abs(A[i]).T) @ np.abs(B[i]).T
                      for i in range(module.num_experts)], axis=1)
    rho = (gamma * np.linalg.norm(bound, axis=-1) / np.linalg.norm(experts, axis=-1)).max()
    logit_error = (module.in_features * FP32_UNIT_ROUNDOFF
                   * (np.abs(x64) @ np.abs(module.router.weight.detach().double().numpy()).T).max())
    return {"cosine": float(np.mean(per_token)), "cosine_tolerance": 4 * rho, "tokens": len(x64), "load": load,
            "gate_entropy": float(np.mean(-(gates * np.log(gates)).sum(-1))),
            "load_entropy": float(-(load * np.log(load)).sum()),
            "entropy_tolerance": 2 * logit_error * (math.log(module.num_experts) + 1) + 1e-12}


def capture_inputs(model):
    """Forward pre-hooks that keep every mixture module's input (of the forward lora_diversity itself runs)."""
    inputs, handles = {}, []
    for name, module in mixture_modules(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, args[0].detach().clone())))
    return inputs, handles


def check_against_reference(model, batch):
    inputs, handles = capture_inputs(model)
    result = lora_diversity(model, batch)
    for handle in handles:
        handle.remove()
    assert set(result["modules"]) == set(inputs)
    worst = 0.0
    for name, figures in result["modules"].items():
        ref = reference(mixture_modules(model)[name], inputs[name], batch["attention_mask"])
        assert figures["tokens"] == ref["tokens"] == int(batch["attention_mask"].sum())
        assert figures["expert_cosine"]["pairs"] == ref["tokens"] * N * (N - 1) // 2
        error = abs(figures["expert_cosine"]["mean"] - ref["cosine"])
        worst = max(worst, error / ref["cosine_tolerance"])
        assert error <= ref["cosine_tolerance"], (name, error, ref["cosine_tolerance"])
        np.testing.assert_allclose(figures["load"], ref["load"], rtol=0, atol=ref["entropy_tolerance"])
        assert abs(sum(figures["load"]) - 1) <= 1e-6  # fp32 rows summing to 1, averaged in fp64
        assert figures["gate_entropy"] == pytest.approx(ref["gate_entropy"], abs=ref["entropy_tolerance"])
        assert figures["load_entropy"] == pytest.approx(ref["load_entropy"], abs=ref["entropy_tolerance"])
        assert figures["max_entropy"] == pytest.approx(math.log(N))
    print(f"worst cosine error / tolerance: {worst:.2e}")
    return result


@pytest.mark.parametrize("kind", ["moe-lora", "omoe-lora"])
def test_figures_match_fp64_reference_on_llama(kind):
    model = tiny_llama(kind)
    set_B(model)
    model.train()  # lora_diversity must switch dropout off, and give the mode back
    result = check_against_reference(model, llama_batch())
    assert model.training and all(m.training for m in model.modules())
    assert len(result["modules"]) == 2 * 7
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN anywhere
    summary = result["summary"]
    assert summary["modules"] == 14 and summary["tokens"] == int(llama_batch()["attention_mask"].sum())
    means = [f["expert_cosine"]["mean"] for f in result["modules"].values()]
    assert summary["expert_cosine"]["mean"] == pytest.approx(sum(means) / len(means), rel=1e-12)
    assert sum(summary["load"]) == pytest.approx(1, abs=1e-6)
    if kind == "moe-lora":  # u = e
        assert all(f["representation_cosine"] == f["expert_cosine"] for f in result["modules"].values())


@pytest.mark.parametrize("kind", ["moe-lora", "omoe-lora"])
def test_identical_experts_have_cosine_one_before_orthogonalisation(kind):
    model = toy(kind)
    set_B(model)
    with torch.no_grad():  # every expert a copy of expert 0
        model.proj.lora_A.copy_(model.proj.lora_A[:1].expand_as(model.proj.lora_A))
        model.proj.lora_B.copy_(model.proj.lora_B[:1].expand_as(model.proj.lora_B))
    figures = check_against_reference(model, toy_batch())["modules"]["proj"]
    assert figures["expert_cosine"]["mean"] == pytest.approx(1, abs=1e-6)
    assert figures["expert_cosine"]["max_abs"] == pytest.approx(1, abs=1e-6)
    if kind == "moe-lora":
        assert figures["representation_cosine"]["mean"] == pytest.approx(1, abs=1e-6)


def test_omoe_representations_are_orthogonal():
    model = toy("omoe-lora")
    set_B(model, shared=1.0, std=0.3)  # strongly correlated experts
    batch = toy_batch()
    with torch.no_grad():  # the contract's regime: ‖u_j‖² ≫ ε on every real token
        parts = model.proj.mixture_parts(batch["x"])
    real = batch["attention_mask"].reshape(-1) != 0
    eps_share = (parts.eps[real] / parts.representations[real].square().sum(-1)).max().item()
    assert eps_share < 1e-5
    figures = check_against_reference(model, batch)["modules"]["proj"]
    print(f"expert cos {figures['expert_cosine']['mean']:.3f}, u max|cos| "
          f"{figures['representation_cosine']['max_abs']:.2e}, eps/|u|^2 <= {eps_share:.1e}")
    assert figures["expert_cosine"]["mean"] > 0.5
    assert figures["representation_cosine"]["max_abs"] <= 1e-5
    assert figures["representation_cosine"]["pairs"] == figures["expert_cosine"]["pairs"]


def test_topk_router_entropy_has_no_nan():
    model = toy("moe-lora", routing="topk", top_k=2)
    set_B(model)
    figures = lora_diversity(model, toy_batch())["modules"]["proj"]
    assert sum(figures["load"]) == pytest.approx(1, abs=1e-6)
    assert 0 < figures["gate_entropy"] <= math.log(2) + 1e-6
    assert figures["gate_entropy"] <= figures["load_entropy"] <= math.log(N) + 1e-12  # concavity


def test_padding_tokens_do_not_enter():
    model = toy("omoe-lora")
    set_B(model)
    batch = toy_batch()
    real = batch["attention_mask"] != 0
    garbage = batch["x"].clone()
    garbage[~real] = float("nan")  # any padded token that entered would make a figure NaN
    masked = lora_diversity(model, {"x": garbage, "attention_mask": batch["attention_mask"]})["modules"]["proj"]
    alone = lora_diversity(model, {"x": batch["x"][real][None]})["modules"]["proj"]  # real tokens only, no mask
    assert masked["tokens"] == alone["tokens"] == int(real.sum())
    json.dumps(masked, allow_nan=False)
    for key in ("expert_cosine", "representation_cosine"):
        for figure in ("mean", "mean_abs", "max_abs"):
            assert masked[key][figure] == pytest.approx(alone[key][figure], rel=1e-6, abs=1e-9)
    assert masked["load"] == pytest.approx(alone["load"], rel=1e-6)
    assert masked["gate_entropy"] == pytest.approx(alone["gate_entropy"], rel=1e-6)

    # In a Hugging Face model: padded ids changed leave every figure as it was.
    model = tiny_llama("omoe-lora")
    set_B(model)
    batch = llama_batch()
    other = dict(batch, input_ids=torch.where(batch["attention_mask"] != 0, batch["input_ids"], 127))
    first, second = lora_diversity(model, batch), lora_diversity(model, other)
    assert first["summary"]["tokens"] == int(batch["attention_mask"].sum())
    for name, figures in first["modules"].items():
        for key in ("expert_cosine", "representation_cosine"):
            assert figures[key]["mean"] == pytest.approx(second["modules"][name][key]["mean"], rel=1e-6, abs=1e-9)
        assert figures["load"] == pytest.approx(second["modules"][name]["load"], rel=1e-6)


def test_untrained_experts_give_none_and_mismatched_mask_is_refused():
    model = toy("omoe-lora")  # B = 0: every e_i = 0, no cosine is defined
    figures = lora_diversity(model, toy_batch())["modules"]["proj"]
    assert figures["expert_cosine"] == {"mean": None, "mean_abs": None, "max_abs": None, "pairs": 0}
    assert sum(figures["load"]) == pytest.approx(1, abs=1e-6)
    with pytest.raises(OMoEConfigError, match="does not match the attention mask"):
        lora_diversity(model, {"x": torch.randn(2, 5, D_IN), "attention_mask": torch.ones(2, 6)})


def test_plain_lora_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    inject(model, LoRAMixtureConfig(kind="lora", r=2))
    with pytest.raises(OMoEConfigError, match="no LoRAMixtureLinear"):
        lora_diversity(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_pca_plot_is_a_png_of_the_expected_size(tmp_path):
    from PIL import Image
    models = {}
    for kind in ("moe-lora", "omoe-lora"):
        models[kind] = tiny_llama(kind)
        set_B(models[kind], shared=1.0, std=0.3)  # the same correlated experts in both
    batches = [llama_batch(seed) for seed in (2, 3, 4)]
    path, name = plot_expert_pca(models, batches, tmp_path / "experts.png", module_name="model.layers.1.mlp.up_proj",
                                 dpi=80, panel_size=(5, 4))
    assert name == "model.layers.1.mlp.up_proj"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (2 * 5 * 80, 4 * 80)
        image.verify()
    with pytest.raises(OMoEConfigError, match="no LoRAMixtureLinear of this model"):
        plot_expert_pca(models, batches, tmp_path / "x.png", module_name="lm_head")
