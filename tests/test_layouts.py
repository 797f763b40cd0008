"""Every expert layout (native FFN and SwiGLU, transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3) gets the whole of OMoE: one 1-rank and one 2-rank `deepspeed` launch of tests/layouts_worker.py."""
import glob
import json
import os
import sys

import pytest
import torch

from omoe_ds.core.environment import free_local_port

pytestmark = [pytest.mark.distributed, pytest.mark.layouts]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from layouts_worker import CASES, RESHARDED, STORAGE  # noqa: E402
import launching  # noqa: E402

# 21 steps of O(1) fp32 parameters on 1 rank vs 2 (other GEMM shapes, another reduction order): a few ulps per
# step, measured below 1e-6; a wrong exchange, window or projection moves them by ≫ 1e-4.
TOL = 1e-6
# A projected gradient against G̃·P̄ from the raw gradient: the gradient side is one fp32 product (n ≤ 25 terms);
# the token side sums δᵀ(X̃·P̄) over the T ≤ 96 routed rows instead of projecting autograd's δᵀX̃, another order
# of the same T·n products: (T + n)·2⁻²⁴ ≈ 7e-6 of the entries' absolute sums, which these small inputs keep
# within a few times the largest entry (measured ≤ 5e-7).
GRAD_TOL = 1e-5


def launch(num_ranks: int, out_dir, *extra) -> None:
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(num_ranks), "--master_port",
           str(free_local_port()), os.path.join(HERE, "layouts_worker.py"), "--out", str(out_dir), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = launching.run(cmd, env=env, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {world: tmp_path_factory.mktemp(f"layouts_w{world}") for world in (1, 2)}
    launch(2, out[2])
    launch(1, out[1], "--two-rank-out", str(out[2]))  # reshards the 2-rank Mixtral checkpoint for 1 rank
    return out


def merged(out, case, run="run"):
    files = sorted(glob.glob(os.path.join(out, f"{run}.{case}.rank*.pt")))
    assert files, f"no output for {case}"
    view = {"params": {}, "dense": {}, "projectors": {}}
    for f in files:
        record = torch.load(f)
        for part in view:
            view[part].update(record[part])
    return view


def reports(out, case):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, f"report.{case}.rank*.json")))]


@pytest.mark.parametrize("run", ["run", "run_gradient"])  # token side (21 steps), gradient side (11 steps)
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process(runs, case, run):
    one, two = merged(runs[1], case, run), merged(runs[2], case, run)
    for part in ("params", "dense", "projectors"):
        assert one[part].keys() == two[part].keys(), part
        diff = max((one[part][k] - two[part][k]).abs().max().item() for k in one[part])
        assert diff <= TOL, (part, diff)
    moved = max((one["projectors"][k] - torch.eye(len(one["projectors"][k]))).abs().max().item()
                for k in one["projectors"])
    assert moved > 1e-3  # the projectors really took windows


@pytest.mark.parametrize("case", CASES)
def test_layout_is_found_and_ran_omoe(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert report["layouts"] == [{"native_ffn": "deepspeed-ffn", "native_swiglu": "deepspeed-swiglu"}.get(
                case, "hf-fused")]
            assert report["o_steps_done"] == 4  # steps 5, 10, 15, 20
            assert report["storage"] == [STORAGE.get(case, "factored")]
            assert report["sides"] == ["token"] and report["gradient_run_sides"] == ["gradient"]  # forced sides held
            assert report["projector_streams"] == ["h", "x"]  # one projector per stream: gate and up share x's
            assert set(report["x_projectors_per_layer"]) == {2}  # P[L] holds one stack per stream, x and h


@pytest.mark.parametrize("case", CASES)
def test_window_equals_recomputation_from_top_k(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            window = report["window"]
            if not window:
                assert world == 2 and case.startswith("native_")  # EP = 2: checked at world 1
                continue
            assert all(window[k] for k in window if k.endswith("counts_equal"))
            assert all(window[k] > 0 for k in window if k.endswith("tokens"))
            assert max(v for k, v in window.items() if k.endswith((".x", ".h"))) <= 1.0, window


@pytest.mark.parametrize("case", CASES)
def test_o_step_gradient_is_raw_gradient_times_leave_one_out_projector(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            # both sides, against the same reference
            assert {k.split(":")[0] for k in report["o_step_gradient"]} == {"token", "gradient"}
            assert max(report["o_step_gradient"].values()) <= GRAD_TOL, report["o_step_gradient"]
            assert min(report["o_step_moved"].values()) > 1e-4  # the projection is not the identity


@pytest.mark.parametrize("case", CASES)
def test_resume_from_mid_window_checkpoint_is_bit_exact(runs, case):
    for world in (1, 2):
        for report in reports(runs[world], case):
            assert report["resume_keys_equal"] and report["resume_bit_exact"]


def test_fused_checkpoint_resharded_from_two_ranks_continues_like_one_process(runs):
    (report,) = reports(runs[1], RESHARDED)
    assert report["resharded_from_2_ranks_max_diff"] <= TOL


@pytest.mark.parametrize("case", CASES)
def test_diversity_goes_through_the_layout(runs, case):
    """Per layer and matrix, the parameter variance across experts equals a recomputation from the final
    parameters keyed by global expert id; 2 ranks (gathered) give the figures of 1 process."""
    one = merged(runs[1], case)["params"]
    for world in (1, 2):
        for report in reports(runs[world], case):
            for L, figures in enumerate(report["diversity"]["layers"]):
                names = sorted(k for k, v in figures.items() if isinstance(v, dict))
                assert names == (["w1", "w2"] if case == "native_ffn" else ["down", "gate", "up"])
                for name in names:
                    experts = sorted({int(k.split(".")[1][len("expert"):]) for k in one if k.startswith(f"layer{L}.")})
                    stacked = torch.stack([torch.cat([one[f"layer{L}.expert{g}.{name}.{part}"].double().reshape(-1)
                                                      for part in ("weight", "bias")
                                                      if f"layer{L}.expert{g}.{name}.{part}" in one])
                                           for g in experts])
                    expected = stacked.var(dim=0, unbiased=False).mean().item()
                    assert figures[name]["param_variance"] == pytest.approx(expected, rel=1e-5)
                assert figures["output_variance"] > 0
