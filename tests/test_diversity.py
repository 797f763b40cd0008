"""Expert-diversity figures on hand-built experts whose answers are known by construction (one process)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omoe_ds import make_moe_ffn
from omoe_ds.finetune.convert import bind_expert_groups
from omoe_ds.experts import find_expert_layers
from omoe_ds.studies.diversity import (LayerInputSample, diverse_degree, diversity_events, expert_diversity,
                                       expert_parameter_variance)

pytestmark = pytest.mark.usefixtures("single_process_group")
D, D_FF, M = 3, 5, 4
P1, P2 = D_FF * D + D_FF, D * D_FF + D  # positions of [W1|b1] and [W2|b2]
# Tolerances. Shares of differing positions are ratios of integer counts: exact up to a few fp64 roundings,
# rel=1e-12. Parameter variances are fp64 sums (over <= 2·(P1+P2) = 76 columns) of exact fp32 values, summed
# in another order: ~n·2^-53 ≈ 1e-14, rel=1e-12. Output variances come from fp32 expert forwards (a
# D-term and a D_FF-term dot product per output, ~(D + D_FF)·2^-24 ≈ 5e-7 relative) whose kernel may
# depend on the batch: rel=1e-6 (measured: fp32 vs fp64 forwards differ by <= 2e-7 over 300 seeds).
EXACT, FP64_SUM, FP32_OUTPUT = 1e-12, 1e-12, 1e-6


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """The MoE layers' own init (gate, experts) draws from the global RNG: fix it per test."""
    torch.manual_seed(0)


def tokens(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TinyMoE(nn.Module):
    def __init__(self, num_layers=1):
        super().__init__()
        self.moes = nn.ModuleList(make_moe_ffn(D, D_FF, M, ep_size=1) for _ in range(num_layers))

    def forward(self, x, used_token=None):
        for moe in self.moes:
            x = x + moe(x, used_token)[0]
        return x


def layers_with_experts(set_expert, num_layers=1):
    """find_expert_layers of a TinyMoE after set_expert(layer, expert, w1, w2) filled every expert."""
    layers = find_expert_layers(TinyMoE(num_layers))
    with torch.no_grad():
        for layer in layers:
            for e, (w1, w2) in enumerate(layer.local_experts):
                set_expert(layer.index, e, w1, w2)
    return layers


def same_for_all(layer, expert, w1, w2):
    g = torch.Generator().manual_seed(layer)
    for p in (*w1.parameters(), *w2.parameters()):
        p.copy_(torch.randn(p.shape, generator=g))


def seeded_random(layer, expert, w1, w2):
    g = torch.Generator().manual_seed(100 * layer + expert)
    for p in (*w1.parameters(), *w2.parameters()):
        p.copy_(torch.randn(p.shape, generator=g))


def flat_experts(layer, w):
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in linears[w].parameters()])
                        for linears in layer.local_experts])


@torch.no_grad()
def hand_outputs(layer, x):
    """Every expert's output on x, in fp64 (the reference of the fp32 figures)."""
    x = x.double()
    return torch.stack([F.linear(F.gelu(F.linear(x, w1.weight.double(), w1.bias.double())), w2.weight.double(),
                                 w2.bias.double()) for w1, w2 in layer.local_experts])


def test_identical_experts_differ_nowhere():
    layers = layers_with_experts(same_for_all)
    result = expert_diversity(layers, inputs=[tokens(7, D, seed=1)])
    for name in ("w1", "w2"):
        assert result["layers"][0][name] == {"percent_differing": 0.0, "param_variance": 0.0}
    assert result["layers"][0]["output_variance"] == 0.0
    assert result["overall"]["percent_differing"] == 0.0 and result["overall"]["output_variance"] == 0.0


def test_known_changes_give_the_exact_percentage_and_variance():
    """Expert 0 moves by 0.5 at 3 weight positions and 1 bias position of W1; expert 1 moves by 5e-4
    (under the threshold) elsewhere: only the 3 pairs with expert 0 differ, at those 4 positions."""
    def changed(layer, expert, w1, w2):
        same_for_all(layer, expert, w1, w2)
        if expert == 0:
            w1.weight[0, 0] += 0.5
            w1.weight[1, 2] += 0.5
            w1.weight[4, 1] += 0.5
            w1.bias[3] += 0.5
        if expert == 1:
            w2.weight[2, 2] += 5e-4

    layers = layers_with_experts(changed)
    result = expert_diversity(layers)["layers"][0]
    assert result["w1"]["percent_differing"] == pytest.approx(3 * 4 / (6 * P1) * 100, rel=EXACT)
    assert result["w2"]["percent_differing"] == 0.0
    for w, name in enumerate(("w1", "w2")):
        by_hand = torch.var(flat_experts(layers[0], w).double(), dim=0, unbiased=False).mean()
        assert result[name]["param_variance"] == pytest.approx(float(by_hand), rel=FP64_SUM)
    assert result["w2"]["param_variance"] > 0  # under the threshold yet not equal
    assert "output_variance" not in result  # no inputs given


def test_random_experts_match_brute_force_and_overall_counts_every_position_once():
    layers = layers_with_experts(seeded_random, num_layers=2)
    threshold = 0.8  # about half the pairs differ by more for unit-normal weights
    result = expert_diversity(layers, threshold=threshold)
    differing, variance_sum = 0, 0.0
    for layer in layers:
        for w, name in enumerate(("w1", "w2")):
            stack = flat_experts(layer, w)
            pairs = [(i, j) for i in range(M) for j in range(i + 1, M)]
            count = sum(int(((stack[i] - stack[j]).abs() > threshold).sum()) for i, j in pairs)
            differing += count
            variance = torch.var(stack.double(), dim=0, unbiased=False)
            variance_sum += float(variance.sum())
            assert result["layers"][layer.index][name]["percent_differing"] == pytest.approx(
                100 * count / (len(pairs) * stack.shape[1]), rel=EXACT)
            assert result["layers"][layer.index][name]["param_variance"] == pytest.approx(float(variance.mean()),
                                                                                          rel=FP64_SUM)
    assert result["overall"]["percent_differing"] == pytest.approx(100 * differing / (2 * 6 * (P1 + P2)), rel=EXACT)
    assert result["overall"]["param_variance"] == pytest.approx(variance_sum / (2 * (P1 + P2)), rel=FP64_SUM)


def test_output_variance_equals_hand_computation():
    layers = layers_with_experts(seeded_random)
    x = tokens(9, D, seed=5)
    result = expert_diversity(layers, inputs=[x])
    by_hand = torch.var(hand_outputs(layers[0], x).double(), dim=0, unbiased=False).mean()
    assert by_hand > 0.1
    assert result["layers"][0]["output_variance"] == pytest.approx(float(by_hand), rel=FP32_OUTPUT)
    assert result["overall"]["output_variance"] == pytest.approx(float(by_hand), rel=FP32_OUTPUT)


def flat_figures(node, prefix=""):
    """{".layers.0.w1.param_variance": value, ...} of an expert_diversity result."""
    if not isinstance(node, (dict, list)):
        return {prefix: node}
    flat = {}
    for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
        flat.update(flat_figures(value, f"{prefix}.{key}"))
    return flat


def test_chunked_equals_unchunked():
    layers = layers_with_experts(seeded_random, num_layers=2)
    inputs = [tokens(9, D, seed=2), tokens(4, 2, D, seed=3)]  # any leading shape: tokens are rows of d_model
    whole = flat_figures(expert_diversity(layers, threshold=0.8, inputs=inputs))
    chunked = flat_figures(expert_diversity(layers, threshold=0.8, inputs=inputs, chunk=2))  # crosses no w/b edge
    assert chunked.keys() == whole.keys()
    # chunk=2 runs the experts on one token at a time, not on all 9 at once: the fp32 outputs may round otherwise
    outputs = [key for key in whole if key.endswith("output_variance")]
    assert len(outputs) == 3  # two layers and overall
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=FP32_OUTPUT if key in outputs else FP64_SUM), key


def test_legacy_variance_keys_and_modest_monitor_events():
    layers = layers_with_experts(seeded_random, num_layers=2)
    legacy = expert_parameter_variance(layers)
    result = expert_diversity(layers, inputs=[tokens(3, D, seed=4)] * 2)
    assert [set(v) for v in legacy] == [{"w1", "w2", "mean"}] * 2
    assert legacy[1]["w2"] == result["layers"][1]["w2"]["param_variance"]
    events = diversity_events(result, step=32)
    names = {name for name, _, _ in events}
    assert "Diversity/overall/output_variance" in names and "Diversity/layer1/w2/percent_differing" in names
    assert len(events) == 3 + 2 * 2 * 2 and all(step == 32 for _, _, step in events)


def expert_dict(deltas):
    """Three experts of one layer; W1 is [2, 2] plus bias [2]; expert g's W1 = g·deltas; W2 equal everywhere."""
    state = {}
    for g in range(3):
        flat = g * torch.tensor(deltas, dtype=torch.float32)
        state[f"layer0.expert{g}.w1.weight"] = flat[:4].reshape(2, 2)
        state[f"layer0.expert{g}.w1.bias"] = flat[4:]
        state[f"layer0.expert{g}.w2.weight"] = torch.ones(2, 2)
        state[f"layer0.expert{g}.w2.bias"] = torch.ones(2)
    state["embed.weight"] = torch.zeros(3)  # not an expert parameter: ignored
    return state


def test_diverse_degree_counts_positions_where_run_b_spreads_the_experts_more():
    run_a = expert_dict([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    run_b = expert_dict([2.0, 0.5, 1.0, -3.0, 1.0, 0.0])  # larger at weight[0, 0], weight[1, 1]; ties don't count
    result = diverse_degree(run_a, run_b)
    assert result["layers"] == [{"w1": pytest.approx(2 / 6), "w2": 0.0}]
    assert result["overall"] == pytest.approx(2 / 12)
    assert diverse_degree(run_b, run_a)["layers"][0]["w1"] == pytest.approx(2 / 6)  # positions 1 and 5
    with pytest.raises(ValueError):
        diverse_degree(run_a, {"layer1.expert0.w1.weight": torch.ones(2, 2)})


def test_input_sample_keeps_the_first_routed_tokens_only():
    model = TinyMoE()
    bind_expert_groups(model)
    sample = LayerInputSample(find_expert_layers(model), max_tokens=5)
    x = tokens(2, 3, D, seed=6)
    model(x)  # not enabled: nothing kept
    sample.enabled = True
    used = torch.tensor([1, 0, 1, 1, 0, 1])
    model(x, used)
    model(x + 1, used)
    (kept,) = sample.take()
    flat = x.reshape(-1, D)
    assert torch.equal(kept, torch.cat([flat[used > 0], flat[:1] + 1]))
    assert sample.take()[0].numel() == 0
