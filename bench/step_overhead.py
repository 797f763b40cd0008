"""OMoE step overhead vs AdamW: same MoE model, same data, 2 ranks at EP=2, one launch. Prints one JSON object.

    python bench/step_overhead.py                            # small, minilm_realistic, bert_base_realistic
    python bench/step_overhead.py --shapes small             # only the small test model
    python bench/step_overhead.py --shapes bert_base_realistic --o-steps-before 0 200

Shapes (FFN experts, top-1, 4 experts, ZeRO-2, s = 5):
- "small": the test model (d_model 32, d_ff 64, 2 layers, 128 tokens per rank);
- "minilm_realistic": MiniLM's FFN (d 384, ff 1536), 6 layers, 4096 tokens per rank (32 × 128);
- "bert_base_realistic": BERT-base's FFN (d 768, ff 3072), 4096 tokens per rank, 2 of its 12 layers
  (the per-layer costs are reported: a full 12-layer run does not fit this machine's time budget);
- "bert_base": BERT-base FFN, all 12 layers, 128 tokens per rank (the figure of earlier READMEs).
Each shape runs AdamW, then OMoE with the projector state of a fresh run (t = 0 O steps) and of a long
one (t = 200, by default): the long state is built before timing by 200 RLS updates from random window
means, the updates a run would have made. The top-level OMoE keys are the longest state's; `by_o_steps`
holds each. Step times are medians of barrier-to-barrier wall time per optimizer step; the AdamW engine
stays alive and takes its step on the same batch in turn with each OMoE step (who goes first rotates), so the
two are compared seconds apart (run one after the other, their medians moved by ±10–20% against each other on
this shared machine). At the small shape a second AdamW engine takes its turn too, as a control: two engines
built alike read ~3% apart here (`adamw_control_over_adamw_paired_median`), which bounds what the R-step ratio
can resolve at that shape. Exchange bytes come from DeepSpeed's comms logger (what each rank's collectives
sent); the dense figure is what each rank would send to all-gather its local experts' dense projectors instead.
Each OMoE engine is destroyed before the next is built, and DeepSpeed's /dev/shm all-reduce buffers of the
launch are removed after it.
"""
import argparse
import gc
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # 401 steps (~20 s per engine): with 81, the R step over AdamW moved by ±7% between runs here
    "small": dict(d_in=16, d_model=32, d_ff=64, num_layers=2, num_experts=4, seq_len=8, steps=401, micro_batch=16),
    # 21 steps: 16 R and 4 O steps timed; with 11, medians of 8 and 2 moved by ±10% between runs here
    "minilm_realistic": dict(d_in=32, d_model=384, d_ff=1536, num_layers=6, num_experts=4, seq_len=128, steps=21,
                             micro_batch=32),
    "bert_base_realistic": dict(d_in=32, d_model=768, d_ff=3072, num_layers=2, num_experts=4, seq_len=128, steps=21,
                                micro_batch=32),
    "bert_base": dict(d_in=32, d_model=768, d_ff=3072, num_layers=12, num_experts=4, seq_len=16, steps=11, micro_batch=8),
}
DEFAULT_SHAPES = ["small", "minilm_realistic", "bert_base_realistic"]
CONTROL_SHAPES = {"small"}  # shapes that also time a second AdamW engine against the first
SKIP_STEP = 5


def launch_self(script, worker_args) -> str:
    """Run `script --worker-out FILE worker_args` on 2 CPU ranks; print and return the JSON rank 0 wrote."""
    # Not environment.free_local_port: importing omoe_ds imports deepspeed, which logs to stdout before our JSON.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               os.path.abspath(script), "--worker-out", out, *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("DS_ACCELERATOR", "cpu")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        finally:  # DeepSpeed 0.19.8's CPU shm all-reduce never unlinks its buffers (see studies/sweep.py)
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
                os.remove(path)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
            sys.exit(proc.returncode)
        printed = open(out).read()
        print(printed)
        return printed


def preapply_o_steps(omoe, o_steps: int, seed: int = 0) -> None:
    """Give every projector the state of `o_steps` O steps: RLS updates from random window means, each
    expert's factor from its own P_j (kept here for every expert, local or not), applied through the store
    exactly as the exchange applies them. Same seed on every rank: every rank holds the same factors."""
    import torch
    from omoe_ds.core import projector
    g = torch.Generator().manual_seed(seed)
    for L, layer in enumerate(omoe.layers):
        for s, stream in enumerate(layer.streams):
            store, M, n = omoe.projectors[L][s], layer.num_experts, stream.n
            V = torch.zeros(M, n, 0, dtype=projector.PROJECTOR_DTYPE)
            for t in range(o_steps):
                alpha = omoe.alpha((t + 1) * omoe.config.skip_step)
                means = [projector.augmented_mean(torch.randn(stream.d_in, generator=g), 1.0, stream.has_bias)
                         for _ in range(M)]
                U = torch.stack([projector.rls_factor_from(x - V[j] @ (V[j].T @ x), x, alpha)
                                 for j, x in enumerate(means)])  # [M, n]
                store.apply_factors_(U)
                V = torch.cat([V, U.unsqueeze(-1)], dim=2)
            omoe.o_steps_done = o_steps


def time_steps(engine, x, y, steps, micro_batch, world, enabled, paired=()):
    """Wall time of each optimizer step, its kind, and the O steps' exchange and projection seconds. Each engine
    in `paired` (AdamW, and at the small shape a second AdamW as a control) takes a timed step on the same batch
    in turn with `engine`'s, in an order that rotates every step, so a drift in the machine's speed and the cost
    of stepping first or second fall on all alike; their times come back per engine."""
    import deepspeed.comm as dist
    from omoe_ds.finetune.small_job import micro_batches

    def timed_step(e, xb, yb):
        dist.barrier()
        start = time.perf_counter()
        e.backward(e(xb, yb))
        e.step()
        dist.barrier()
        return time.perf_counter() - start

    times, kinds, exchange_s, projection_s = [], [], [], []
    paired_times = [[] for _ in paired]
    for step in range(steps):
        xb, yb = next(micro_batches(x, y, step, micro_batch * world, 1))
        turn = [-1, *range(len(paired))]  # -1: the measured engine
        for who in turn[step % len(turn):] + turn[:step % len(turn)]:
            if who >= 0:
                paired_times[who].append(timed_step(paired[who], xb, yb))
                continue
            if enabled:
                engine.omoe.projection_seconds[0] = 0.0
            times.append(timed_step(engine, xb, yb))
            is_o = enabled and engine.omoe.config.is_o_step(step)
            kinds.append("O" if is_o else "R")
            if is_o:
                exchange_s.append(engine.omoe.exchange_seconds)
                projection_s.append(engine.omoe.projection_seconds[0])
    timed = list(zip(times, kinds))[1:]  # step 0 pays one-off allocation costs
    paired_times = [each[1:] for each in paired_times]
    r_over_first = [t / a for (t, k), a in zip(timed, paired_times[0]) if k == "R"] if paired else []
    return ([t for t, k in timed if k == "R"], [t for t, k in timed if k == "O"], exchange_s, projection_s,
            paired_times, r_over_first)


def build_engine(spec, micro_batch, omoe_config):
    import torch
    import omoe_ds
    from omoe_ds.core import collectives
    from omoe_ds.finetune.small_moe import SmallMoEClassifier
    torch.manual_seed(0)
    model = SmallMoEClassifier(spec, ep_size=2)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 2},
              "comms_logger": {"enabled": True, "prof_all": False, "verbose": False,
                               "prof_ops": list(collectives.O_STEP_LOGS)},
              "omoe": omoe_config}
    engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                    config=config)
    return engine


def free_engine(holder: list) -> None:
    """Destroy the engine in holder[0] and drop the last reference to it before collecting: a caller's own
    variable would keep its model and Adam state alive beside the next engine (M = 64: 3.4 GB per rank)."""
    holder.pop().destroy()
    gc.collect()


def stream_report(engine):
    """Per (layer, stream): storage form, O steps held, bytes, and the projection side where reported."""
    return [{k: r[k] for k in ("layer", "stream", "form", "o_steps", "bytes", "dense_bytes", "side") if k in r}
            for r in engine.omoe.storage_report()]


def measure_omoe(spec, x, y, steps, micro_batch, world, o_steps_before, omoe_extra=None, freeze=True, paired=()):
    """OMoE's step times and bytes with the projectors first advanced by `o_steps_before` O steps; with
    `paired` ([AdamW engine] or [AdamW engine, a second one]), also AdamW's steps taken in turn with OMoE's
    (`adamw_step_s`), and the second AdamW engine's against the first (`adamw_control_over_adamw_paired_median`)."""
    from deepspeed.comm.comm import comms_logger
    from omoe_ds.core import collectives
    holder = [build_engine(spec, micro_batch, {"enabled": True, "skip_step": SKIP_STEP, **(omoe_extra or {})})]
    engine = holder[0]
    engine.omoe.freeze_dense_in_o_steps = freeze
    preapply_o_steps(engine.omoe, o_steps_before)
    comms_logger.comms_dict.clear()
    r_times, o_times, exchange_s, projection_s, paired_times, r_ratios = time_steps(engine, x, y, steps, micro_batch,
                                                                                    world, True, paired)
    adamw_times = paired_times[0] if paired_times else []
    control = {}
    if len(paired_times) > 1:  # two AdamW engines built alike: how far apart this machine times identical steps
        control = {"adamw_control_over_adamw_paired_median":
                   statistics.median(c / a for c, a in zip(paired_times[1], adamw_times))}
    logged = comms_logger.comms_dict
    bytes_of = lambda name: sum(size * rec[0] for size, rec in logged.get(name, {}).items())  # noqa: E731
    layer_n = [spec.d_model + 1, spec.d_ff + 1]
    streams = stream_report(engine)
    result = {
        "o_steps_before": o_steps_before, "r_step_s": statistics.median(r_times), "o_step_s": statistics.median(o_times),
        **({"adamw_step_s": statistics.median(adamw_times),
            # each R step over the AdamW step on the same batch, taken in turn: steadier than a ratio of medians
            "r_step_over_adamw_paired_median": statistics.median(r_ratios), **control} if adamw_times else {}),
        "o_steps_timed": len(o_times),
        "o_step_projector_update_and_exchange_s": statistics.median(exchange_s),
        "o_step_grad_projection_s": statistics.median(projection_s),
        "exchange_bytes_per_o_step": sum(bytes_of(n) for n in collectives.O_STEP_LOGS) / len(o_times),
        # per rank sent: its E_local dense n×n projectors per weight, were they all-gathered instead
        "dense_allgather_bytes_per_o_step": 4 * spec.num_layers * (spec.num_experts // 2) * sum(n * n for n in layer_n),
        # measured on the store (core/projector_state.py), after the timed O steps
        "projector_bytes_per_rank": sum(r["bytes"] for r in streams),
        "dense_projector_bytes_per_rank": sum(r["dense_bytes"] for r in streams),
        "projector_storage": sorted({r["form"] for r in streams}),
        "streams": streams,
    }
    del engine
    free_engine(holder)
    return result


def worker(args):
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from omoe_ds.finetune.small_moe import SmallMoESpec, make_task

    deepspeed.init_distributed()
    world = dist.get_world_size()
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
                         f"{world} ranks x OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              "ep_size": 2, "skip_step": SKIP_STEP, "zero_stage": 2}
    for shape_name in args.shapes:
        shape = dict(SHAPES[shape_name])
        steps, micro_batch = shape.pop("steps"), shape.pop("micro_batch")
        spec = SmallMoESpec(num_classes=6, **shape)
        x, y = make_task(spec, micro_batch * world * steps, seed=0)
        started = time.perf_counter()
        result = {"shapes": {**shape, "tokens_per_rank": micro_batch * spec.seq_len, "micro_batch_per_rank": micro_batch,
                             "timed_steps": steps - 1}}
        # AdamW stays alive and steps in turn with each OMoE engine: every ratio compares steps taken seconds apart.
        # At the small shape a second AdamW engine steps with them: its ratio to the first is the noise floor
        # (two engines built alike read up to 3% apart here, more than OMoE's R-step hooks cost at that shape).
        adamw = [build_engine(spec, micro_batch, {"enabled": False})
                 for _ in range(2 if shape_name in CONTROL_SHAPES else 1)]
        by_t = {}
        for t in args.o_steps_before:
            by_t[str(t)] = one = measure_omoe(spec, x, y, steps, micro_batch, world, t, paired=adamw)
            cycle = ((SKIP_STEP - 1) * one["r_step_s"] + one["o_step_s"]) / SKIP_STEP
            one["throughput_ratio_omoe_over_adamw"] = one["adamw_step_s"] / cycle
            one["r_step_over_adamw"] = one["r_step_s"] / one["adamw_step_s"]
            one["o_step_extra_s_per_layer"] = (one["o_step_s"] - one["r_step_s"]) / spec.num_layers
            one["dense_over_factor_bytes"] = one["dense_allgather_bytes_per_o_step"] / one["exchange_bytes_per_o_step"]
        result["adamw_step_s"] = statistics.median(one["adamw_step_s"] for one in by_t.values())
        longest = by_t[str(max(args.o_steps_before))]
        result.update({k: v for k, v in longest.items() if k not in ("streams", "adamw_step_s")})
        result["by_o_steps"] = by_t
        if shape_name == "small":  # dense weight gradients computed and discarded in O steps: what freezing saves
            unfrozen = measure_omoe(spec, x, y, steps, micro_batch, world, 0, freeze=False, paired=adamw[:1])
            result["o_step_s_without_dense_freeze"] = unfrozen["o_step_s"]
            result["o_step_saved_by_dense_freeze_s"] = unfrozen["o_step_s"] - by_t[str(min(args.o_steps_before))]["o_step_s"]
        while adamw:
            free_engine(adamw)
        result["bench_seconds"] = time.perf_counter() - started
        report[shape_name] = result
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(report, f, indent=1)


def cli(script, parser, worker, forwarded):
    """As a launched rank (--worker-out), run worker(args); else launch `script` on 2 ranks with forwarded(args).
    Returns the parsed args and, in the launching process, the JSON text the ranks wrote."""
    parser.add_argument("--worker-out", default=None)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return args, None
    return args, launch_self(script, forwarded(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=DEFAULT_SHAPES)
    parser.add_argument("--o-steps-before", nargs="+", type=int, default=[0, 200],
                        help="projector states to time: O steps applied before timing (default 0 200)")
    cli(__file__, parser, worker,
        lambda args: ["--shapes", *args.shapes, "--o-steps-before", *map(str, args.o_steps_before)])
