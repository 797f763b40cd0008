"""O-step cost vs expert count: MiniLM FFN shapes, EP=2, the same 4096 tokens per rank at every M. One JSON object.

    python bench/expert_scaling.py                      # M = 4, 16, 64; t = 200 O steps of projector state
    python bench/expert_scaling.py --experts 4 16 --o-steps-before 0
    python bench/expert_scaling.py --o-steps-before 200 0 50 --plot docs/figures/o_step_overhead.png
    python bench/expert_scaling.py --merge a.json b.json --plot fig.png   # reports of split launches, one JSON

Each M runs OMoE (top-1 FFN experts, d 384, ff 1536, ZeRO-2, s = 5) on 2 of MiniLM's 6 layers, with
the projectors advanced by `--o-steps-before` RLS updates before timing (bench/step_overhead.py's
preapply_o_steps), once per `--sides` value of omoe.projection_side (auto, then each side forced).
`o_step_extra_s` is the O step's median time over the R step's (auto's; each side's in `by_side`), and
`auto_over_cheaper_forced_o_step` compares auto's O step with the faster forced side's. With several
`--o-steps-before` values, `by_experts` holds the first one's entries and `by_o_steps_before` every one's
(the forced sides run at the first t only); `--plot PNG` draws the O-step extra and the projection's
seconds vs M (a line per t) and vs t (a line per M). M = 128 would need about 15 GB of Adam state on this 24 GB machine, so the list
stops at 64.
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

    deepspeed.init_distributed()
    world = dist.get_world_size()
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
                         f"{world} ranks x OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              "ep_size": 2, "skip_step": SKIP_STEP, "zero_stage": 2, "o_steps_before": args.o_steps_before[0],
              "shapes": {**SHAPE, "tokens_per_rank": MICRO_BATCH * SHAPE["seq_len"], "timed_steps": STEPS - 1},
              "by_o_steps_before": {str(t): by_experts(args, t, world) for t in args.o_steps_before}}
    report["by_experts"] = report["by_o_steps_before"][str(args.o_steps_before[0])]
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(report, f, indent=1)


def by_experts(args, o_steps_before, world):
    """One entry per M, with the projectors advanced by `o_steps_before` O steps before timing."""
    from omoe_ds.finetune.small_moe import SmallMoESpec, make_task
    entries = []
    for M in args.experts:
        spec = SmallMoESpec(num_classes=6, num_experts=M, **SHAPE)
        x, y = make_task(spec, MICRO_BATCH * world * STEPS, seed=0)
        started = time.perf_counter()
        by_side = {}
        # "auto" first: the entry's figures; forced sides check its choice, at the first t only (time)
        for side in args.sides if o_steps_before == args.o_steps_before[0] else args.sides[:1]:
            one = measure_omoe(spec, x, y, STEPS, MICRO_BATCH, world, o_steps_before,
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
        entry["by_side"] = by_side
        entry["bench_seconds"] = time.perf_counter() - started
        entries.append(entry)
    return with_ratios(entries)


def with_ratios(entries):
    """Each entry's O-step extra over the smallest M's, and auto's O step over the faster forced side's."""
    entries = sorted(entries, key=lambda e: e["num_experts"])
    for entry in entries:
        entry["o_step_extra_over_first"] = entry["o_step_extra_s"] / entries[0]["o_step_extra_s"]
        by_side = entry["by_side"]
        forced = [by_side[s]["o_step_s"] for s in ("gradient", "token") if s in by_side]
        if forced and "auto" in by_side:
            entry["auto_over_cheaper_forced_o_step"] = by_side["auto"]["o_step_s"] / min(forced)
    return entries


def merge(reports):
    """One report from several launches' (M = 64's measurements outgrow this machine in one launch): entries
    of the same (t, M) pool their sides, the first report holding an M's auto run gives its figures."""
    merged = {k: v for k, v in reports[0].items() if k not in ("by_o_steps_before", "by_experts")}
    by_t = {}
    for report in reports:
        for t, entries in report["by_o_steps_before"].items():
            for entry in entries:
                by_m = by_t.setdefault(t, {})
                pooled = by_m.setdefault(entry["num_experts"], entry)
                if pooled is not entry:
                    sides = {**entry["by_side"], **pooled["by_side"]}
                    if "auto" in entry["by_side"] and "auto" not in pooled["by_side"]:
                        by_m[entry["num_experts"]] = pooled = entry
                    pooled["by_side"] = sides
    merged["by_o_steps_before"] = {t: with_ratios(list(by_m.values())) for t, by_m in by_t.items()}
    merged["by_experts"] = merged["by_o_steps_before"][str(merged["o_steps_before"])]
    return merged


def plot(report, path):
    """O-step extra seconds vs M (a line per projector state t) and vs t (a line per M), from the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_t = {int(t): entries for t, entries in report["by_o_steps_before"].items()}
    ts, ms = sorted(by_t), sorted({e["num_experts"] for entries in by_t.values() for e in entries})
    extra = {(t, e["num_experts"]): e["o_step_extra_s"] for t, entries in by_t.items() for e in entries}
    # The projection alone: the extra also nets out the dense weight gradients an O step does not compute.
    projection = {(t, e["num_experts"]): e["o_step_grad_projection_s"] for t, entries in by_t.items() for e in entries}
    fig, (vs_m, vs_t) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, t in enumerate(ts):  # merged launches may lack some (t, M): each line takes the points it has
        at = [m for m in ms if (t, m) in extra]
        vs_m.plot(at, [extra[t, m] for m in at], marker="o", color=f"C{i}", label=f"t = {t}: O step − R step")
        vs_m.plot(at, [projection[t, m] for m in at], ls="--", marker=".", color=f"C{i}", label=f"t = {t}: projection")
    for i, m in enumerate(ms):
        at = [t for t in ts if (t, m) in extra]
        vs_t.plot(at, [extra[t, m] for t in at], marker="o", color=f"C{i}", label=f"M = {m}: O step − R step")
        vs_t.plot(at, [projection[t, m] for t in at], ls="--", marker=".", color=f"C{i}", label=f"M = {m}: projection")
    vs_m.set_xscale("log", base=2)
    vs_m.set(xlabel="experts per layer M (EP = 2)", ylabel="seconds per O step", xticks=ms,
             xticklabels=[str(m) for m in ms])
    vs_t.set(xlabel="projector state t (O steps already taken)", ylabel="seconds per O step")
    for ax in (vs_m, vs_t):
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    shapes = report["shapes"]
    fig.suptitle(f"OMoE O-step overhead, projection_side auto: d {shapes['d_model']}, ff {shapes['d_ff']}, "
                 f"{shapes['num_layers']} layers, {shapes['tokens_per_rank']} tokens/rank ({report['machine']})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--o-steps-before", nargs="+", type=int, default=[200],
                        help="projector states to time (O steps applied before timing); the first fills by_experts")
    parser.add_argument("--plot", default=None, help="also write this PNG: O-step extra vs M and vs t")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: merge these reports of split launches, print it (and --plot it)")
    parser.add_argument("--sides", nargs="+", choices=["auto", "gradient", "token"], default=["auto", "gradient", "token"],
                        help="omoe.projection_side runs per M; the first gives the entry's figures")
    if "--merge" in sys.argv and "--worker-out" not in sys.argv:
        args = parser.parse_args()
        merged = merge([json.load(open(path)) for path in args.merge])
        print(json.dumps(merged, indent=1))
        if args.plot:
            plot(merged, args.plot)
        sys.exit(0)
    args, printed = cli(__file__, parser, worker,
                        lambda args: ["--experts", *map(str, args.experts), "--o-steps-before",
                                      *map(str, args.o_steps_before), "--sides", *args.sides])
    if printed is not None and args.plot:
        plot(json.loads(printed), args.plot)
