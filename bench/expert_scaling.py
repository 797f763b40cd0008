"""O-step cost vs expert count: MiniLM FFN shapes, EP=2, the same 4096 tokens per rank at every M. One JSON object.

    python bench/expert_scaling.py                      # M = 4, 16, 64; t = 200 O steps of projector state
    python bench/expert_scaling.py --experts 4 16 --o-steps-before 0

Each M runs OMoE (top-1 FFN experts, d 384, ff 1536, ZeRO-2, s = 5) on 2 of MiniLM's 6 layers, with
the projectors advanced by `--o-steps-before` RLS updates before timing (bench/step_overhead.py's
preapply_o_steps), once per `--sides` value of omoe.projection_side (auto, then each side forced).
`o_step_extra_s` is the O step's median time over the R step's (auto's; each side's in `by_side`), and
`auto_over_cheaper_forced_o_step` compares auto's O step with the faster forced side's. M = 128 would need
about 15 GB of Adam state on this 24 GB machine, so the list stops at 64.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import SKIP_STEP, cli, measure_omoe  # noqa: E402

SHAPE = dict(d_in=32, d_model=384, d_ff=1536, num_layers=2, seq_len=128)
MICRO_BATCH, STEPS = 32, 11


def worker(args):
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from omoe_ds.finetune.small_moe import SmallMoESpec, make_task

    deepspeed.init_distributed()
    world = dist.get_world_size()
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
                         f"{world} ranks x OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              "ep_size": 2, "skip_step": SKIP_STEP, "zero_stage": 2, "o_steps_before": args.o_steps_before,
              "shapes": {**SHAPE, "tokens_per_rank": MICRO_BATCH * SHAPE["seq_len"], "timed_steps": STEPS - 1},
              "by_experts": []}
    for M in args.experts:
        spec = SmallMoESpec(num_classes=6, num_experts=M, **SHAPE)
        x, y = make_task(spec, MICRO_BATCH * world * STEPS, seed=0)
        started = time.perf_counter()
        by_side = {}
        for side in args.sides:  # "auto" first: the entry's figures; forced sides to check its choice
            one = measure_omoe(spec, x, y, STEPS, MICRO_BATCH, world, args.o_steps_before,
                               omoe_extra={"projection_side": side})
            by_side[side] = {"o_step_extra_s": one["o_step_s"] - one["r_step_s"], "r_step_s": one["r_step_s"],
                             "o_step_s": one["o_step_s"], "o_step_grad_projection_s": one["o_step_grad_projection_s"],
                             "sides_chosen": sorted({str(s.get("side")) for s in one["streams"]})}
            if side == args.sides[0]:
                entry = {"num_experts": M, **by_side[side],
                         "o_step_projector_update_and_exchange_s": one["o_step_projector_update_and_exchange_s"],
                         "projector_bytes_per_rank": one["projector_bytes_per_rank"],
                         "exchange_bytes_per_o_step": one["exchange_bytes_per_o_step"],
                         "projector_storage": one["projector_storage"]}
        forced = [by_side[s]["o_step_extra_s"] for s in ("gradient", "token") if s in by_side]
        if forced and "auto" in by_side:
            entry["auto_over_cheaper_forced_o_step"] = by_side["auto"]["o_step_s"] / min(
                by_side[s]["o_step_s"] for s in ("gradient", "token") if s in by_side)
        entry["by_side"] = by_side
        entry["bench_seconds"] = time.perf_counter() - started
        report["by_experts"].append(entry)
    first = report["by_experts"][0]
    for entry in report["by_experts"]:
        entry["o_step_extra_over_first"] = entry["o_step_extra_s"] / first["o_step_extra_s"]
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--o-steps-before", type=int, default=200)
    parser.add_argument("--sides", nargs="+", choices=["auto", "gradient", "token"], default=["auto", "gradient", "token"],
                        help="omoe.projection_side runs per M; the first gives the entry's figures")
    cli(__file__, parser, worker,
        lambda args: ["--experts", *map(str, args.experts), "--o-steps-before", str(args.o_steps_before),
                      "--sides", *args.sides])
