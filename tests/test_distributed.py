"""Real ranks over gloo, launched through the deepspeed CLI: multi-rank results equal the
single-process reference (fp32), and the O step does exactly what the paper says.

The scenarios live in tests/dist_worker.py; each suite is one `deepspeed` launch.
"""
import glob
import json
import os
import sys

import pytest
import torch

from omoe_ds.core.environment import free_local_port

from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec
from omoe_ds.experts import expert_parameters_by_global_id, find_expert_layers
from omoe_ds.studies.diversity import expert_diversity

import launching

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))
# Parameters and projectors are O(1); 21 steps of fp32 GEMMs batched at other capacities under EP=2 differ by
# a few ulps (2^-24 ≈ 6e-8) per step: measured ≤ 2e-7, so 1e-6 admits reordering but not a wrong exchange.
TOL = 1e-6
GLOBAL_BATCH_TOKENS = 16 * 6  # dist_worker: GLOBAL_BATCH sequences of seq_len tokens


def launch(suite: str, num_ranks: int, out_dir) -> None:
    deepspeed_cli = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed_cli, "--num_gpus", str(num_ranks), "--master_port", str(free_local_port()),
           os.path.join(HERE, "dist_worker.py"), "--suite", suite, "--out", str(out_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = launching.run(cmd, env=env, timeout=900)
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


def test_r_step_forward_issues_no_omoe_collective(runs):
    """Counted at every deepspeed.comm entry point: an R-step forward runs DeepSpeed's own MoE collectives
    (capacity all-reduce, dispatch and combine all-to-all) and none of OMoE's; the O step's exchange is seen."""
    reports = load_json(runs, "r_step_forward_collectives")
    assert len(reports) == 2
    for report in reports:
        r_step, o_step = report["4"], report["5"]
        assert r_step["phase"] == "R" and o_step["phase"] == "O"
        assert r_step["omoe"] == []
        assert r_step["other"] and all(call.endswith("@sharded_moe.py") for call in r_step["other"])
        assert {"all_reduce", "all_gather_into_tensor"} <= set(o_step["omoe"])  # window sums, factors


def test_o_step_gradient_equals_dense_reference(runs):
    for per_rank in load_json(runs, "o_step_reference"):
        assert len(per_rank) == 2 * 2 * 2  # layers × local experts × weights
        for key, err in per_rank.items():
            assert not err["P_bar_is_identity"], key  # the check would be vacuous otherwise
            assert err["raw_vs_projected"] > 1e-3, key
            assert err["weight"] < TOL and err["bias"] < TOL, (key, err)


O_STEP_RUNS = [f"o_step_{base}_zero{stage}{'_bf16' if bf16 else ''}"
               for base in ("adamw", "rmsprop", "adagrad", "sgd", "ds_config") for stage in (0, 1, 2)
               for bf16 in (False, True) if not (base == "adagrad" and stage > 0)]


@pytest.mark.parametrize("run", O_STEP_RUNS)
def test_o_step_moves_only_experts_and_keeps_dense_optimizer_state(runs, run):
    """Paper A §III, "In O Step, only θ will be updated": dense parameters *and* every tensor and
    hyperparameter of their optimizer state (moments, step counts, fp32 master copies) keep their bits."""
    for per_rank in load_json(runs, run):
        assert per_rank["o_step_ran"]
        assert per_rank["expert_max_change"] > 1e-4
        assert per_rank["num_dense"] > 0 and per_rank["dense_changed"] == []
        assert per_rank["num_state_entries"] > 0  # five R steps made state: the comparison is not vacuous
        assert per_rank["state_keys_equal"] and per_rank["state_changed"] == []
        assert per_rank["all_trainable_again"]
        if "next_r_step_differs" in per_rank:  # torch optimizers without ZeRO/bf16 wrappers
            assert per_rank["next_r_step_differs"] == []


def test_sgd_o_step_is_the_closed_form(runs):
    """ΔW̃_m = −lr·G̃_m·P̄_m, at M = 2 and M = 4, against P̄_m from the dense projectors."""
    for M in (2, 4):
        (report,) = load_json(runs, f"sgd_closed_form_M{M}")
        assert len(report["closed_form"]) == 2 * M * 2
        for key, r in report["closed_form"].items():
            assert r["change"] > 1e-4, key
            assert r["err"] <= r["bound"], (M, key, r)


def test_two_experts_damp_each_others_window_mean_exactly(runs):
    """M = 2 after the first update: ‖ΔW̃_m x̃̄_j‖ = lr·‖G̃_m x̃̄_j‖·α/(α + ‖x̃̄_j‖²)."""
    (report,) = load_json(runs, "sgd_closed_form_M2")
    assert len(report["damping"]) == 2 * 2 * 2
    for key, r in report["damping"].items():
        assert r["damping"] < 0.9, key  # a real damping, not the identity
        assert abs(r["ratio"] - r["damping"]) <= r["bound"] * r["damping"] + 1e-6, (key, r)


@pytest.mark.parametrize("run", ["clip_norm_zero1", "clip_norm_zero2", "clip_norm_zero2_bf16", "clip_norm_zero0_bf16"])
def test_o_step_clipping_norm_counts_projected_expert_gradients_only(runs, run):
    (norms,) = load_json(runs, run)
    # The engine's norm sums squares in fp32 (bf16 gradients cast exactly): ~1e-6 relative.
    assert abs(norms["5"]["engine"] - norms["5"]["experts"]) <= 1e-5 * norms["5"]["experts"]
    for step in ("0", "1", "2", "3", "4"):  # R steps count the dense gradients too: the check can fail
        assert norms[step]["engine"] > 1.5 * norms[step]["experts"]


def test_overflow_skipped_o_step_is_deferred_not_counted(runs):
    (report,) = load_json(runs, "overflow_deferral")
    bad, clean = report["injected"], report["clean"]
    assert bad["skipped_steps"] == 1 and clean["skipped_steps"] == 0
    assert bad["deferred"] == 5 and bad["o_steps_done_after_5"] == 0 and bad["changed_at_5"] == []
    assert bad["all_trainable_after_5"]
    assert bad["phase_at_6"] == "O" and bad["prepared_after_6"] == 5 and bad["projectors_kept_at_6"]
    assert bad["o_steps_done_after_6"] == 1 and bad["deferred_after_6"] is None
    assert bad["dense_changed_at_6"] == [] and bad["experts_changed_at_6"] == 2 * 4 * 4
    assert bad["projectors_at_5_equal_clean_run"]
    assert bad["prepared_after_10"] == 10 and bad["o_steps_done_after_10"] == 2
    assert clean["phase_at_6"] == "R" and clean["o_steps_done_after_5"] == 1 and clean["dense_changed_at_6"]


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
    layers = find_expert_layers(model)
    params = expert_parameters_by_global_id(layers)
    assert params.keys() == {k for k in run["params"] if k.startswith("layer")}
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(run["params"][key])
    reference = figures(expert_diversity(layers, inputs=run["ranks"][0]["inputs"]))
    assert reference.keys() == rank0.keys() and len(rank0) == 3 + 2 * 5
    # Output variances come from fp32 expert forwards (~1e-6 relative); the weight figures are counts and fp64 sums.
    assert all(rank0[k] == pytest.approx(reference[k], rel=1e-6 if "output_variance" in k else 1e-12)
               for k in reference), (rank0, reference)
    assert 0 < reference["overall.percent_differing"] < 100 and reference["overall.output_variance"] > 0
