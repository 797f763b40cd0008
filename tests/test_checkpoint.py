"""Checkpoints: a run stopped at step k and resumed ends bit-identical to the uninterrupted run
(parameters, optimizer state, projectors, S, windows, counters), and every checkpoint that does not
fit the job is refused with one error naming the file, leaving the checkpoint untouched."""
import copy
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import omoe_ds
from omoe_ds.checkpoint.layout import (COMPLETE_MARKER, CheckpointError, expert_file, expert_name_parts,
                                       latest_complete_tag)
from omoe_ds.checkpoint.state import load_checkpoint, save_checkpoint
from omoe_ds.core.environment import free_local_port
from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec, make_task

import launching

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["before_o", "after_o", "zero0", "gas2"]


def launch(suite, out, ranks=2):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(free_local_port()), os.path.join(HERE, "ckpt_worker.py"), "--suite", suite, "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = launching.run(cmd, env=env, timeout=900, cwd=HERE)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    launch("save", out)
    launch("save1", out, ranks=1)
    for src, dst, ep in (("reshard_src_ep2", "reshard_dst_ep1", 1), ("reshard_src_ep1", "reshard_dst_ep2", 2)):
        proc = launching.run([sys.executable, "-m", "omoe_ds.reshard", "--src", str(out / src), "--dst", str(out / dst),
                              "--ep-size", str(ep), "--world-size", str(ep)], timeout=300, cwd=os.path.dirname(HERE))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    launch("resume", out)
    launch("resume1", out, ranks=1)
    return out


def differences(a, b, path=""):
    """Paths where two nested structures of tensors differ in any bit."""
    if isinstance(a, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [path]
    if isinstance(a, np.ndarray):  # numpy's RNG state
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "__dict__") and type(a) is type(b):  # DeepSpeed's loss scaler
        return differences(vars(a), vars(b), path)
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_resumed_run_is_bit_identical(runs, case):
    for rank in (0, 1):
        full = torch.load(runs / f"full_{case}.rank{rank}.pt", weights_only=False)
        resumed = torch.load(runs / f"resumed_{case}.rank{rank}.pt", weights_only=False)
        assert full["counters"] == [13, 2, 10]  # global steps, O steps done, last O step prepared
        assert full["projectors"] and full["optimizer"]
        assert differences(full, resumed) == [], case


@pytest.mark.distributed
def test_resume_is_not_trivially_equal(runs):
    """The comparison can fail: the state at k differs from the state at the end."""
    full = torch.load(runs / "full_after_o.rank0.pt", weights_only=False)
    saved = torch.load(runs / "ckpt_after_o" / "global_step6" / "omoe_proj_layer0_e0.pt")
    U = saved["x"]["factors"]  # factored storage: P = I − UUᵀ
    assert (torch.eye(len(U)) - U @ U.T - full["projectors"]["layer0.expert0.x"]).abs().max() > 1e-3


@pytest.mark.distributed
def test_saving_inside_an_accumulation_window_is_refused(runs):
    for rank in (0, 1):
        assert "inside a gradient-accumulation window" in (runs / f"mid_gas.rank{rank}.txt").read_text()
    assert not (runs / "ckpt_mid_gas").exists()


@pytest.mark.distributed
def test_topology_change_asks_for_reshard(runs, single_process_group, tmp_path):
    engine = build_engine()
    tag_dir = runs / "ckpt_after_o" / "global_step6"
    before = fingerprint(tag_dir)
    with pytest.raises(CheckpointError, match=r"saved on 2 ranks with ep_size \[2, 2\].*1 ranks.*omoe_ds.reshard"):
        load_checkpoint(engine, str(runs / "ckpt_after_o"))
    assert fingerprint(tag_dir) == before


def merged(out, name, key="params"):
    files = sorted(out.glob(f"{name}.rank*.pt"))
    assert files, name
    return {k: v for f in files for k, v in torch.load(f, weights_only=False)[key].items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.distributed
@pytest.mark.parametrize("source,target", [(2, 1), (1, 2)])
def test_resharded_run_continues_like_the_original(runs, source, target):
    """Saved at step 8 on one topology, moved, and run 11 more steps (O steps 10 and 15) on the other:
    it ends where the original run ends on its own ranks, AdamW moments and every group's settings included."""
    original, moved = f"reshard_cont_ep{source}", f"reshard_from_ep{source}_to_ep{target}"
    for key in ("params", "projectors"):
        assert max_diff(merged(runs, moved, key), merged(runs, original, key)) < 1e-6
    assert torch.load(next(runs.glob(f"{moved}.rank0.pt")), weights_only=False)["counters"] == [19, 3, 15]
    at_move = torch.load(runs / f"reshard_dst_ep{target}" / "global_step8" / "universal_layer0_e1.pt")
    name = next(n for n in at_move if n.endswith("0.weight"))
    assert max_diff({"w": merged(runs, original)["layer0.expert1.w1.weight"]}, {"w": at_move[name]["param"]}) > 1e-4


def plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.distributed
@pytest.mark.parametrize("source,target", [(2, 1), (1, 2)])
def test_resharded_optimizer_groups_keep_their_own_settings(runs, source, target):
    """Three dense groups of their own lr, weight decay (one of them 0) and betas, and the expert groups split off
    two of them (ckpt_worker.GROUPS): after the move, each target group has the settings of the source group that
    held its parameters, not the first group's, nor the placeholder settings the target was built with."""
    saved = {}
    for f in runs.glob(f"reshard_src_ep{source}_groups.rank*.pt"):
        for names, settings in torch.load(f, weights_only=False):
            saved.update({n: {k: plain(v) for k, v in settings.items()} for n in names})
    dense = {(s["lr"], s["weight_decay"]) for n, s in saved.items() if expert_name_parts(n) is None}
    assert len(dense) == 3 and len({lr for lr, _ in dense}) == 3 and len({wd for _, wd in dense}) == 3
    files = sorted(runs.glob(f"reshard_dst_ep{target}_groups.rank*.pt"))
    assert len(files) == target
    for f in files:
        record = torch.load(f, weights_only=False)
        assert len(record["after"]) == 5  # 3 dense groups, 2 expert groups
        for (names, settings), (names_before, placeholder) in zip(record["after"], record["before"]):
            assert names == names_before and names
            settings = {k: plain(v) for k, v in settings.items()}
            assert all(saved[n] == settings for n in names), (names[0], settings, saved[names[0]])
            assert plain(placeholder["lr"]) != settings["lr"] and plain(placeholder["betas"]) != settings["betas"]


@pytest.mark.distributed
@pytest.mark.parametrize("source", [2, 1])
def test_consolidated_state_equals_the_live_partitions(runs, source):
    """What reshard reassembles from DeepSpeed's files equals, bit for bit, the fp32 weights and Adam moments
    each rank held: in ZeRO-2 partitions on 2 ranks (read through the engine's live parameter links), or
    whole in the torch optimizer without ZeRO (the 1-rank source, continued under ZeRO-2 at EP=2)."""
    from omoe_ds.checkpoint.reshard import consolidate
    consolidated = consolidate(str(runs / f"reshard_src_ep{source}" / "global_step8"))["params"]
    fragments = {}
    for f in runs.glob(f"reshard_src_ep{source}_state.rank*.pt"):
        for name, pieces in torch.load(f, weights_only=False).items():
            fragments.setdefault(name, []).extend(pieces)
    assert fragments.keys() == consolidated.keys()
    for name, pieces in fragments.items():
        entry = consolidated[name]
        assert int(entry["state"]["step"]) == (8 if expert_name_parts(name) else 7)  # O step 5 moves experts only
        for key in ("param", "exp_avg", "exp_avg_sq"):
            full = entry["param"] if key == "param" else entry["state"][key]
            rebuilt = torch.full((full.numel(),), float("nan"))
            for offset, values in pieces:
                rebuilt[offset:offset + values[key].numel()] = values[key]
            assert torch.equal(rebuilt, full.flatten()), (name, key)


@pytest.mark.distributed
def test_reshard_refusals_leave_everything_untouched(runs, tmp_path):
    from omoe_ds.checkpoint.reshard import reshard
    src = runs / "reshard_src_ep2"
    before = fingerprint(src)
    with pytest.raises(CheckpointError, match=r"MoE layer 0 has 4 experts, which --ep-size=3 does not divide"):
        reshard(str(src), str(tmp_path / "a"), ep_size=3, world_size=3)
    with pytest.raises(CheckpointError, match=r"--ep-size=2 does not divide --world-size=3"):
        reshard(str(src), str(tmp_path / "a"), ep_size=2, world_size=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"--dst .*full is not empty"):
        reshard(str(src), str(tmp_path / "full"), ep_size=1, world_size=1)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    assert fingerprint(src) == before


# ---- one process: errors --------------------------------------------------------------------------
SPEC = SmallMoESpec(d_in=8, d_model=16, d_ff=24, num_layers=2, num_experts=4, num_classes=4, seq_len=6)


def build_engine(spec=SPEC, omoe=True, seed=0, **omoe_settings):
    torch.manual_seed(seed)
    model = SmallMoEClassifier(spec, ep_size=1)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 0}, "omoe": {"enabled": omoe, "skip_step": 2, **omoe_settings}}
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine asks for it; the launches below set their own
    try:
        engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                        config=config)
    finally:
        del os.environ["LOCAL_RANK"]
    x, y = make_task(spec, 64, seed=1)
    engine.train()
    for step in range(4):
        engine.backward(engine(x[step * 8:(step + 1) * 8], y[step * 8:(step + 1) * 8]))
        engine.step()
    return engine


def fingerprint(directory):
    digest = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            digest[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def saved(single_process_group, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    save_checkpoint(build_engine(), str(root / "omoe"))
    save_checkpoint(build_engine(omoe=False), str(root / "plain"))
    save_checkpoint(build_engine(lam=0.5, total_steps=20), str(root / "decay"))  # α decays over n = 20 steps
    return root


def copy_of(saved, tmp_path, which="omoe"):
    shutil.copytree(saved / which, tmp_path / which)
    return tmp_path / which


def test_one_process_round_trip_restores_every_omoe_tensor(saved, single_process_group):
    source = build_engine()
    engine = build_engine(seed=5)
    load_checkpoint(engine, str(saved / "omoe"))
    assert engine.global_steps == 4 and engine.omoe.o_steps_done == source.omoe.o_steps_done == 1
    assert differences(engine.omoe.projectors_by_global_id(), source.omoe.projectors_by_global_id()) == []
    assert differences(engine.omoe.S, source.omoe.S) == []
    assert differences([w.sums + [w.counts] for w in engine.omoe.windows],
                       [w.sums + [w.counts] for w in source.omoe.windows]) == []
    assert any(w.counts.sum() > 0 for w in engine.omoe.windows)  # step 2 was an O step, step 3 an R step that recorded


@pytest.mark.parametrize("mutation,match", [
    ("experts", r"omoe_meta.pt: MoE layer 0 .* has 4 experts in the checkpoint but 2 in this model"),
    ("architecture", r"omoe_meta.pt: .*dense parameters differ"),
    ("missing_expert_file", r"layer_1_expert_2_mp_rank_00_model_states.pt is missing"),
    ("truncated_file", r"omoe_proj_layer0_e1.pt has \d+ bytes but was written with \d+"),
    ("incomplete", r"global_step4 is incomplete: it has no omoe_complete.json"),
    ("no_omoe_state", r"holds no OMoE state .* omoe enabled"),
])
def test_checkpoints_that_do_not_fit_are_refused_untouched(saved, single_process_group, tmp_path, mutation, match):
    ckpt = copy_of(saved, tmp_path, "plain" if mutation == "no_omoe_state" else "omoe")
    tag_dir = ckpt / "global_step4"
    spec = SPEC
    if mutation == "experts":
        spec = SmallMoESpec(**{**SPEC.__dict__, "num_experts": 2})
    elif mutation == "architecture":
        spec = SmallMoESpec(**{**SPEC.__dict__, "num_classes": 5})
    elif mutation == "missing_expert_file":
        os.remove(tag_dir / expert_file(1, 2))
    elif mutation == "truncated_file":
        path = tag_dir / "omoe_proj_layer0_e1.pt"
        path.write_bytes(path.read_bytes()[:100])
    elif mutation == "incomplete":
        os.remove(tag_dir / COMPLETE_MARKER)
    engine = build_engine(spec)
    before = fingerprint(ckpt)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(engine, str(ckpt), tag="global_step4")
    assert fingerprint(ckpt) == before


def test_projectors_saved_with_per_matrix_keys_still_load(single_process_group, tmp_path):
    """Checkpoints written before projectors were keyed by input stream held dense P per expert file, named
    w1 (x) and w2 (h), and dense S in the meta."""
    save_checkpoint(build_engine(projector_storage="dense"), str(tmp_path / "old"))
    tag_dir = tmp_path / "old" / "global_step4"
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    for path in tag_dir.glob("omoe_proj_layer*_e*.pt"):
        P = torch.load(path)
        torch.save({"w1": P["x"], "w2": P["h"]}, path)
        marker["files"][path.name] = path.stat().st_size
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps(marker))
    engine = build_engine(seed=5)
    load_checkpoint(engine, str(tmp_path / "old"))
    assert {s["form"] for s in engine.omoe.storage_report()} == {"dense"}  # "auto" keeps the saved dense form
    assert differences(engine.omoe.projectors_by_global_id(),
                       build_engine(projector_storage="dense").omoe.projectors_by_global_id()) == []


# One fp32 P̄ entry formed either way: M·t ≤ 8 rank-1 terms of |u|² ≤ 1 each, a few ulps apart.
FORM_TOL = 1e-6


@pytest.mark.parametrize("saved_as,loaded_as", [("factored", "dense"), ("dense", "factored"), ("factored", "auto"),
                                               ("hybrid", "factored"), ("hybrid", "dense"), ("factored", "hybrid"),
                                               ("dense", "hybrid"), ("hybrid", "hybrid")])
def test_checkpoints_of_either_projector_form_load_into_either(single_process_group, tmp_path, saved_as, loaded_as):
    source = build_engine(projector_storage=saved_as)
    save_checkpoint(source, str(tmp_path / "ckpt"))
    engine = build_engine(seed=5, projector_storage=loaded_as)
    load_checkpoint(engine, str(tmp_path / "ckpt"))
    forms = {s["form"] for s in engine.omoe.storage_report()}
    assert forms == {"factored" if loaded_as == "auto" else loaded_as}
    want, got = source.omoe.projectors_by_global_id(), engine.omoe.projectors_by_global_id()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= FORM_TOL
    assert max((a - b).abs().max().item() for a, b in zip(sum(source.omoe.S, []), sum(engine.omoe.S, []))) <= FORM_TOL
    assert any((P - torch.eye(len(P))).abs().max() > 1e-3 for P in want.values())  # the projectors really moved


def test_latest_complete_tag_skips_a_save_that_died(saved, single_process_group, tmp_path):
    """DeepSpeed's `latest` names the new tag as soon as its files exist; the marker comes last."""
    ckpt = copy_of(saved, tmp_path)
    shutil.copytree(ckpt / "global_step4", ckpt / "global_step9")
    os.remove(ckpt / "global_step9" / COMPLETE_MARKER)
    (ckpt / "latest").write_text("global_step9")
    assert latest_complete_tag(str(ckpt)) == "global_step4"
    engine = build_engine(seed=7)
    load_checkpoint(engine, str(ckpt))
    assert engine.global_steps == 4


# ---- a resume that would change the math ---------------------------------------------------------
def engine_state(engine):
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "optimizer": copy.deepcopy(engine.optimizer.state_dict()),
            "S": [[S.clone() for S in per_w] for per_w in engine.omoe.S],
            "P": {k: P.clone() for k, P in engine.omoe.projectors_by_global_id().items()},
            "counters": [engine.global_steps, engine.omoe.o_steps_done, engine.omoe.prepared_step]}


@pytest.mark.parametrize("which,change,match", [
    ("omoe", {"skip_step": 3}, r"skip_step 2 saved, 3 now.*\"skip_step\": 2.*--skip-step 2"),
    ("omoe", {"alpha0": 0.25}, r"alpha0 1.0 saved, 0.25 now.*\"alpha0\": 1.0.*--alpha0 1.0"),
    ("omoe", {"loo_divisor": "M"}, r"loo_divisor 'M-1' saved, 'M' now.*\"loo_divisor\": \"M-1\""),
    ("omoe", {"lam": 0.5, "total_steps": 20}, r"lam 1.0 saved, 0.5 now.*--lam 1.0"),
    ("decay", {"lam": 0.5, "total_steps": 30}, r"total_steps 20 saved, 30 now.*\"total_steps\": 20"),
    ("omoe", {"skip_step": 4, "alpha0": 2.0}, r"skip_step 2 saved, 4 now; alpha0 1.0 saved, 2.0 now"),
])
def test_resume_with_another_omoe_section_is_refused_before_anything_loads(saved, single_process_group, tmp_path,
                                                                          which, change, match):
    """skip_step, alpha0, lam and loo_divisor change the math; so does total_steps (n in α0·λ^(i/n)) when λ < 1.
    The refusal names the old and new values and the setting to resume with, before any state is loaded."""
    ckpt = copy_of(saved, tmp_path, which)
    engine = build_engine(seed=3, **change)
    before, files = engine_state(engine), fingerprint(ckpt)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(engine, str(ckpt))
    assert fingerprint(ckpt) == files
    assert differences(engine_state(engine), before) == []


def test_resume_may_change_what_does_not_change_the_math(saved, single_process_group):
    """total_steps is free where λ = 1 (α stays α0); a checkpoint whose λ < 1 keeps it too (refused above)."""
    engine = build_engine(seed=3, total_steps=1000)  # the checkpoint: λ = 1, total_steps None
    load_checkpoint(engine, str(saved / "omoe"))
    assert engine.global_steps == 4 and engine.omoe.config.total_steps == 1000
    engine = build_engine(seed=3, lam=0.5, total_steps=20)
    load_checkpoint(engine, str(saved / "decay"))
    assert engine.global_steps == 4
    with pytest.raises(CheckpointError, match=r"total_steps 20 saved, 21 now"):
        load_checkpoint(build_engine(seed=3, lam=0.5, total_steps=21), str(saved / "decay"))


# ---- the deferred O step -------------------------------------------------------------------------
def test_deferred_o_step_round_trips_and_is_none_in_older_checkpoints(single_process_group, tmp_path):
    """An O step that fp16 overflow skipped (deferred_o_step) survives a checkpoint; a checkpoint written
    before the counter existed restores None."""
    source = build_engine()
    source.omoe.deferred_o_step = 4
    save_checkpoint(source, str(tmp_path / "ckpt"))
    engine = build_engine(seed=5)
    load_checkpoint(engine, str(tmp_path / "ckpt"))
    assert engine.omoe.deferred_o_step == 4
    tag_dir = tmp_path / "ckpt" / "global_step4"  # as an older omoe_ds wrote it: no such key
    meta = torch.load(tag_dir / "omoe_meta.pt", weights_only=False)
    del meta["omoe"]["deferred_o_step"]
    torch.save(meta, tag_dir / "omoe_meta.pt")
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    marker["files"]["omoe_meta.pt"] = os.path.getsize(tag_dir / "omoe_meta.pt")
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps(marker))
    engine.omoe.deferred_o_step = 7
    load_checkpoint(engine, str(tmp_path / "ckpt"))
    assert engine.omoe.deferred_o_step is None
