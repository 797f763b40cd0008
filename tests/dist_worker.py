"""Distributed scenarios for tests/test_distributed.py, run through the deepspeed CLI:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29620 tests/dist_worker.py --suite world2 --out /tmp/d

Each scenario trains the small MoE classifier on the same global batches and saves, per rank, its
parameters and projectors keyed by global expert id; the tests compare the files.
"""
import argparse
import dataclasses
import json
import os

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.moe.utils import is_moe_param

import omoe_ds
from omoe_ds.diversity import expert_diversity
from omoe_ds.moe_layers import expert_parameters_by_global_id, find_moe_layers
from omoe_ds.small_job import micro_batches, model_dtype, train
from omoe_ds.small_moe import SmallMoEClassifier, SmallMoESpec, make_task

SPEC = SmallMoESpec(d_in=8, d_model=16, d_ff=24, num_layers=2, num_experts=4, num_classes=4, seq_len=6)
STEPS = 21          # O steps at 5, 10, 15 and 20
GLOBAL_BATCH = 16
X, Y = make_task(SPEC, 1024, seed=0)
BASES = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
         "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
         "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
         "sgd": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9)}


def ds_config(stage=0, gas=1, optimizer=None, bf16=False, **omoe):
    world = dist.get_world_size()
    config = {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": gas,
              "train_micro_batch_size_per_gpu": GLOBAL_BATCH // gas // world, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage},
              "omoe": {"skip_step": 5, "alpha0": 0.5, "lam": 0.5, "total_steps": STEPS, **omoe}}
    if optimizer:
        config["optimizer"] = optimizer
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def build(ep_size, base="adamw", **config):
    torch.manual_seed(0)
    model = SmallMoEClassifier(SPEC, ep_size=ep_size)
    optimizer = BASES[base](model.parameters()) if base else None
    engine, *_ = omoe_ds.initialize(model=model, optimizer=optimizer, config=ds_config(**config))
    return engine


def state_by_global_id(engine):
    layers = find_moe_layers(engine.module)
    state = {k: p.detach().clone() for k, p in expert_parameters_by_global_id(layers).items()}
    state.update({n: p.detach().clone() for n, p in engine.module.named_parameters() if not is_moe_param(p)})
    return state


def save(out, name, engine, **extra):
    record = {"params": state_by_global_id(engine), **extra}
    if engine.omoe is not None:
        record["projectors"] = {k: P.clone() for k, P in engine.omoe.projectors_by_global_id().items()}
        record["S"] = {f"layer{L}.w{w + 1}": S.clone() for L, per_w in enumerate(engine.omoe.S) for w, S in enumerate(per_w)}
    torch.save(record, os.path.join(out, f"{name}.rank{dist.get_rank()}.pt"))


def train_run(out, name, ep_size, steps=STEPS, base="sgd", **config):
    """Equality runs use SGD+momentum: Adam's per-element normalisation turns last-bit differences in
    near-zero gradient entries (GEMMs batched at another capacity under EP=2) into lr-sized ones."""
    engine = build(ep_size, base=base, **config)
    train(engine, X, Y, steps, GLOBAL_BATCH)
    save(out, name, engine)


def o_step_reference(out):
    """At an O step, the gradient the hooks hand on equals G·P̄_m, P̄_m from all-gathered dense projectors."""
    engine = build(ep_size=2)
    train(engine, X, Y, 5, GLOBAL_BATCH)
    xb, yb = next(micro_batches(X, Y, 5, GLOBAL_BATCH, 1))
    engine(xb, yb)  # the first O-step forward updates and exchanges the projectors
    omoe, model = engine.omoe, engine.module
    params = expert_parameters_by_global_id(omoe.layers)
    keys = sorted(params)

    def grads(phase):
        omoe.phase = phase  # "off": hooks idle and nothing recorded; "O": hooks project
        loss = F.cross_entropy(model.logits(xb), yb)
        return dict(zip(keys, torch.autograd.grad(loss, [params[k] for k in keys])))

    raw, projected = grads("off"), grads("O")
    errors = {}
    for L, layer in enumerate(omoe.layers):
        for w in range(2):
            local = torch.stack([omoe.P[L][l][w] for l in range(layer.num_local_experts)])
            every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            torch.distributed.all_gather(every, local)  # the dense reference the exchange avoids
            P_all = torch.cat(every)
            for l in range(layer.num_local_experts):
                g = omoe.global_expert_id(L, l)
                P_bar = (P_all.sum(0) - P_all[g]) / (layer.num_experts - 1)
                key = f"layer{L}.expert{g}.w{w + 1}"
                ref_w, ref_b = omoe_ds.projector.project_augmented_grad(raw[key + ".weight"], raw[key + ".bias"], P_bar)
                scale = max(ref_w.abs().max().item(), ref_b.abs().max().item(), 1e-30)
                errors[key] = {"weight": (projected[key + ".weight"] - ref_w).abs().max().item() / scale,
                               "bias": (projected[key + ".bias"] - ref_b).abs().max().item() / scale,
                               "raw_vs_projected": (projected[key + ".weight"] - raw[key + ".weight"]).abs().max().item() / scale,
                               "P_bar_is_identity": bool(torch.allclose(P_bar, torch.eye(P_bar.shape[0])))}
    _write_json(out, "o_step_reference", errors)


def o_step_moves_only_experts(out, name, base, stage=0, optimizer=None, bf16=False):
    """One O step (step 5) with each base optimizer: experts move, dense parameters keep their bits."""
    engine = build(ep_size=2, base=base, stage=stage, optimizer=optimizer, bf16=bf16)
    train(engine, X, Y, 5, GLOBAL_BATCH)
    before = state_by_global_id(engine)
    for xb, yb in micro_batches(X, Y, 5, GLOBAL_BATCH, engine.gradient_accumulation_steps()):
        engine.backward(engine(xb.to(model_dtype(engine)), yb))
        engine.step()
    after = state_by_global_id(engine)
    expert = [k for k in before if k.startswith("layer")]
    dense = [k for k in before if not k.startswith("layer")]
    _write_json(out, name, {
        "o_step_ran": engine.omoe.prepared_step == 5,
        "expert_max_change": max((after[k] - before[k]).abs().max().item() for k in expert),
        "dense_changed": [k for k in dense if not torch.equal(before[k], after[k])],
        "num_dense": len(dense)})


def capture_reference(out):
    """The recorded window equals per-expert sums of routed tokens and their hidden activations,
    recomputed here from the gate's argmax; the first O step's projectors are I − uuᵀ from them."""
    engine = build(ep_size=1)
    omoe = engine.omoe
    ref = [{"sums": [torch.zeros(4, SPEC.d_model, dtype=torch.float64), torch.zeros(4, SPEC.d_ff, dtype=torch.float64)],
            "counts": torch.zeros(4, dtype=torch.float64)} for _ in omoe.layers]

    def record(L):
        def hook(moe, args):
            if omoe.phase != "R" or not moe.training:
                return
            x = args[0].detach().reshape(-1, SPEC.d_model)
            expert = (x @ moe.deepspeed_moe.gate.wg.weight.T).argmax(-1)
            for e in range(4):
                w1, w2 = omoe.layers[L].local_experts[e]
                xe = x[expert == e]
                ref[L]["sums"][0][e] += xe.double().sum(0)
                ref[L]["sums"][1][e] += F.gelu(F.linear(xe, w1.weight, w1.bias)).detach().double().sum(0)
                ref[L]["counts"][e] += len(xe)
        return hook

    for L, layer in enumerate(omoe.layers):
        layer.module.register_forward_pre_hook(record(L))
    train(engine, X, Y, 5, GLOBAL_BATCH)
    report = {"window": {}, "projector": {}}
    for L, window in enumerate(omoe.windows):
        for w in range(2):
            report["window"][f"layer{L}.w{w + 1}"] = ((window.sums[w] - ref[L]["sums"][w]).abs().max()
                                                     / ref[L]["sums"][w].abs().max()).item()
        report["window"][f"layer{L}.counts_equal"] = bool(torch.equal(window.counts, ref[L]["counts"]))
        report["window"][f"layer{L}.tokens"] = float(ref[L]["counts"].sum())
    xb, yb = next(micro_batches(X, Y, 5, GLOBAL_BATCH, 1))
    engine(xb, yb)  # step 5 is the first O step: the forward closes the window
    alpha = omoe_ds.projector.alpha_at(5, 0.5, 0.5, STEPS)
    for L, layer in enumerate(omoe.layers):
        for e in range(4):
            for w, linear in enumerate(layer.local_experts[e]):
                x_mean = torch.cat([(ref[L]["sums"][w][e] / ref[L]["counts"][e]).float(), torch.ones(1)])
                P_ref = torch.eye(len(x_mean)) - torch.outer(x_mean, x_mean) / (alpha + x_mean @ x_mean)
                report["projector"][f"layer{L}.expert{e}.w{w + 1}"] = (omoe.P[L][e][w] - P_ref).abs().max().item()
    _write_json(out, "capture_reference", report)


def diversity_sharded(out):
    """expert_diversity with experts on 2 ranks, after a few steps made them differ; each rank offers other
    tokens (rank 0's must be used) and slices are small, so several gathers run per weight."""
    engine = build(ep_size=2)
    train(engine, X, Y, 3, GLOBAL_BATCH)
    layers = find_moe_layers(engine.module)
    g = torch.Generator().manual_seed(dist.get_rank())
    inputs = [torch.randn(10 + dist.get_rank(), SPEC.d_model, generator=g) for _ in layers]
    save(out, "diversity_ep2", engine, diversity=expert_diversity(layers, inputs=inputs, chunk=50), inputs=inputs,
         spec=dataclasses.asdict(SPEC))


def _write_json(out, name, payload):
    with open(os.path.join(out, f"{name}.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(payload, f, indent=1)


SUITES = {
    "world1": lambda out: [
        train_run(out, "ref_ep1", ep_size=1),
        train_run(out, "ref_ep1_gas2", ep_size=1, gas=2),
        capture_reference(out),
    ],
    "world2": lambda out: [
        train_run(out, "ep2_zero0", ep_size=2, stage=0),
        train_run(out, "ep2_zero1", ep_size=2, stage=1),
        train_run(out, "ep2_zero2", ep_size=2, stage=2),
        train_run(out, "ep2_zero2_gas2", ep_size=2, stage=2, gas=2),
        train_run(out, "ep1_replicas", ep_size=1, stage=0),
        o_step_reference(out),
        diversity_sharded(out),
        *[o_step_moves_only_experts(out, f"o_step_{base}", base) for base in BASES],
        o_step_moves_only_experts(out, "o_step_adamw_zero2", "adamw", stage=2),
        o_step_moves_only_experts(out, "o_step_adamw_zero2_bf16", "adamw", stage=2, bf16=True),
        o_step_moves_only_experts(out, "o_step_ds_config_optimizer", None,
                                  optimizer={"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}),
    ],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    SUITES[args.suite](args.out)
