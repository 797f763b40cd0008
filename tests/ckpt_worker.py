"""Checkpoint scenarios for tests/test_checkpoint.py, run through the deepspeed CLI:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29630 tests/ckpt_worker.py --suite save --out /tmp/c

`save` trains uninterrupted runs and runs stopped (saved) at step k; `resume` starts fresh engines
from those checkpoints and finishes them. `save`/`save1` also save at RESHARD_AT on 2 ranks at EP=2
and on 1 rank, and go on; `python -m omoe_ds.reshard` moves each to the other topology, where
`resume`/`resume1` continue them. Every run dumps, per rank, its parameters, projectors, S,
windows and full optimizer state, so the test compares them bit for bit. The resharded runs use AdamW
with three dense groups of their own lr, weight decay and betas (GROUPS; experts split off into groups
of their own by omoe_ds.initialize), and the targets are built with other settings (PLACEHOLDER), so that
only the checkpoint can give each group its own.
"""
import argparse
import os

import deepspeed
import deepspeed.comm as dist
import torch

import omoe_ds
from dist_worker import GLOBAL_BATCH, SPEC, X, Y, build, ds_config, save
from omoe_ds.checkpoint.layout import CheckpointError
from omoe_ds.core import collectives
from omoe_ds.checkpoint.state import load_checkpoint, save_checkpoint
from omoe_ds.finetune.small_job import micro_batches
from omoe_ds.finetune.small_moe import SmallMoEClassifier

STEPS = 13  # O steps at 5 and 10
RESHARD_AT, RESHARD_END = 8, 19  # 11 more steps after the move, O steps at 10 and 15
CASES = {  # name: (ZeRO stage, gradient accumulation, stop step k)
    "before_o": (2, 1, 5),   # the next step is an O step: the window is full and not yet closed
    "after_o": (2, 1, 6),    # step 5 (an O step) has just run
    "zero0": (0, 1, 8),
    "gas2": (2, 2, 6),
}


# Three dense groups (and the expert groups split off each): lr, weight decay, betas of their own.
GROUPS = [  # (parameter names starting with, settings)
    (("embed.", "moes.0."), {"lr": 1e-2, "weight_decay": 0.01}),           # with MoE layer 0: gate, experts
    (("norms.",), {"lr": 3e-3, "weight_decay": 0.0}),                      # a no-decay group
    (("head.", "moes.1."), {"lr": 2e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}),  # with MoE layer 1
]
PLACEHOLDER = {"lr": 0.5, "weight_decay": 0.3, "betas": (0.5, 0.5)}  # a target's settings before the load
SETTING_KEYS = ("lr", "weight_decay", "betas", "eps", "amsgrad")


def build_grouped(ep_size, stage, placeholder=False):
    torch.manual_seed(0)
    model = SmallMoEClassifier(SPEC, ep_size=ep_size)
    named = list(model.named_parameters())
    assert all(sum(n.startswith(prefixes) for prefixes, _ in GROUPS) == 1 for n, _ in named)
    groups = [{"params": [p for n, p in named if n.startswith(prefixes)], **(PLACEHOLDER if placeholder else settings)}
              for prefixes, settings in GROUPS]
    engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=ds_config(stage=stage))
    return engine


def group_settings(engine) -> list:
    """[(global names of the group's parameters, its settings)] for each group of the torch optimizer."""
    from omoe_ds.checkpoint.layout import global_parameter_names
    names = global_parameter_names(engine.module, engine.omoe.layers)
    opt = engine.optimizer
    inner, model_groups = (opt.optimizer, opt.bit16_groups) if hasattr(opt, "bit16_groups") else \
        (opt, [g["params"] for g in opt.param_groups])
    return [([names[id(p)] for p in params], {k: group[k] for k in SETTING_KEYS})
            for group, params in zip(inner.param_groups, model_groups)]


def run_steps(engine, until: int) -> None:
    gas = engine.gradient_accumulation_steps()
    engine.train()
    while engine.global_steps < until:
        for xb, yb in micro_batches(X, Y, engine.global_steps, GLOBAL_BATCH, gas):
            engine.backward(engine(xb, yb))
            engine.step()


def dump(out, name, engine):
    omoe = engine.omoe
    windows = [[*w.sums, w.counts] for w in omoe.windows]
    save(out, name, engine, optimizer=engine.optimizer.state_dict(), windows=windows,
         counters=[engine.global_steps, omoe.o_steps_done, omoe.prepared_step])


def live_fragments(engine) -> dict:
    """{global name: [(offset in the parameter, {"param", "exp_avg", "exp_avg_sq"})]}: this rank's ZeRO slices,
    read through the engine's live parameter→partition links (not through the files), or whole tensors."""
    from omoe_ds.checkpoint.layout import global_parameter_names
    names = global_parameter_names(engine.module, engine.omoe.layers)
    opt = engine.optimizer
    out = {}
    if not hasattr(opt, "bit16_groups"):  # no ZeRO: the torch optimizer holds whole tensors
        return {names[id(p)]: [(0, {"param": p.detach().clone().flatten(),
                                    **{k: opt.state[p][k].clone().flatten() for k in ("exp_avg", "exp_avg_sq")}})]
                for g in opt.param_groups for p in g["params"]}
    for i, group in enumerate(opt.bit16_groups):
        state = opt.optimizer.state[opt.single_partition_of_fp32_groups[i]]
        for p in group:
            m = p._hp_mapping
            if m is None:
                continue
            hp = m.hp_fragment_address
            out[names[id(p)]] = [(m.lp_fragment_address.start, {
                "param": m.hp_fragment.clone(),
                **{k: state[k].narrow(0, hp.start, hp.numel).clone() for k in ("exp_avg", "exp_avg_sq")}})]
    return out


def reshard_source(out, ep_size, stage):
    """Train to RESHARD_AT, save, record the live optimizer state, and go on on these ranks."""
    engine = build_grouped(ep_size, stage)
    run_steps(engine, RESHARD_AT)
    save_checkpoint(engine, os.path.join(out, f"reshard_src_ep{ep_size}"))
    torch.save(live_fragments(engine), os.path.join(out, f"reshard_src_ep{ep_size}_state.rank{dist.get_rank()}.pt"))
    torch.save(group_settings(engine), os.path.join(out, f"reshard_src_ep{ep_size}_groups.rank{dist.get_rank()}.pt"))
    run_steps(engine, RESHARD_END)
    dump(out, f"reshard_cont_ep{ep_size}", engine)


def reshard_target(out, ep_size, source_ep):
    engine = build_grouped(ep_size, stage=2, placeholder=True)
    before = group_settings(engine)
    load_checkpoint(engine, os.path.join(out, f"reshard_dst_ep{ep_size}"))
    assert engine.global_steps == RESHARD_AT
    torch.save({"before": before, "after": group_settings(engine)},
               os.path.join(out, f"reshard_dst_ep{ep_size}_groups.rank{dist.get_rank()}.pt"))
    run_steps(engine, RESHARD_END)
    dump(out, f"reshard_from_ep{source_ep}_to_ep{ep_size}", engine)


def suite_save(out):
    for name, (stage, gas, k) in CASES.items():
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        run_steps(engine, STEPS)
        dump(out, f"full_{name}", engine)
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        run_steps(engine, k)
        save_checkpoint(engine, os.path.join(out, f"ckpt_{name}"))
    # inside an accumulation window: refused, nothing written
    engine = build(ep_size=2, base="adamw", stage=2, gas=2)
    xb, yb = next(micro_batches(X, Y, 0, GLOBAL_BATCH, 2))
    engine.backward(engine(xb, yb))
    engine.step()
    try:
        save_checkpoint(engine, os.path.join(out, "ckpt_mid_gas"))
        message = "no error"
    except CheckpointError as e:
        message = str(e)
    with open(os.path.join(out, f"mid_gas.rank{dist.get_rank()}.txt"), "w") as f:
        f.write(message)


def suite_resume(out):
    for name, (stage, gas, k) in CASES.items():
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        load_checkpoint(engine, os.path.join(out, f"ckpt_{name}"))
        assert engine.global_steps == k, (name, engine.global_steps, k)
        run_steps(engine, STEPS)
        dump(out, f"resumed_{name}", engine)


SUITES = {  # world 2: save, resume; world 1: save1, resume1 (the reshard CLI runs in between)
    "save": lambda out: [suite_save(out), reshard_source(out, 2, stage=2)],
    "save1": lambda out: reshard_source(out, 1, stage=0),  # resharded into ZeRO-2 at EP=2
    "resume": lambda out: [suite_resume(out), reshard_target(out, 2, source_ep=1)],
    "resume1": lambda out: reshard_target(out, 1, source_ep=2),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    SUITES[args.suite](args.out)
    collectives.shutdown()
