"""OMoE through DeepSpeed AutoEP (tiny random Mixtral, Qwen3-MoE and DeepSeek-V3, w1/w3/w2 experts) at ZeRO-2 and ZeRO-3,
projecting on each side: one 2-rank (EP = 2) and one 1-rank (EP = 1) launch of tests/autoep_worker.py, and, in-process,
the refusals and the side report."""
import os
import sys

import pytest
import torch

import omoe_ds
from omoe_ds import OMoEConfigError
from omoe_ds.core.environment import free_local_port

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from autoep_worker import CASES, FAMILIES, STEPS, TOKEN_CASES, parse  # noqa: E402
from layouts_worker import HF_CONFIGS  # noqa: E402
from test_layouts import merged, reports  # noqa: E402  (the run files have the same layout)
import launching  # noqa: E402

pytestmark = [pytest.mark.autoep]
ULP = 2.0 ** -23  # fp32 spacing at 1
# A projected gradient is one fp32 product G̃·P̄ (n ≤ 24 terms) against the same product in the reference.
GRAD_TOL = 1e-5
# Window sums: fp32 rows summed per forward before fp64, against a recomputation (h recomputed in fp32).
WINDOW_TOL = 1e-6


def bound(reference: torch.Tensor) -> float:
    """Runs that differ in reduction order only (other GEMM shapes, another rank count, ZeRO's flat
    partitions): at most ~2 ulp of the largest weight per step, over STEPS steps. A wrong window,
    exchange or projection moves weights by ≫ 1e-4 (the O-step gradients move by 4-60 % here)."""
    return 2 * STEPS * ULP * max(reference.abs().max().item(), 1.0)


def launch(num_ranks: int, out_dir) -> None:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(num_ranks), "--master_port", str(free_local_port()),
           os.path.join(HERE, "autoep_worker.py"), "--out", str(out_dir)]
    proc = launching.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                         timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {world: tmp_path_factory.mktemp(f"autoep_w{world}") for world in (1, 2)}
    for world in (2, 1):
        launch(world, out[world])
    return out


def assert_equal_runs(a, b):
    for part in ("params", "dense", "projectors"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            diff = (a[part][k] - b[part][k]).abs().max().item()
            assert diff <= bound(a[part][k]), (part, k, diff)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_two_ranks_at_ep2_equal_one_process_at_ep1(runs, case):
    one, two = merged(runs[1], case), merged(runs[2], case)
    assert_equal_runs(one, two)
    moved = max((P - torch.eye(len(P))).abs().max().item() for P in one["projectors"].values())
    assert moved > 1e-3  # the projectors really took windows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.distributed
def test_zero3_equals_zero2(runs, family, world):
    assert_equal_runs(merged(runs[world], f"{family}_z2"), merged(runs[world], f"{family}_z3"))


@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.distributed
def test_token_side_run_equals_gradient_side_run(runs, case, world):
    assert_equal_runs(merged(runs[world], case), merged(runs[world], case.replace("_token", "")))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_each_stream_projects_on_the_configured_side(runs, case):
    """Forced sides hold for every (layer, stream); "auto" takes the cheaper one by the reported costs."""
    side = parse(case)[2]
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert len(report["sides"]) == 4 and {r["stream"] for r in report["sides"]} == {"x", "h"}
            for r in report["sides"]:
                cheaper = "token" if r["cost_token"] < r["cost_gradient"] else "gradient"
                assert r["mode"] == side and r["side"] == (cheaper if side == "auto" else side), r


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_layers_found_after_the_replacement_and_o_steps_taken(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert report["layouts"] == ["autoep-swiglu"] and report["ep_sizes"] == [world, world]
            assert report["zero3_optimizer"] == (parse(case)[1] == 3)
            assert report["o_steps_done"] == 3  # steps 3, 6, 9


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_window_counts_real_tokens_only_and_equals_recomputation(runs, case):
    """Summed over the world, the window after steps 0-2 equals Σx, Σh and counts recomputed from the router's
    top-k over real tokens; its routes number exactly real tokens × k, so no padding row entered it."""
    for world in (1, 2):
        for report in reports(runs[world], case):
            window = report["window"]
            assert all(window[k] for k in window if k.endswith("counts_equal"))
            assert max(v for k, v in window.items() if k.endswith((".x", ".h"))) <= WINDOW_TOL, window
            counted = sum(v for k, v in window.items() if k.endswith("routes_counted"))
            assert counted == window["real_routes_all_layers"] > 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_o_step_gradient_of_w1_w3_w2_is_raw_gradient_times_leave_one_out_projector(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert {k.rsplit(".", 1)[1] for k in report["o_step_gradient"]} == {"w1", "w3", "w2"}
            assert max(report["o_step_gradient"].values()) <= GRAD_TOL, report["o_step_gradient"]
            assert min(report["o_step_moved"].values()) > 1e-2  # the projection is not the identity


@pytest.mark.parametrize("case", CASES)
@pytest.mark.distributed
def test_o_step_leaves_dense_parameters_and_their_optimizer_state_bit_identical(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert report["dense_tensors_checked"] >= 1
            assert report["dense_state_unchanged"] and report["dense_params_unchanged"]
            assert report["experts_moved"] > 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("_z3")])
@pytest.mark.distributed
def test_zero3_resume_from_mid_window_checkpoint_is_bit_exact(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert report["resume_bit_exact"] and report["resume_o_steps_done"] == 3


# ---- refusals, before any compute ------------------------------------------------------------------
def tiny(family="mixtral"):
    import transformers
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]())


def config(stage=3, **expert_parallel):
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "expert_parallel": {"enabled": True, "autoep_size": 1, "use_grouped_mm": False, **expert_parallel}}


@pytest.mark.parametrize("model, ep, match", [
    ("olmoe", {}, r"AutoEP finds no MoE layer in OlmoeForCausalLM \(model_type 'olmoe'.*AutoEP drives these "
                  r"families: \[.*'mixtral'.*\]; set expert_parallel.preset_model"),
    ("mixtral", {"preset_model": "llama"}, r"preset_model='llama' is not an AutoEP preset; use one of \[.*'qwen3_moe'"),
    ("mixtral", {"autoep_size": 3}, r"autoep_size=3 does not divide the 4 experts of model.layers.0.mlp; use one of "
                                    r"\[1, 2, 4\]"),
    ("mixtral", {"comm_backend": "deepep"}, r"comm_backend=\"deepep\".*set \"comm_backend\": \"comm\""),
    ("mixtral", {"expert_tensor_parallel_size": 2}, r"expert_tensor_parallel_size=2.*fold experts.*set both to 1"),
])
def test_autoep_settings_omoe_cannot_run_are_refused(model, ep, match):
    with pytest.raises(OMoEConfigError, match=match):
        omoe_ds.initialize(model=tiny(model), config=config(**ep))


def test_triton_grouped_gemm_is_refused(monkeypatch):
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setattr(type(get_accelerator()), "prefer_triton_grouped_mm", lambda self: True)
    with pytest.raises(OMoEConfigError, match=r"Triton grouped GEMM.*\"disable_triton_grouped_mm\": true"):
        omoe_ds.initialize(model=tiny(), config=config(use_grouped_mm=True))


def test_replicated_fused_experts_under_zero3_point_to_autoep():
    ds = config()
    del ds["expert_parallel"]
    with pytest.raises(OMoEConfigError, match=r"stage=3 with transformers' fused experts .*through DeepSpeed AutoEP"):
        omoe_ds.initialize(model=tiny(), config=ds)


def test_client_optimizer_instance_needs_expert_weights_in_a_moe_group():
    model = tiny()
    ds = config(stage=2)
    del ds["optimizer"]
    with pytest.raises(OMoEConfigError, match=r"group 0 holds MoE expert weights that AutoEP replaces.*"
                                              r"\{\"moe\": True, \"name\": \"ep_size_1\"\}.*or pass a callable"):
        omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)


def expert_groups_adamw(model):
    """A torch AdamW whose fused expert weights sit in the DeepSpeed MoE group AutoEP's replacements join."""
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    dense = [p for n, p in model.named_parameters() if ".experts." not in n]
    return torch.optim.AdamW([{"params": dense, "name": "dense"},
                              {"params": experts, "moe": True, "name": "ep_size_1"}], lr=1e-3)


@pytest.mark.parametrize("optimizer", ["callable", "instance in moe groups"])
def test_client_optimizers_that_keep_expert_groups_train_with_o_steps(single_process_group, monkeypatch, optimizer):
    monkeypatch.setenv("LOCAL_RANK", "0")
    model = tiny()
    ds = config(stage=2)
    del ds["optimizer"]
    ds["zero_allow_untested_optimizer"] = True
    ds["omoe"] = {"skip_step": 2}
    opt = (lambda p: torch.optim.AdamW(p, lr=1e-3)) if optimizer == "callable" else expert_groups_adamw(model)
    engine, *_ = omoe_ds.initialize(model=model, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # steps 0, 1: R, step 2: O
        ids = torch.randint(3, 48, (2, 6), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    assert [layer.layout for layer in engine.omoe.layers] == ["autoep-swiglu"] * 2
    assert engine.omoe.o_steps_done == 1


def test_zeroing_padding_while_recording_keeps_real_token_logits_bit_exact(single_process_group, monkeypatch):
    """Left and right padding: a recording forward (padded rows zeroed at each AutoEP layer) gives the real
    tokens the logits of a forward that records nothing, bit for bit; padded positions do change."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine, *_ = omoe_ds.initialize(model=tiny(), config=config(stage=2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 48, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    recording = engine(input_ids=ids, attention_mask=mask).logits
    assert engine.omoe.windows[0].counts.sum() > 0  # it recorded
    with torch.no_grad():
        plain = engine(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(recording[real], plain[real])
    assert not torch.equal(recording[~real], plain[~real])


@pytest.mark.parametrize("side", ["token", "gradient", "auto"])
def test_side_report_covers_autoep_streams(single_process_group, monkeypatch, side):
    """Every AutoEP (layer, stream) reports the side of the last O step with both sides' costs: T·c + T·D·n against
    E_local·D·c + T·D·n, T = the aligned rows the layer's experts received (alignment rows included)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    ds = config(stage=2)
    ds["omoe"] = {"skip_step": 2, "projection_side": side}
    engine, *_ = omoe_ds.initialize(model=tiny(), config=ds)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # steps 0, 1: R, step 2: O
        ids = torch.randint(3, 48, (4, 12), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    report = engine.omoe.side_report()
    assert [(r["layer"], r["stream"]) for r in report] == [(0, "x"), (0, "h"), (1, "x"), (1, "h")]
    for r in report:
        d, ff, E_local = 16, 24, 4  # tiny Mixtral at EP = 1
        D, n = (2 * ff, d) if r["stream"] == "x" else (d, ff)
        T = r["token_rows"]
        assert 4 * 12 * 2 <= T <= 4 * 12 * 2 + E_local * 7 and T % 8 == 0  # 48 tokens · top-2, each expert's rows
        # aligned to 8
        row_cost = (r["cost_gradient"] - T * D * n) // (E_local * D)  # one row times P̄
        assert r["out_features"] == D and r["cost_token"] == T * row_cost + T * D * n
        cheaper = "token" if r["cost_token"] < r["cost_gradient"] else "gradient"
        assert r["side"] == (cheaper if side == "auto" else side)
    if side == "auto":  # T ≤ 96 + 28 < E_local·D = 4 · 48 for x, T ≥ 96 > 4 · 16 for h
        assert [r["side"] for r in report] == ["token", "gradient"] * 2


def test_resharding_an_autoep_checkpoint_is_refused():
    from omoe_ds.checkpoint import CheckpointError
    from omoe_ds.checkpoint.reshard import check_target
    meta = {"layers": [{"name": "model.layers.0.mlp", "num_experts": 4, "ep_size": 2, "layout": "autoep-swiglu"}]}
    with pytest.raises(CheckpointError, match=r"meta: MoE layer 0 \(model.layers.0.mlp\) is a DeepSpeed AutoEP layer; "
                                              r"resharding AutoEP checkpoints is not supported yet"):
        check_target(meta, 1, 1, "meta")
