"""Real ranks over gloo, launched through the deepspeed CLI: multi-rank results equal the
single-process reference (fp32), and the O step does exactly what the paper says.

The scenarios live in tests/dist_worker.py; each suite is one `deepspeed` launch.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from omoe_ds.collectives import free_local_port

from omoe_ds.diversity import expert_diversity
from omoe_ds.moe_layers import expert_parameters_by_global_id, find_moe_layers
from omoe_ds.small_moe import SmallMoEClassifier, SmallMoESpec

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-6
GLOBAL_BATCH_TOKENS = 16 * 6  # dist_worker: GLOBAL_BATCH sequences of seq_len tokens


def launch(suite: str, num_ranks: int, out_dir) -> None:
    deepspeed_cli = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed_cli, "--num_gpus", str(num_ranks), "--master_port", str(free_local_port()),
           os.path.join(HERE, "dist_worker.py"), "--suite", suite, "--out", str(out_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch("world1", 1, out)
    launch("world2", 2, out)
    return out


def load(out, name):
    """Merge the per-rank files of a run into one view keyed by global expert id."""
    files = sorted(glob.glob(os.path.join(out, f"{name}.rank*.pt")))
    assert files, f"no output for {name}"
    merged = {"params": {}, "projectors": {}, "S": [], "ranks": []}
    for f in files:
        record = torch.load(f)
        merged["ranks"].append(record)
        merged["params"].update(record["params"])
        merged["projectors"].update(record.get("projectors", {}))
        merged["S"].append(record.get("S"))
    return merged


def load_json(out, name):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, f"{name}.rank*.json")))]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_reference_run_really_used_omoe(runs):
    ref = load(runs, "ref_ep1")
    assert len(ref["projectors"]) == 2 * 4 * 2  # layers × experts × weights
    for key, P in ref["projectors"].items():
        assert (P - torch.eye(P.shape[0])).abs().max() > 1e-2, f"{key} was never updated"


@pytest.mark.parametrize("run", ["ep2_zero0", "ep2_zero1", "ep2_zero2", "ep2_zero2_gas2"])
def test_expert_parallel_equals_single_process(runs, run):
    """2 ranks at EP=2 (ZeRO 0/1/2, with and without accumulation) end where 1 process at EP=1 does."""
    ref, got = load(runs, "ref_ep1"), load(runs, run)
    assert max_diff(got["params"], ref["params"]) < TOL
    assert max_diff(got["projectors"], ref["projectors"]) < TOL


def test_zero_stages_agree_with_each_other(runs):
    zero0 = load(runs, "ep2_zero0")
    for stage in (1, 2):
        other = load(runs, f"ep2_zero{stage}")
        assert max_diff(other["params"], zero0["params"]) < TOL
        assert max_diff(other["projectors"], zero0["projectors"]) < TOL


def test_gradient_accumulation_equals_one_big_micro_batch(runs):
    one, two = load(runs, "ref_ep1"), load(runs, "ref_ep1_gas2")
    assert max_diff(two["params"], one["params"]) < TOL
    assert max_diff(two["projectors"], one["projectors"]) < TOL


def test_running_sum_S_is_bit_identical_on_every_rank(runs):
    for name in ("ep2_zero0", "ep2_zero2"):
        S0, S1 = load(runs, name)["S"]
        for key in S0:
            assert torch.equal(S0[key], S1[key]), key


def test_replicas_hold_identical_projectors(runs):
    """World 2 at EP=1: both ranks replicate every expert and must keep the same projectors."""
    rank0, rank1 = load(runs, "ep1_replicas")["ranks"]
    assert rank0["projectors"].keys() == rank1["projectors"].keys()
    for key in rank0["projectors"]:
        assert torch.equal(rank0["projectors"][key], rank1["projectors"][key]), key
    assert max_diff(load(runs, "ep1_replicas")["projectors"], load(runs, "ref_ep1")["projectors"]) < TOL


def test_input_capture_matches_independent_reference(runs):
    (report,) = load_json(runs, "capture_reference")
    for key, value in report["window"].items():
        if key.endswith("counts_equal"):
            assert value, key
        elif key.endswith("tokens"):
            assert value == 5 * GLOBAL_BATCH_TOKENS, key  # every token of the 5 R steps, nothing else
        else:
            assert value < TOL, key
    assert len(report["projector"]) == 2 * 4 * 2
    assert max(report["projector"].values()) < TOL


def test_o_step_gradient_equals_dense_reference(runs):
    for per_rank in load_json(runs, "o_step_reference"):
        assert len(per_rank) == 2 * 2 * 2  # layers × local experts × weights
        for key, err in per_rank.items():
            assert not err["P_bar_is_identity"], key  # the check would be vacuous otherwise
            assert err["raw_vs_projected"] > 1e-3, key
            assert err["weight"] < TOL and err["bias"] < TOL, (key, err)


@pytest.mark.parametrize("run", ["o_step_adamw", "o_step_rmsprop", "o_step_adagrad", "o_step_sgd",
                                 "o_step_adamw_zero2", "o_step_adamw_zero2_bf16", "o_step_ds_config_optimizer"])
def test_o_step_moves_experts_and_keeps_dense_bits(runs, run):
    for per_rank in load_json(runs, run):
        assert per_rank["o_step_ran"]
        assert per_rank["expert_max_change"] > 1e-4
        assert per_rank["num_dense"] > 0 and per_rank["dense_changed"] == []


def figures(result: dict) -> dict:
    """The scalar figures of an expert_diversity result, keyed by where they sit."""
    flat = {f"overall.{k}": v for k, v in result["overall"].items() if not isinstance(v, dict)}
    for L, layer in enumerate(result["layers"]):
        flat[f"layer{L}.output_variance"] = layer["output_variance"]
        for w in ("w1", "w2"):
            flat.update({f"layer{L}.{w}.{k}": v for k, v in layer[w].items()})
    return flat


def test_sharded_diversity_equals_single_process_on_gathered_weights(runs):
    """Experts on 2 ranks, gathered slice by slice, give the figures one process computes from all weights."""
    run = load(runs, "diversity_ep2")
    rank0, rank1 = (figures(r["diversity"]) for r in run["ranks"])
    assert rank0 == rank1  # every rank reports the same figures
    model = SmallMoEClassifier(SmallMoESpec(**run["ranks"][0]["spec"]), ep_size=1)
    layers = find_moe_layers(model)
    params = expert_parameters_by_global_id(layers)
    assert params.keys() == {k for k in run["params"] if k.startswith("layer")}
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(run["params"][key])
    reference = figures(expert_diversity(layers, inputs=run["ranks"][0]["inputs"]))
    assert reference.keys() == rank0.keys() and len(rank0) == 3 + 2 * 5
    assert all(abs(rank0[k] - reference[k]) < TOL for k in reference), (rank0, reference)
    assert 0 < reference["overall.percent_differing"] < 100 and reference["overall.output_variance"] > 0
