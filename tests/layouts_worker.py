"""Every expert layout through the deepspeed CLI, for tests/test_layouts.py: one launch per world size.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29650 tests/layouts_worker.py --out /tmp/l

Per layout (native FFN and SwiGLU at EP = world size, transformers' fused experts replicated), the
same global batches for 21 steps (O steps at 5, 10, 15, 20), fp32, SGD with momentum, and:
- the final parameters and projectors, keyed by global expert id (run.<case>.rank<r>.pt);
- at step 4, each rank's window against an independent recomputation from the router's top-k;
- the diversity figures of the final experts (sharded ones gathered slice by slice);
- at step 5, the O-step gradient of every expert matrix against G̃·P̄ from all-gathered projectors;
- a checkpoint at step 12, resumed by a fresh engine: its step-21 state must equal the run's bit for bit;
- at world 1, Mixtral's 2-rank step-12 checkpoint resharded for 1 rank and continued to step 21.
The run above projects on the token side (omoe.projection_side "token"); a second run of each case, forced
to the gradient side, trains GRADIENT_STEPS steps (O steps 5 and 10) for the same EP comparison
(run_gradient.<case>.rank<r>.pt), and the step-5 check projects on both sides.
"""
import argparse
import json
import os
import shutil

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import omoe_ds
from omoe_ds.core import collectives, environment, projector
from omoe_ds.experts import expert_parameters_by_global_id
from omoe_ds.experts.base import STREAMS, X, H
from omoe_ds.experts.deepspeed_moe import DeepSpeedMoELayer
from omoe_ds.studies.diversity import expert_diversity

STEPS = 21
GLOBAL_BATCH = 8
SEQ = 6
SAVE_AT = 12
GRADIENT_STEPS = 11  # the gradient-side run: two O steps
SIDES = ("token", "gradient")  # the main run's side, the short run's
CHECKED_STEP = 5  # the first O step
ZERO_STAGE = {"native_ffn": 0, "native_swiglu": 1, "mixtral": 0, "qwen2_moe": 2, "qwen3_moe": 1, "olmoe": 0,
              "deepseek_v3": 2}
_COMMON = dict(vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=32, tie_word_embeddings=False, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HF_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                                  **_COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12,
                                                     shared_expert_intermediate_size=20, num_experts=4,
                                                     num_experts_per_tok=2, decoder_sparse_step=1, **_COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                                     num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8,
                                                     **_COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=12, num_experts=4, num_experts_per_tok=2, **_COMMON),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        intermediate_size=24, moe_intermediate_size=12, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, head_dim=4, **{**_COMMON, "num_key_value_heads": 2}),
}
# eager and batched_mm are the other implementations OMoE records h from; grouped_mm is transformers' default.
IMPLEMENTATION = {"mixtral": "grouped_mm", "qwen2_moe": "eager", "qwen3_moe": "batched_mm", "olmoe": "grouped_mm",
                  "deepseek_v3": "grouped_mm"}
CASES = ["native_ffn", "native_swiglu", *HF_CONFIGS]
# Every projector form on both kinds of layout (native_swiglu: EP = 2, so hybrid holds half the experts' factors);
# "auto" stays factored over these 4 O steps.
STORAGE = {"native_ffn": "dense", "mixtral": "dense", "native_swiglu": "hybrid", "qwen3_moe": "hybrid"}


class NativeNet(nn.Module):
    """Linear → native DeepSpeed MoE → mean-pooled head; deterministic lossless routing for EP equality."""

    def __init__(self, expert: str, ep_size: int):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = omoe_ds.make_moe_ffn(16, 24, 4, ep_size=ep_size, k=1 if expert == "ffn" else 2, expert=expert,
                                        bias=True, drop_tokens=False, use_rts=False,
                                        top2_2nd_expert_sampling=False)
        self.out = nn.Linear(16, 4)

    def forward(self, x, y):
        h = self.inp(x)
        m, _, _ = self.moe(h)
        return F.cross_entropy(self.out((h + m).mean(1)), y)


def make_model(case: str):
    torch.manual_seed(0)
    if case.startswith("native_"):
        return NativeNet(case[len("native_"):], ep_size=dist.get_world_size())
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[case](),
                                                          experts_implementation=IMPLEMENTATION[case])
    return model


def global_batches(case: str):
    """STEPS global batches; rows i and i + B/2 share a padding pattern, so every rank's loss averages as many
    real tokens and the data-parallel mean equals the single-process one."""
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        if case.startswith("native_"):
            yield {"x": torch.randn(GLOBAL_BATCH, SEQ, 8, generator=g), "y": torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)}
            continue
        ids = torch.randint(3, 48, (GLOBAL_BATCH, SEQ), generator=g)
        half = torch.randint(SEQ - 2, SEQ + 1, (GLOBAL_BATCH // 2,), generator=g)
        lengths = torch.cat([half, half])
        mask = (torch.arange(SEQ) < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def my_slice(batch: dict) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def run_loss(engine, batch):
    if "x" in batch:
        return engine(batch["x"], batch["y"])
    return engine(**batch).loss


def build(case: str, side: str = SIDES[0]):
    model = make_model(case)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
              "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": ZERO_STAGE[case]},
              # α well below |h|² (tiny HF weights make small hidden activations), so both projectors move
              "omoe": {"skip_step": 5, "alpha0": 0.5 if case.startswith("native_") else 0.1,
                       "projector_storage": STORAGE.get(case, "auto"), "projection_side": side}}
    engine, *_ = omoe_ds.initialize(model=model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                    config=config)
    return engine


# ---- independent references -------------------------------------------------------------------------
class WindowReference:
    """Σx and Σh per global expert of every layer, recomputed from each R-step forward's top-k routes with
    the expert weights themselves: h = act(gate·x) ⊙ up·x (SwiGLU) or act(w1·x + b1) (FFN)."""

    def __init__(self, engine):
        self.omoe = engine.omoe
        self.sums = [[torch.zeros_like(s) for s in w.sums] + [torch.zeros_like(w.counts)] for w in self.omoe.windows]
        self.abs_sums = [[torch.zeros_like(s) for s in w.sums] for w in self.omoe.windows]
        self.mask = None
        self.handles = [engine.module.register_forward_pre_hook(self._take_mask, with_kwargs=True)]
        self.checked = []  # native layers under EP > 1 hold only some experts' weights: checked at world 1
        for L, layer in enumerate(self.omoe.layers):
            if isinstance(layer, DeepSpeedMoELayer) and layer.ep_size > 1:
                continue
            self.checked.append(L)
            if isinstance(layer, DeepSpeedMoELayer):
                self.handles.append(layer.gate.register_forward_hook(
                    lambda gate, inp, out, L=L: self._add(L, inp[0], out[3].t(), None)))
            else:
                self.handles.append(layer.module.register_forward_hook(
                    lambda mod, inp, out, L=L: self._add(L, inp[0], inp[1], self.mask)))

    def _take_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = None if mask is None else mask.reshape(-1).bool()

    def _add(self, L, x, routes, used):
        if self.omoe.phase != "R" or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            self._add_routed(L, x, routes, used)

    def _add_routed(self, L, x, routes, used):
        layer, (sx, sh, counts) = self.omoe.layers[L], self.sums[L]
        x = x.detach().reshape(-1, x.shape[-1]).double()
        for g in range(layer.num_experts):
            rows = (routes == g).any(-1)
            if used is not None:
                rows &= used
            xe, he = x[rows], self.hidden(layer, g, x[rows])
            sx[g] += xe.sum(0)
            sh[g] += he.sum(0)
            self.abs_sums[L][0][g] += xe.abs().sum(0)
            self.abs_sums[L][1][g] += he.abs().sum(0)
            counts[0][g] += rows.sum()
            counts[1][g] += rows.sum()

    @staticmethod
    def hidden(layer, g, xe):
        m = layer.matrices(g)  # world 1 (native) or replicas (fused): global id = local index
        if "w1" in m:
            w1, b1 = m["w1"]
            return layer.experts[g][1](F.linear(xe.float(), w1, b1)).double()
        (wg, bg), (wu, bu) = m["gate"], m["up"]
        act = layer.experts[g].act if isinstance(layer, DeepSpeedMoELayer) else layer.module.act_fn
        return (act(F.linear(xe.float(), wg, bg)) * F.linear(xe.float(), wu, bu)).double()

    def report(self):
        out = {}
        for L in self.checked:
            window, ref = self.omoe.windows[L], self.sums[L]
            for s, name in enumerate(STREAMS):
                # fp32 rows (and h recomputed in fp32), summed per forward in fp32 before fp64: per entry at most
                # count·2⁻²⁴·Σ|row|, plus the recomputed h's own rounding (2⁻²⁴ relative, inside that bound)
                bound = ref[2][s].clamp(min=1)[:, None] * 2.0 ** -24 * self.abs_sums[L][s] + 1e-30
                out[f"layer{L}.{name}"] = ((window.sums[s] - ref[s]).abs() / bound).max().item()
            out[f"layer{L}.counts_equal"] = bool(torch.equal(window.counts, ref[2]))
            out[f"layer{L}.tokens"] = window.counts.sum().item()
        return out


def o_step_gradient_errors(engine, batch):
    """At the O step whose projectors are prepared: relative error of each projected expert gradient
    against G̃·P̄ with G̃ the raw gradient and P̄ from every expert's projector, all-gathered."""
    omoe, model = engine.omoe, engine.module
    params = {}
    for layer in omoe.layers:
        params.update({id(p): p for p in layer.expert_parameters()})
    plist = list(params.values())

    def grads(phase):
        omoe.phase = phase  # "off": hooks idle, nothing recorded; "O": hooks project
        if "x" in batch:
            h = model.inp(batch["x"])
            m, _, _ = model.moe(h)
            loss = F.cross_entropy(model.out((h + m).mean(1)), batch["y"])
        else:  # the inner model, so that the engine's forward hook does not reset the phase
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = F.cross_entropy(model.lm_head(hidden)[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=-100)
        return dict(zip(map(id, plist), torch.autograd.grad(loss, plist)))

    raw = grads("off")
    # Both sides on the same batch; the run's own decisions are restored for the engine's backward that follows.
    run_side, decided = omoe.projection_side, [view._sides for view in omoe.views]
    sides = {}
    for side in SIDES:
        omoe.projection_side = side
        for view in omoe.views:
            view._sides = {}
        sides[side] = grads("O")
        assert {view.side(s) for view in omoe.views for s in (X, H)} == {side}, (side, [v._sides for v in omoe.views])
    omoe.projection_side = run_side
    for view, kept in zip(omoe.views, decided):
        view._sides = kept
    errors, moved = {}, {}
    for side, projected in sides.items():
        side_errors, moved = _errors_against_reference(omoe, raw, projected)
        errors.update({f"{side}:{k}": v for k, v in side_errors.items()})
    omoe.phase = "O"
    return errors, moved


def _errors_against_reference(omoe, raw, projected):
    errors, moved = {}, {}
    for L, layer in enumerate(omoe.layers):
        P_bar = []
        for s in range(2):
            every = [torch.empty_like(omoe.P[L][s]) for _ in range(dist.get_world_size() if layer.ep_size > 1 else 1)]
            if layer.ep_size > 1:
                torch.distributed.all_gather(every, omoe.P[L][s].contiguous())
            else:
                every = [omoe.P[L][s]]
            P_all = torch.cat(every)
            P_bar.append((P_all.sum(0, keepdim=True) - P_all) / (layer.num_experts - 1))
        first = omoe.global_expert_id(L, 0)
        if isinstance(layer, DeepSpeedMoELayer):
            for l, linears in enumerate(layer.linears):
                for name, linear, s in zip(layer.matrix_names, linears, layer.matrix_streams):
                    ref_w, ref_b = projector.project_augmented_grad(raw[id(linear.weight)], raw[id(linear.bias)],
                                                                    P_bar[s][first + l])
                    scale = max(ref_w.abs().max().item(), 1e-30)
                    key = f"layer{L}.expert{first + l}.{name}"
                    errors[key] = max((projected[id(linear.weight)] - ref_w).abs().max().item(),
                                      (projected[id(linear.bias)] - ref_b).abs().max().item()) / scale
                    moved[key] = (projected[id(linear.weight)] - raw[id(linear.weight)]).abs().max().item() / scale
        else:
            for p, s, name in ((layer.module.gate_up_proj, X, "gate_up_proj"), (layer.module.down_proj, H, "down_proj")):
                for e in range(layer.num_experts):
                    ref = raw[id(p)][e] @ P_bar[s][e]
                    scale = max(ref.abs().max().item(), 1e-30)
                    errors[f"layer{L}.expert{e}.{name}"] = (projected[id(p)][e] - ref).abs().max().item() / scale
                    moved[f"layer{L}.expert{e}.{name}"] = (projected[id(p)][e] - raw[id(p)][e]).abs().max().item() / scale
    return errors, moved


def state(engine) -> dict:
    omoe = engine.omoe
    expert_ids = {id(p) for layer in omoe.layers for p in layer.expert_parameters()}
    return {"params": {k: v.detach().clone() for k, v in expert_parameters_by_global_id(omoe.layers).items()},
            "dense": {n: p.detach().clone() for n, p in engine.module.named_parameters() if id(p) not in expert_ids},
            "projectors": {k: P.clone() for k, P in omoe.projectors_by_global_id().items()},
            "windows": [[*(s.clone() for s in w.sums), w.counts.clone()] for w in omoe.windows],
            "o_steps_done": omoe.o_steps_done}


def train(engine, batches, start, stop, checks=None, save_dir=None):
    for step in range(start, stop):
        batch = my_slice(batches[step])
        loss = run_loss(engine, batch)
        if checks is not None and step == CHECKED_STEP:
            checks["o_step_gradient"], checks["o_step_moved"] = o_step_gradient_errors(engine, batch)
        engine.backward(loss)
        engine.step()
        if checks is not None and step == CHECKED_STEP - 1:
            checks["window"] = checks.pop("reference").report()
        if save_dir is not None and step + 1 == SAVE_AT:
            omoe_ds.save_checkpoint(engine, save_dir, tag="step12")


RESHARDED = "mixtral"  # a fused layout: its 2-rank checkpoint is resharded to 1 rank and continued there


def resharded_continuation(case: str, final: dict, batches, out: str, two_rank_out: str) -> float:
    """The 2-rank step-12 checkpoint, resharded for 1 rank, continued to step 21: max |Δ| to this run."""
    from omoe_ds.checkpoint.reshard import reshard
    dst = os.path.join(out, f"resharded_{case}")
    shutil.rmtree(dst, ignore_errors=True)
    reshard(os.path.join(two_rank_out, f"ckpt_{case}_w2"), dst, ep_size=1, world_size=1, tag="step12")
    engine = build(case)
    omoe_ds.load_checkpoint(engine, dst, tag="step12")
    train(engine, batches, SAVE_AT, STEPS)
    again = state(engine)
    return max((final[part][k] - again[part][k]).abs().max().item()
               for part in ("params", "dense", "projectors") for k in final[part])


def run_case(case: str, out: str, two_rank_out=None) -> None:
    rank = dist.get_rank()
    batches = list(global_batches(case))
    engine = build(case)
    layouts = sorted({layer.layout for layer in engine.omoe.layers})
    checks = {"reference": WindowReference(engine)}
    save_dir = os.path.join(out, f"ckpt_{case}_w{dist.get_world_size()}")
    train(engine, batches, 0, STEPS, checks=checks, save_dir=save_dir)
    final = state(engine)
    torch.save(final, os.path.join(out, f"run.{case}.rank{rank}.pt"))
    g = torch.Generator().manual_seed(3)  # every expert on the same tokens, wherever it lives
    tokens = [torch.randn(10, layer.streams[0].d_in, generator=g) for layer in engine.omoe.layers]
    diversity = expert_diversity(engine.omoe.layers, inputs=tokens)

    resumed = build(case)
    omoe_ds.load_checkpoint(resumed, save_dir, tag="step12")
    train(resumed, batches, SAVE_AT, STEPS)
    again = state(resumed)
    bit_exact = all(torch.equal(a, b) for part in ("params", "dense", "projectors")
                    for a, b in zip(final[part].values(), again[part].values())) and \
        all(torch.equal(a, b) for wa, wb in zip(final["windows"], again["windows"]) for a, b in zip(wa, wb))
    report = {"layouts": layouts, "diversity": diversity,
              "storage": sorted({s["form"] for s in engine.omoe.storage_report()}), "window": checks["window"], "o_step_gradient": checks["o_step_gradient"],
              "o_step_moved": checks["o_step_moved"], "o_steps_done": final["o_steps_done"],
              "projector_streams": sorted({k.rsplit(".", 1)[1] for k in final["projectors"]}),
              "x_projectors_per_layer": [len(P) for P in engine.omoe.P],
              "resume_bit_exact": bit_exact, "resume_keys_equal": final["params"].keys() == again["params"].keys()}
    report["sides"] = sorted({r["side"] for r in engine.omoe.side_report()})
    gradient_side = build(case, SIDES[1])
    train(gradient_side, batches, 0, GRADIENT_STEPS)
    report["gradient_run_sides"] = sorted({r["side"] for r in gradient_side.omoe.side_report()})
    torch.save(state(gradient_side), os.path.join(out, f"run_gradient.{case}.rank{rank}.pt"))
    if two_rank_out and case == RESHARDED:
        report["resharded_from_2_ranks_max_diff"] = resharded_continuation(case, final, batches, out, two_rank_out)
    with open(os.path.join(out, f"report.{case}.rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()
    if rank == 0 and not (case == RESHARDED and dist.get_world_size() == 2):
        shutil.rmtree(save_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--two-rank-out", default=None, help="the 2-rank launch's --out, for the reshard check")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    environment.init_distributed()
    for case in args.cases.split(","):
        run_case(case, args.out, args.two_rank_out)
    collectives.shutdown()


if __name__ == "__main__":
    main()
