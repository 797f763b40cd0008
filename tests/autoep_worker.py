"""OMoE through DeepSpeed AutoEP, for tests/test_autoep.py: one launch per world size runs every case.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 42650 tests/autoep_worker.py --out /tmp/a

Cases: tiny random Mixtral (for-loop experts) and Qwen3-MoE (torch._grouped_mm experts), AutoEP at
EP = world size, ZeRO-2 and ZeRO-3, the config AdamW (torch_adam), s = 3, 12 steps (O steps 3, 6, 9),
the same padded global batches as tests/layouts_worker.py; Mixtral and Qwen3-MoE project on the gradient side,
and again on the token side at ZeRO-3 (cases *_z3_token). Per case (files <kind>.<case>.rank<r>):
- run: final expert weights by global id, dense weights and projectors (ZeRO-3 gathered);
- report: the window after step 2 against a recomputation from the router's routes and the weights
  of each step (summed over the world), its token counts against the real tokens of the batches, the
  O-step gradient of w1/w3/w2 at step 3 against G̃·P̄ (all-gathered projectors), the dense weights and
  their optimizer state before and after that O step, the step wall time, and (ZeRO-3) a checkpoint
  after step 8 resumed by a fresh engine to step 12, bit for bit; side_report() after the last O step.
"""
import argparse
import json
import os
import shutil
import sys
import time

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import omoe_ds  # noqa: E402
from omoe_ds.core import environment  # noqa: E402
from omoe_ds.core.optimizer_groups import is_zero3  # noqa: E402
from omoe_ds.experts import expert_parameters_by_global_id  # noqa: E402
from omoe_ds.experts.base import H, X  # noqa: E402
from layouts_worker import HF_CONFIGS, global_batches, my_slice  # noqa: E402

STEPS = 12
SKIP = 3
CHECKED = 3           # the first O step
WINDOW_END = 2        # its window: steps 0, 1, 2
SAVE_AT = 8           # after step 7, an R step of an open window
# Adam amplifies a gradient difference by up to lr/eps where |g| ~ eps; plain DeepSpeed ZeRO-3 vs ZeRO-2 (Qwen3-MoE,
# 12 steps) moves a near-zero-gradient weight by 1.6e-5 at eps 1e-8. At 1e-4 that factor is 100.
EPS = 1e-4
FAMILIES = {"mixtral": False, "qwen3_moe": True, "deepseek_v3": True}  # use_grouped_mm: both of AutoEP's CPU expert paths
# omoe.projection_side: each expert path forced to the gradient side here and to the token side in its "_token"
# case (ZeRO-3, the same batches), so the two runs compare; DeepSeek-V3 lets the cost model choose per stream.
SIDES = {"mixtral": "gradient", "qwen3_moe": "gradient", "deepseek_v3": "auto"}
TOKEN_CASES = ["mixtral_z3_token", "qwen3_moe_z3_token"]
CASES = [f"{family}_z{stage}" for family in FAMILIES for stage in (2, 3)] + TOKEN_CASES


def parse(case: str) -> tuple:
    """(family, ZeRO stage, projection side) of a case name."""
    family, rest = case.rsplit("_z", 1)
    stage, _, side = rest.partition("_")
    return family, int(stage), side or SIDES[family]


def build(case: str):
    family, stage, side = parse(case)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]())
    world = dist.get_world_size()
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world, "gradient_accumulation_steps": 1,
              "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "eps": EPS, "torch_adam": True, "weight_decay": 0.0}},
              "expert_parallel": {"enabled": True, "autoep_size": world, "preset_model": family,
                                  "use_grouped_mm": FAMILIES[family]},
              "omoe": {"skip_step": SKIP, "alpha0": 0.1, "projection_side": side}}
    engine, *_ = omoe_ds.initialize(model=model, config=config)
    return engine


def gathered(params):
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def expert_weights_all(engine) -> list:
    """Per layer: (w1, w3, w2) of every global expert, all-gathered over the EP group (= the world here)."""
    out = []
    for layer in engine.omoe.layers:
        with gathered(layer.expert_parameters()):
            local = [p.detach().clone() for p in layer.expert_parameters()]
        if layer.ep_size > 1:
            full = []
            for t in local:
                parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
                torch.distributed.all_gather(parts, t.contiguous())
                full.append(torch.cat(parts))
            local = full
        out.append(local)
    return out


class WindowReference:
    """This rank's Σx, Σh and counts per global expert over the real tokens it routed, recomputed from the
    router's top-k and the weights of the step; summed over the world it must equal the window."""

    def __init__(self, engine):
        self.engine, self.omoe = engine, engine.omoe
        M = [layer.num_experts for layer in self.omoe.layers]
        self.sums = [[torch.zeros(m, s.d_in, dtype=torch.float64) for s in layer.streams] for m, layer in
                     zip(M, self.omoe.layers)]
        self.counts = [torch.zeros(2, m, dtype=torch.float64) for m in M]
        self.routes, self.weights, self.mask = {}, None, None
        self.real_routes = 0
        self.handles = [layer.module.router.register_forward_hook(
            lambda mod, inp, out, L=L: self.routes.__setitem__(L, (inp[0].detach(), out[1])))
            for L, layer in enumerate(self.omoe.layers)]

    def before(self, batch):
        self.weights = expert_weights_all(self.engine)
        self.mask = batch["attention_mask"].reshape(-1).bool()
        self.routes = {}

    @torch.no_grad()
    def after(self):
        for L, layer in enumerate(self.omoe.layers):
            x, selected = self.routes[L]
            w1, w3, w2 = self.weights[L]
            k = selected.shape[-1]
            self.real_routes += int(self.mask.sum()) * k
            for g in range(layer.num_experts):
                rows = (selected == g).any(-1) & self.mask
                xe = x[rows].float()
                he = F.silu(xe @ w1[g].T) * (xe @ w3[g].T)
                self.sums[L][X][g] += xe.double().sum(0)
                self.sums[L][H][g] += he.double().sum(0)
                self.counts[L][:, g] += rows.sum()

    def report(self) -> dict:
        out = {}
        for L, window in enumerate(self.omoe.windows):
            mine = [s.clone() for s in window.sums] + [window.counts.clone()]
            ref = self.sums[L] + [self.counts[L]]
            for t in mine + ref:
                torch.distributed.all_reduce(t)
            for s, name in enumerate(("x", "h")):
                scale = ref[s].abs().max().item()
                out[f"layer{L}.{name}"] = (mine[s] - ref[s]).abs().max().item() / max(scale, 1e-30)
            out[f"layer{L}.counts_equal"] = bool(torch.equal(mine[2], ref[2]))
            out[f"layer{L}.routes_counted"] = mine[2][X].sum().item()
        total = torch.tensor(float(self.real_routes))
        torch.distributed.all_reduce(total)
        out["real_routes_all_layers"] = total.item()
        for h in self.handles:
            h.remove()
        return out


def o_step_gradient_errors(engine, batch) -> tuple:
    """At the prepared O step: each projected w1/w3/w2 gradient against raw G̃ · P̄ (P̄ from every expert's P)."""
    omoe, model = engine.omoe, engine.module
    params = [p for layer in omoe.layers for p in layer.expert_parameters()]

    def grads(phase):
        omoe.phase = phase  # "off": hooks idle, nothing recorded; "O": hooks project
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss = F.cross_entropy(model.lm_head(hidden)[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
        return torch.autograd.grad(loss, params)

    raw, projected = grads("off"), grads("O")
    omoe.phase = "O"
    errors, moved, i = {}, {}, 0
    for L, layer in enumerate(omoe.layers):
        P_bar = []
        for s in range(2):
            parts = [torch.empty_like(omoe.P[L][s]) for _ in range(layer.ep_size)]
            torch.distributed.all_gather(parts, omoe.P[L][s].contiguous())
            P_all = torch.cat(parts)
            P_bar.append((P_all.sum(0, keepdim=True) - P_all) / (layer.num_experts - 1))
        first = omoe.global_expert_id(L, 0)
        for name, s in (("w1", X), ("w3", X), ("w2", H)):
            for e in range(layer.num_local_experts):
                ref = raw[i][e] @ P_bar[s][first + e]
                scale = max(ref.abs().max().item(), 1e-30)
                key = f"layer{L}.expert{first + e}.{name}"
                errors[key] = (projected[i][e] - ref).abs().max().item() / scale
                moved[key] = (projected[i][e] - raw[i][e]).abs().max().item() / scale
            i += 1
    return errors, moved


def dense_optimizer_tensors(engine) -> list:
    """The flat fp32 tensors the innermost optimizer steps for dense parameters, and their state."""
    opt = engine.optimizer
    flats = opt.fp32_partitioned_groups_flat if is_zero3(opt) else [t for g in opt.optimizer.param_groups
                                                                     for t in g["params"]]
    dense = [t for t in flats if id(t) in engine.omoe._dense_tensors]
    return [t.detach().clone() for t in dense] + [v.clone() if torch.is_tensor(v) else torch.tensor(v)
                                                  for t in dense for v in opt.optimizer.state[t].values()]


def state(engine) -> dict:
    omoe = engine.omoe
    experts = [p for layer in omoe.layers for p in layer.expert_parameters()]
    with gathered(engine.module.parameters()):
        params = {k: v.detach().clone() for k, v in expert_parameters_by_global_id(omoe.layers).items()}
        ids = {id(p) for p in experts}
        dense = {n: p.detach().clone() for n, p in engine.module.named_parameters() if id(p) not in ids}
    return {"params": params, "dense": dense,
            "projectors": {k: P.clone() for k, P in omoe.projectors_by_global_id().items()},
            "windows": [[*(s.clone() for s in w.sums), w.counts.clone()] for w in omoe.windows],
            "o_steps_done": omoe.o_steps_done}


def train(engine, batches, start, stop, checks=None, save_dir=None):
    seconds = []
    for step in range(start, stop):
        batch = my_slice(batches[step])
        if checks is not None and step <= WINDOW_END:
            checks["reference"].before(batch)
        if checks is not None and step == CHECKED:
            checks["dense_before"] = dense_optimizer_tensors(engine)
            with gathered(engine.module.parameters()):
                checks["dense_params_before"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        begin = time.perf_counter()
        loss = engine(**batch).loss
        if checks is not None and step == CHECKED:
            checks["o_step_gradient"], checks["o_step_moved"] = o_step_gradient_errors(engine, batch)
            begin = None  # this step ran extra forwards: not timed
        engine.backward(loss)
        engine.step()
        if begin is not None:
            seconds.append(time.perf_counter() - begin)
        if checks is not None and step <= WINDOW_END:
            checks["reference"].after()
            if step == WINDOW_END:
                checks["window"] = checks.pop("reference").report()
        if checks is not None and step == CHECKED:
            checks["dense_state_unchanged"] = all(torch.equal(a, b) for a, b in zip(
                checks.pop("dense_before"), dense_optimizer_tensors(engine)))
            before = checks.pop("dense_params_before")
            experts = {id(p) for layer in engine.omoe.layers for p in layer.expert_parameters()}
            with gathered(engine.module.parameters()):
                checks["dense_params_unchanged"] = all(torch.equal(before[n], p) for n, p in
                                                       engine.module.named_parameters() if id(p) not in experts)
                checks["experts_moved"] = min((before[n] - p).abs().max().item() for n, p in
                                              engine.module.named_parameters() if id(p) in experts)
            checks["dense_tensors_checked"] = len(engine.omoe._dense_tensors)
        if save_dir is not None and step + 1 == SAVE_AT:
            omoe_ds.save_checkpoint(engine, save_dir, tag="mid")
    return seconds


def run_case(case: str, out: str) -> None:
    rank = dist.get_rank()
    batches = list(global_batches("mixtral"))[:STEPS]
    engine = build(case)
    checks = {"reference": WindowReference(engine)}
    resumes = case.endswith("_z3")  # the token-side cases skip the resume: it does not depend on the side
    save_dir = os.path.join(out, f"ckpt_{case}")
    seconds = train(engine, batches, 0, STEPS, checks=checks, save_dir=save_dir if resumes else None)
    final = state(engine)
    torch.save(final, os.path.join(out, f"run.{case}.rank{rank}.pt"))
    report = {"layouts": sorted({layer.layout for layer in engine.omoe.layers}),
              "ep_sizes": [layer.ep_size for layer in engine.omoe.layers],
              "zero3_optimizer": is_zero3(engine.optimizer), "o_steps_done": final["o_steps_done"],
              "step_seconds": sorted(seconds)[len(seconds) // 2], "sides": engine.omoe.side_report(), **checks}
    if resumes:
        resumed = build(case)
        omoe_ds.load_checkpoint(resumed, save_dir, tag="mid")
        train(resumed, batches, SAVE_AT, STEPS)
        again = state(resumed)
        report["resume_bit_exact"] = all(
            final[part].keys() == again[part].keys() and all(torch.equal(final[part][k], again[part][k])
                                                             for k in final[part])
            for part in ("params", "dense", "projectors")) and all(
            torch.equal(a, b) for wa, wb in zip(final["windows"], again["windows"]) for a, b in zip(wa, wb))
        report["resume_o_steps_done"] = again["o_steps_done"]
    with open(os.path.join(out, f"report.{case}.rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(save_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    environment.init_distributed()
    for case in args.cases.split(","):
        run_case(case, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
