"""Every bad input is refused with one clear error, before any engine or compute exists."""
import json

import pytest
import torch
from torch import nn
from deepspeed.moe.layer import MoE

import omoe_ds
from omoe_ds import OMoEConfig, OMoEConfigError
from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec
from omoe_ds.experts import check_ep_sizes, find_expert_layers


def cfg(**omoe):
    return {"train_micro_batch_size_per_gpu": 4, "omoe": omoe}


@pytest.mark.parametrize("omoe,match", [
    ({"skip_step": 1}, r"skip_step=1 .*>= 2"),
    ({"skip_step": 0}, r"skip_step=0"),
    ({"alpha0": 0}, r"alpha0=0 .*> 0"),
    ({"alpha0": -1.5}, r"alpha0=-1.5"),
    ({"lam": 0}, r"lam=0 .*\(0, 1\]"),
    ({"lam": 1.5}, r"lam=1.5"),
    ({"loo_divisor": "M+1"}, r"loo_divisor='M\+1'"),
    ({"skip_stpe": 5}, r"unknown key\(s\) \['skip_stpe'\].*valid keys"),
    ({"lam": 0.5}, r"n is unknown: set omoe.total_steps"),
])
def test_bad_omoe_section_is_refused(omoe, match):
    with pytest.raises(OMoEConfigError, match=match):
        OMoEConfig.from_ds_config(cfg(**omoe))


def test_total_steps_comes_from_the_scheduler():
    ds = cfg(lam=0.5)
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"total_num_steps": 123}}
    assert OMoEConfig.from_ds_config(ds).total_steps == 123
    assert OMoEConfig.from_ds_config(cfg()).total_steps is None  # λ = 1 needs no n


def test_o_step_schedule():
    c = OMoEConfig(skip_step=5)
    assert [i for i in range(21) if c.is_o_step(i)] == [5, 10, 15, 20]
    assert not OMoEConfig(enabled=False).is_o_step(5)


def small_model(**kw):
    return SmallMoEClassifier(SmallMoESpec(**kw))


def test_zero3_with_native_moe_is_refused_before_the_engine():
    ds = cfg()
    ds["zero_optimization"] = {"stage": 3}
    with pytest.raises(OMoEConfigError, match=r"stage=3 with DeepSpeed's native MoE layer .*does not support native MoE "
                                              r"under ZeRO-3\. Use a Hugging Face MoE model through AutoEP"):
        omoe_ds.initialize(model=small_model(), config=ds)


def test_single_expert_is_refused():
    model = nn.Sequential(MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=1))
    with pytest.raises(OMoEConfigError, match=r"num_experts=1.*at least 2 experts"):
        omoe_ds.initialize(model=model, config=cfg())
    with pytest.raises(OMoEConfigError, match=r"num_experts=1"):
        omoe_ds.make_moe_ffn(8, 16, num_experts=1)


def test_experts_not_divisible_by_ep_size_is_refused():
    with pytest.raises(OMoEConfigError, match=r"num_experts=6 is not divisible by ep_size=4"):
        omoe_ds.make_moe_ffn(8, 16, num_experts=6, ep_size=4)


def test_ep_size_must_divide_world_size():
    layers = find_expert_layers(small_model())  # ep_size 1
    layers[0].ep_size = 4
    with pytest.raises(OMoEConfigError, match=r"ep_size=4 does not divide the world size 2"):
        check_ep_sizes(layers, 2)


class ThreeLinearExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class GatedExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.down(self.up(x) * self.scale)


@pytest.mark.parametrize("expert,match", [
    (ThreeLinearExpert(), r"ThreeLinearExpert has 3 nn.Linear"),
    (GatedExpert(), r"GatedExpert has 2 nn.Linear and other parameters \['scale'\]"),
    (nn.Sequential(nn.Linear(8, 16), nn.Linear(8, 16)), r"shapes 8→16 and 8→16"),
])
def test_expert_that_is_not_two_linears_is_refused(expert, match):
    model = nn.Sequential(MoE(8, expert, num_experts=2))
    with pytest.raises(OMoEConfigError, match=match):
        omoe_ds.initialize(model=model, config=cfg())


class BadSwiGLU(nn.Module):
    def __init__(self, gate_bias=True, up_bias=False, d_ff=16):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 16, bias=gate_bias), nn.Linear(8, d_ff, bias=up_bias)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.gate(x) * self.up(x))


@pytest.mark.parametrize("expert,match", [
    (BadSwiGLU(), r"gate and up read the same input and share one projector, so they must both have a bias"),
    (BadSwiGLU(up_bias=True, d_ff=12), r"gate 8→16, up 8→12 and down 16→8; OMoE expects gate, up d→d_ff"),
])
def test_swiglu_expert_whose_gate_and_up_differ_is_refused(expert, match):
    with pytest.raises(OMoEConfigError, match=match):
        omoe_ds.initialize(model=nn.Sequential(MoE(8, expert, num_experts=2)), config=cfg())


def test_swiglu_expert_is_found_with_three_streams_shared():
    (layer,) = find_expert_layers(nn.Sequential(omoe_ds.make_moe_ffn(8, 12, 4, expert="swiglu")))
    assert layer.layout == "deepspeed-swiglu" and layer.matrix_names == ("gate", "up", "down")
    assert [(s.d_in, s.has_bias) for s in layer.streams] == [(8, False), (12, False)]
    with pytest.raises(OMoEConfigError, match=r"expert='moe': use \"ffn\".*or \"swiglu\""):
        omoe_ds.make_moe_ffn(8, 12, 4, expert="moe")


def tiny_hf_moe(model_type: str, **kwargs):
    import transformers
    common = dict(vocab_size=48, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    config = {"gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=12, num_local_experts=4, head_dim=8,
                                                           num_experts_per_tok=2, **common),
              "mixtral": lambda: transformers.MixtralConfig(intermediate_size=12, num_local_experts=4,
                                                            num_experts_per_tok=2, **common)}[model_type]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def test_gpt_oss_experts_are_refused_by_name():
    with pytest.raises(OMoEConfigError, match=r"GptOssExperts\) has transposed \[E, in, out\] weights, interleaved "
                                              r"gate/up rows, expert biases; .*GPT-OSS-style experts are not supported"):
        omoe_ds.initialize(model=tiny_hf_moe("gpt_oss"), config=cfg())


def test_experts_implementation_omoe_cannot_read_is_refused():
    model = tiny_hf_moe("mixtral")
    model.config._experts_implementation = "sonicmoe"  # a CUDA kernel: h never leaves it
    with pytest.raises(OMoEConfigError, match=r"experts_implementation='sonicmoe' computes h inside a kernel .*"
                                              r"experts_implementation=\"grouped_mm\""):
        omoe_ds.initialize(model=model, config=cfg())


def test_fused_experts_are_found_in_a_transformers_model():
    layers = find_expert_layers(tiny_hf_moe("mixtral"))
    assert [(layer.name, layer.layout, layer.num_experts, layer.ep_size) for layer in layers] == [
        ("model.layers.0.mlp.experts", "hf-fused", 4, 1)]
    assert [(s.d_in, s.has_bias) for s in layers[0].streams] == [(16, False), (12, False)]
    gate, up = layers[0].matrices(1)["gate"][0], layers[0].matrices(1)["up"][0]
    fused = layers[0].module.gate_up_proj
    assert torch.equal(torch.cat([gate, up]), fused[1]) and gate.data_ptr() == fused[1].data_ptr()  # views


def test_model_without_moe_layers_is_refused():
    with pytest.raises(OMoEConfigError, match=r"has no MoE layer OMoE knows \(deepspeed.moe.layer.MoE, or transformers. fused experts"):
        omoe_ds.initialize(model=nn.Linear(3, 3), config=cfg())


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(OMoEConfigError, match=r"does not exist"):
        omoe_ds.initialize(model=small_model(), config=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OMoEConfigError, match=r"bad.json.*not valid JSON"):
        omoe_ds.initialize(model=small_model(), config=str(bad))
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(cfg(skip_step=1)))
    with pytest.raises(OMoEConfigError, match=r"skip_step=1"):
        omoe_ds.initialize(model=small_model(), config=str(ok))
