"""What OMoE costs on transformers' fused experts: one process, one Mixtral-shaped model. Prints one JSON object.

    DS_ACCELERATOR=cpu python bench/layout_overhead.py [--implementation grouped_mm] [--steps 25]
                                                     [--projection-side auto|gradient|token]

Per optimizer step (median wall time, fp32, SGD with momentum, ZeRO 0):
- `plain_r_step_s`: the same engine with "omoe": {"enabled": false};
- `omoe_r_step_s`: an OMoE R step, which records x and takes h from the experts' own computation;
- `omoe_o_step_s`: an OMoE O step (projector update, the projection on the side `--projection-side` picks,
  experts only), with `o_step_projection_s` (inside the projection) and `projection_sides` per stream;
- `recompute_h_s`: what recomputing h = act(gate·x) ⊙ up·x from the recorded routes would add per R
  step instead (the issue's 5% rule), timed on the same routes.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
BATCH, SEQ, SKIP_STEP = 8, 128, 5


def build(enabled: bool, implementation: str, side: str = "auto"):
    import transformers
    import omoe_ds
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**SHAPE),
                                                          experts_implementation=implementation)
    config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
              "omoe": {"enabled": enabled, "skip_step": SKIP_STEP, "projection_side": side}}
    engine, *_ = omoe_ds.initialize(model=model, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
                                    config=config)
    return engine


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def timed_step(engine, step: int) -> float:
    start = time.perf_counter()
    loss = engine(**batch(step)).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


def step_times(plain, omoe, steps: int):
    """Both engines step in turn on the same batch, so drift on a shared machine hits both alike."""
    plain_times, r_times, o_times, projection = [], [], [], []
    for step in range(steps):
        omoe.omoe.projection_seconds[0] = 0.0
        p, t = timed_step(plain, step), timed_step(omoe, step)
        if step >= 2:  # warm-up
            plain_times.append(p)
            is_o = step % SKIP_STEP == 0 and step > 0
            (o_times if is_o else r_times).append(t)
            if is_o:
                projection.append(omoe.omoe.projection_seconds[0])
    return plain_times, r_times, o_times, projection


def recompute_h_seconds(engine, repeats: int = 5) -> float:
    """Σh recomputed from the routes of one forward, for every MoE layer: the cost recording avoids."""
    routes = []
    handles = [layer.module.register_forward_hook(lambda m, inp, out: routes.append((m, inp[0].detach(), inp[1])))
               for layer in engine.omoe.layers]
    with torch.no_grad():
        engine.module(**batch(0))
    for h in handles:
        h.remove()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for module, x, top_k in routes:
                for e in range(module.num_experts):
                    rows = x[(top_k == e).any(-1)]
                    module._apply_gate(torch.nn.functional.linear(rows, module.gate_up_proj[e])).sum(0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    parser.add_argument("--steps", type=int, default=42)
    parser.add_argument("--projection-side", default="auto", choices=["auto", "gradient", "token"])
    args = parser.parse_args()
    stdout = os.dup(1)
    os.dup2(2, 1)  # DeepSpeed and its op builder log to fd 1: keep stdout for the one JSON object
    from omoe_ds.core import environment
    os.environ.setdefault("MASTER_PORT", str(environment.free_local_port()))
    environment.init_distributed()
    engine = build(True, args.implementation, args.projection_side)
    plain_r, r, o, projection = step_times(build(False, args.implementation), engine, args.steps)
    recompute = recompute_h_seconds(engine)
    result = {"bench": "layout_overhead", "model": "Mixtral-shaped", **SHAPE, "batch": BATCH, "seq_len": SEQ,
              "experts_implementation": args.implementation, "torch_threads": torch.get_num_threads(),
              "plain_r_step_s": statistics.median(plain_r), "omoe_r_step_s": statistics.median(r),
              "omoe_o_step_s": statistics.median(o), "o_step_projection_s": statistics.median(projection),
              "projection_side": args.projection_side,
              "projection_sides": [{k: r[k] for k in ("layer", "stream", "side", "token_rows", "cost_gradient",
                                                      "cost_token") if k in r} for r in engine.omoe.side_report()],
              "recompute_h_s": recompute}
    result["r_step_overhead"] = result["omoe_r_step_s"] / result["plain_r_step_s"]
    result["recompute_h_share_of_r_step"] = recompute / result["omoe_r_step_s"]
    sys.stdout.flush()
    os.dup2(stdout, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
