"""Distributed scenarios for tests/test_distributed.py, run through the deepspeed CLI:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29620 tests/dist_worker.py --suite world2 --out /tmp/d

Each scenario trains the small MoE classifier on the same global batches and saves, per rank, its
parameters and projectors keyed by global expert id; the tests compare the files.
"""
import argparse
import copy
import dataclasses
import json
import os

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.moe.utils import is_moe_param

import omoe_ds
from omoe_ds.core import collectives
from omoe_ds.core.optimizer_groups import innermost_optimizer
from omoe_ds.finetune.small_job import micro_batches, model_dtype, train
from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec, make_task
from omoe_ds.experts import expert_parameters_by_global_id, find_expert_layers
from omoe_ds.studies.diversity import expert_diversity

SPEC = SmallMoESpec(d_in=8, d_model=16, d_ff=24, num_layers=2, num_experts=4, num_classes=4, seq_len=6)
STEPS = 21          # O steps at 5, 10, 15 and 20
GLOBAL_BATCH = 16
X, Y = make_task(SPEC, 1024, seed=0)
BASES = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
         "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
         "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
         "sgd": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9)}
DS_CONFIG_ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}


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
    layers = find_expert_layers(engine.module)
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
            local = torch.stack([omoe.P[L][w][l] for l in range(layer.num_local_experts)])
            every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            torch.distributed.all_gather(every, local)  # the dense reference the exchange avoids
            P_all = torch.cat(every)
            for l in range(layer.num_local_experts):
                g = omoe.global_expert_id(L, l)
                P_bar = (P_all.sum(0) - P_all[g]) / (layer.num_experts - 1)
                key = f"layer{L}.expert{g}.w{w + 1}"
                ref_w, ref_b = omoe_ds.core.projector.project_augmented_grad(raw[key + ".weight"], raw[key + ".bias"],
                                                                             P_bar)
                scale = max(ref_w.abs().max().item(), ref_b.abs().max().item(), 1e-30)
                errors[key] = {"weight": (projected[key + ".weight"] - ref_w).abs().max().item() / scale,
                               "bias": (projected[key + ".bias"] - ref_b).abs().max().item() / scale,
                               "raw_vs_projected": (projected[key + ".weight"] - raw[key + ".weight"]).abs().max().item() / scale,
                               "P_bar_is_identity": bool(torch.allclose(P_bar, torch.eye(P_bar.shape[0]), rtol=0, atol=1e-6))}  # 5 R steps move P by ≫ 1e-6
    _write_json(out, "o_step_reference", errors)


def dense_optimizer_state(engine) -> dict:
    """Every tensor and hyperparameter of the innermost optimizer's dense groups (the fp32 master copies
    under ZeRO/bf16 included), classified by DeepSpeed's own `moe` marker on the model parameters."""
    inner, model_groups = innermost_optimizer(engine.optimizer)
    out = {}
    for i, (group, params) in enumerate(zip(inner.param_groups, model_groups)):
        if any(is_moe_param(p) for p in params):
            continue
        out[f"group{i}.hyper"] = {k: v for k, v in group.items() if k != "params"}
        for j, t in enumerate(group["params"]):
            out[f"group{i}.tensor{j}"] = t.detach().clone()
            for k, v in inner.state.get(t, {}).items():
                out[f"group{i}.tensor{j}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return out


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def o_step_only_experts(out, name, base, stage=0, optimizer=None, bf16=False):
    """One O step (step 5): experts move; dense parameters and their whole optimizer state keep their bits.
    Then R step 6: where the base optimizer is a plain torch optimizer, the dense parameters equal an
    independent copy of the optimizer, taken before the O step, stepped on step 6's dense gradients alone:
    the R step sees no trace of the O step's dense gradients."""
    engine = build(ep_size=2, base=base, stage=stage, optimizer=optimizer, bf16=bf16)
    train(engine, X, Y, 5, GLOBAL_BATCH)
    before, state_before = state_by_global_id(engine), dense_optimizer_state(engine)
    plain = base in BASES and isinstance(engine.optimizer, torch.optim.Optimizer)
    if plain:
        copies = {}
        reference = copy.deepcopy(engine.optimizer, copies)
        reference.__dict__.pop("step", None)  # OMoE's wrapper, bound to the engine's optimizer
    for xb, yb in micro_batches(X, Y, 5, GLOBAL_BATCH, engine.gradient_accumulation_steps()):
        engine.backward(engine(xb.to(model_dtype(engine)), yb))
        engine.step()
    after, state_after = state_by_global_id(engine), dense_optimizer_state(engine)
    expert = [k for k in before if k.startswith("layer")]
    dense = [k for k in before if not k.startswith("layer")]
    report = {"o_step_ran": engine.omoe.prepared_step == 5 and engine.omoe.o_steps_done == 1,
              "expert_max_change": max((after[k] - before[k]).abs().max().item() for k in expert),
              "dense_changed": [k for k in dense if not torch.equal(before[k], after[k])],
              "num_dense": len(dense),
              "num_state_entries": sum(1 for k in state_before if k.count(".") == 2),
              "state_keys_equal": state_before.keys() == state_after.keys(),
              "state_changed": [k for k in state_before if k in state_after and not _same(state_before[k], state_after[k])],
              "all_trainable_again": all(p.requires_grad for p in engine.module.parameters())}
    if plain:
        dense_params = {n: p for n, p in engine.module.named_parameters() if not is_moe_param(p)}
        (xb, yb), = micro_batches(X, Y, 6, GLOBAL_BATCH, 1)
        engine.backward(engine(xb, yb))
        grads = {n: p.grad.clone() for n, p in dense_params.items()}  # averaged over the ranks by now
        engine.step()
        ref_params = {n: copies[id(p)] for n, p in engine.module.named_parameters()}
        for n, p in ref_params.items():
            p.grad = grads.get(n)  # experts: None, so the reference leaves them alone
        reference.step()
        report["next_r_step_differs"] = [n for n, p in dense_params.items() if not torch.equal(p, ref_params[n])]
    _write_json(out, name, report)


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
        report["window"][f"layer{L}.counts_equal"] = all(torch.equal(c, ref[L]["counts"]) for c in window.counts)
        report["window"][f"layer{L}.tokens"] = float(ref[L]["counts"].sum())
    xb, yb = next(micro_batches(X, Y, 5, GLOBAL_BATCH, 1))
    engine(xb, yb)  # step 5 is the first O step: the forward closes the window
    alpha = omoe_ds.core.projector.alpha_at(5, 0.5, 0.5, STEPS)
    for L, layer in enumerate(omoe.layers):
        for e in range(4):
            for w, linear in enumerate(layer.local_experts[e]):
                x_mean = torch.cat([(ref[L]["sums"][w][e] / ref[L]["counts"][e]).float(), torch.ones(1)])
                P_ref = torch.eye(len(x_mean)) - torch.outer(x_mean, x_mean) / (alpha + x_mean @ x_mean)
                report["projector"][f"layer{L}.expert{e}.w{w + 1}"] = (omoe.P[L][w][e] - P_ref).abs().max().item()
    _write_json(out, "capture_reference", report)


def diversity_sharded(out):
    """expert_diversity with experts on 2 ranks, after a few steps made them differ; each rank offers other
    tokens (rank 0's must be used) and slices are small, so several gathers run per weight."""
    engine = build(ep_size=2)
    train(engine, X, Y, 3, GLOBAL_BATCH)
    layers = find_expert_layers(engine.module)
    g = torch.Generator().manual_seed(dist.get_rank())
    inputs = [torch.randn(10 + dist.get_rank(), SPEC.d_model, generator=g) for _ in layers]
    save(out, "diversity_ep2", engine, diversity=expert_diversity(layers, inputs=inputs, chunk=50), inputs=inputs,
         spec=dataclasses.asdict(SPEC))


class RoutedInputs:
    """Per expert, Σ of the augmented inputs x̃ = [x; 1] and h̃ = [h; 1] of the R steps, recomputed from the
    gate's argmax (top-1, no drops): independent of OMoE's own capture."""

    def __init__(self, omoe, spec):
        self.omoe, self.sums = omoe, []
        for L, layer in enumerate(omoe.layers):
            M = layer.num_experts
            self.sums.append([torch.zeros(M, spec.d_model, dtype=torch.float64), torch.zeros(M, spec.d_ff, dtype=torch.float64),
                              torch.zeros(M, dtype=torch.float64)])
            layer.module.register_forward_pre_hook(self._hook(L))

    def _hook(self, L):
        def record(moe, args):
            if self.omoe.phase != "R" or not moe.training:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            expert = (x @ moe.deepspeed_moe.gate.wg.weight.T).argmax(-1)
            for e, (w1, _) in enumerate(self.omoe.layers[L].local_experts):
                xe = x[expert == e]
                self.sums[L][0][e] += xe.double().sum(0)
                self.sums[L][1][e] += F.gelu(F.linear(xe, w1.weight, w1.bias)).double().sum(0)
                self.sums[L][2][e] += len(xe)
        return record

    def mean(self, L, w, e):
        x = (self.sums[L][w][e] / self.sums[L][2][e]).float()
        return torch.cat([x, torch.ones(1)])


def augmented(p_w, p_b):
    return torch.cat([p_w, p_b.unsqueeze(1)], dim=1)


def sgd_o_step_closed_form(out, num_experts):
    """Plain SGD (no momentum, no weight decay), one O step: ΔW̃_m = −lr·G̃_m·P̄_m exactly, with G̃_m the raw
    gradient and P̄_m from the dense projectors. At M = 2, after the first projector update, the other expert's
    window mean is damped exactly: ‖ΔW̃_m x̃̄_j‖ = lr·‖G̃_m x̃̄_j‖·α/(α + ‖x̃̄_j‖²)."""
    lr = 0.5
    spec = dataclasses.replace(SPEC, num_experts=num_experts)
    torch.manual_seed(0)
    model = SmallMoEClassifier(spec, ep_size=1)
    x_data, y_data = make_task(spec, 1024, seed=0)
    engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                    config=ds_config(alpha0=0.5, lam=1.0))
    omoe, alpha = engine.omoe, 0.5
    routed = RoutedInputs(omoe, spec)
    train(engine, x_data, y_data, 5, GLOBAL_BATCH)
    (xb, yb), = micro_batches(x_data, y_data, 5, GLOBAL_BATCH, 1)
    loss = engine(xb, yb)  # step 5's forward: the projectors take the window
    linears = [(L, e, w, lin) for L, layer in enumerate(omoe.layers) for e, pair in enumerate(layer.local_experts)
               for w, lin in enumerate(pair)]
    omoe.phase = "off"  # the raw gradient G̃_m: hooks idle
    raw = torch.autograd.grad(F.cross_entropy(model.logits(xb), yb), [p for *_, lin in linears for p in (lin.weight, lin.bias)])
    omoe.phase = "O"
    before = [augmented(lin.weight.detach().clone(), lin.bias.detach().clone()) for *_, lin in linears]
    engine.backward(loss)
    engine.step()
    report = {"closed_form": {}, "damping": {}}
    for i, (L, e, w, lin) in enumerate(linears):
        G = augmented(raw[2 * i], raw[2 * i + 1])
        P_all = [omoe.P[L][w][j] for j in range(num_experts)]
        P_bar = (sum(P_all) - P_all[e]) / (num_experts - 1)
        delta = augmented(lin.weight.detach(), lin.bias.detach()) - before[i]
        expected = -lr * (G.double() @ P_bar.double())
        # ΔW̃ is a difference of fp32 weights: each entry carries up to one ulp of |W| (2^-23·|W|).
        ulp = 2.0 ** -23 * before[i].abs().max().item()
        report["closed_form"][f"layer{L}.expert{e}.w{w + 1}"] = {
            "err": (delta.double() - expected).abs().max().item(), "bound": 2 * ulp + 1e-6 * expected.abs().max().item(),
            "change": expected.abs().max().item()}
        for j in range(num_experts):
            if j == e:
                continue
            x_j = routed.mean(L, w, j)
            moved = (delta.double() @ x_j.double()).norm().item()
            raw_dir = lr * (G.double() @ x_j.double()).norm().item()
            damping = alpha / (alpha + x_j.double().dot(x_j.double()).item())
            report["damping"][f"layer{L}.expert{e}.w{w + 1}.by{j}"] = {
                "ratio": moved / raw_dir, "damping": damping,
                # fp32 ΔW̃ entries (one ulp of |W| each) summed over n inputs against x̃̄_j
                "bound": 2 * ulp * x_j.abs().sum().item() / raw_dir + 1e-6}
    _write_json(out, f"sgd_closed_form_M{num_experts}", report)


def clipping_norm_counts_experts(out, name, stage, bf16, optimizer=None):
    """gradient_clipping active: the global norm of an O step is the norm of the experts' projected gradients.
    (Not with a client optimizer under bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer leaves expert
    gradients out of its norm in every step.)"""
    torch.manual_seed(0)
    model = SmallMoEClassifier(SPEC, ep_size=1)
    config = ds_config(stage=stage, bf16=bf16, optimizer=optimizer)
    config["gradient_clipping"] = 1e-3
    engine, *_ = omoe_ds.initialize(model=model, optimizer=None if optimizer else BASES["adamw"], config=config)
    expert_params = list(expert_parameters_by_global_id(engine.omoe.layers).values())
    seen, handles = {}, []

    def watch_gradients(module, args):
        # OMoE attaches its projection hooks in its own forward pre-hook, registered before this one: hooks
        # registered here run after them, so they see the projected gradient
        for handle in handles:
            handle.remove()
        handles[:] = [p.register_hook(lambda g, k=k: seen.__setitem__(k, g.detach().float().clone()))
                      for k, p in enumerate(expert_params)]

    engine.module.register_forward_pre_hook(watch_gradients)
    norms = {}
    for step in range(6):
        seen.clear()
        (xb, yb), = micro_batches(X, Y, step, GLOBAL_BATCH, 1)
        engine.backward(engine(xb.to(model_dtype(engine)), yb))
        engine.step()
        expert_only = torch.sqrt(sum((g.double() ** 2).sum() for g in seen.values())).item()
        norms[step] = {"engine": float(engine.get_global_grad_norm()), "experts": expert_only}
    _write_json(out, name, norms)


def overflow_defers_the_o_step(out):
    """bf16 with DeepSpeed's overflow check: an inf in one expert gradient at O step 5 makes DeepSpeed skip the
    update; OMoE does not count it and runs the O step at step 6 on the projectors step 5 prepared."""
    def run(inject):
        torch.manual_seed(0)
        engine = build(ep_size=1, base="adamw", stage=2, bf16=True)
        assert engine.optimizer.check_grad_overflow
        train(engine, X, Y, 5, GLOBAL_BATCH)
        weight = engine.omoe.layers[0].local_experts[0][0].weight
        handle = weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf"))) if inject else None
        before = state_by_global_id(engine)
        (xb, yb), = micro_batches(X, Y, 5, GLOBAL_BATCH, 1)
        engine.backward(engine(xb.to(torch.bfloat16), yb))
        engine.step()
        if handle is not None:
            handle.remove()
        after5 = state_by_global_id(engine)
        projectors5 = {k: P.clone() for k, P in engine.omoe.projectors_by_global_id().items()}
        report = {"skipped_steps": engine.skipped_steps, "deferred": engine.omoe.deferred_o_step,
                  "o_steps_done_after_5": engine.omoe.o_steps_done,
                  "changed_at_5": [k for k in before if not torch.equal(before[k], after5[k])],
                  "all_trainable_after_5": all(p.requires_grad for p in engine.module.parameters())}
        (xb, yb), = micro_batches(X, Y, 6, GLOBAL_BATCH, 1)
        engine.backward(engine(xb.to(torch.bfloat16), yb))
        report["phase_at_6"] = engine.omoe.phase
        engine.step()
        after6 = state_by_global_id(engine)
        report.update(
            prepared_after_6=engine.omoe.prepared_step, o_steps_done_after_6=engine.omoe.o_steps_done,
            deferred_after_6=engine.omoe.deferred_o_step,
            projectors_kept_at_6=all(torch.equal(P, projectors5[k]) for k, P in engine.omoe.projectors_by_global_id().items()),
            dense_changed_at_6=[k for k in after5 if not k.startswith("layer") and not torch.equal(after5[k], after6[k])],
            experts_changed_at_6=sum(1 for k in after5 if k.startswith("layer") and not torch.equal(after5[k], after6[k])))
        for step in range(7, 11):
            (xb, yb), = micro_batches(X, Y, step, GLOBAL_BATCH, 1)
            engine.backward(engine(xb.to(torch.bfloat16), yb))
            engine.step()
        report["prepared_after_10"], report["o_steps_done_after_10"] = engine.omoe.prepared_step, engine.omoe.o_steps_done
        return report, projectors5

    injected, projectors_injected = run(True)
    clean, projectors_clean = run(False)
    injected["projectors_at_5_equal_clean_run"] = all(torch.equal(projectors_injected[k], projectors_clean[k])
                                                      for k in projectors_clean)
    _write_json(out, "overflow_deferral", {"injected": injected, "clean": clean})


def r_step_forward_collectives(out):
    """Every deepspeed.comm call of one R-step forward (step 4) and one O-step forward (step 5), by the
    file that issues it: in an R step DeepSpeed's own MoE dispatch only, none from omoe_ds."""
    import sys
    engine = build(ep_size=2)
    train(engine, X, Y, 4, GLOBAL_BATCH)
    calls, originals = [], {}
    for name in ("all_reduce", "all_reduce_coalesced", "all_to_all_single", "all_to_all", "all_gather",
                 "all_gather_into_tensor", "all_gather_object", "reduce_scatter_tensor", "reduce_scatter_fn",
                 "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "barrier", "monitored_barrier",
                 "send", "recv", "isend", "irecv", "inference_all_reduce"):
        if callable(getattr(dist, name, None)):
            originals[name] = getattr(dist, name)

            def counted(*args, _name=name, _fn=originals[name], **kwargs):
                calls.append((_name, sys._getframe(1).f_code.co_filename))
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
    report = {}
    try:
        for step in (4, 5):
            xb, yb = next(micro_batches(X, Y, step, GLOBAL_BATCH, 1))
            calls.clear()
            loss = engine(xb, yb)
            in_omoe = [name for name, path in calls if f"{os.sep}omoe_ds{os.sep}" in path]
            report[str(step)] = {"phase": engine.omoe.phase, "omoe": in_omoe,
                                 "other": [f"{name}@{os.path.basename(path)}" for name, path in calls
                                           if f"{os.sep}omoe_ds{os.sep}" not in path]}
            engine.backward(loss)
            engine.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    _write_json(out, "r_step_forward_collectives", report)


def _write_json(out, name, payload):
    with open(os.path.join(out, f"{name}.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(payload, f, indent=1)


SUITES = {
    "world1": lambda out: [
        train_run(out, "ref_ep1", ep_size=1),
        train_run(out, "ref_ep1_gas2", ep_size=1, gas=2),
        capture_reference(out),
        sgd_o_step_closed_form(out, 2),
        sgd_o_step_closed_form(out, 4),
        clipping_norm_counts_experts(out, "clip_norm_zero1", stage=1, bf16=False),
        clipping_norm_counts_experts(out, "clip_norm_zero2", stage=2, bf16=False),
        clipping_norm_counts_experts(out, "clip_norm_zero2_bf16", stage=2, bf16=True),
        clipping_norm_counts_experts(out, "clip_norm_zero0_bf16", stage=0, bf16=True, optimizer=DS_CONFIG_ADAMW),
        overflow_defers_the_o_step(out),
    ],
    "world2": lambda out: [
        train_run(out, "ep2_zero0", ep_size=2, stage=0),
        train_run(out, "ep2_zero1", ep_size=2, stage=1),
        train_run(out, "ep2_zero2", ep_size=2, stage=2),
        train_run(out, "ep2_zero2_gas2", ep_size=2, stage=2, gas=2),
        train_run(out, "ep1_replicas", ep_size=1, stage=0),
        o_step_reference(out),
        diversity_sharded(out),
        r_step_forward_collectives(out),
        *[o_step_only_experts(out, f"o_step_{base}_zero{stage}{'_bf16' if bf16 else ''}", base if base != "ds_config" else None,
                              stage=stage, bf16=bf16, optimizer=DS_CONFIG_ADAMW if base == "ds_config" else None)
          for base in (*BASES, "ds_config") for stage in (0, 1, 2) for bf16 in (False, True)
          if not (base == "adagrad" and stage > 0)],  # refused: DeepSpeed rebuilds Adagrad with one group
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
    collectives.shutdown()
