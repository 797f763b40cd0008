"""OMoE step overhead vs AdamW: same MoE model, same data, 2 ranks at EP=2, one run. Prints one JSON object.

    python bench/step_overhead.py                 # launches itself: deepspeed --num_gpus 2 (CPU/gloo here)
    python bench/step_overhead.py --shapes small  # only the small model

Each shape runs AdamW, OMoE, and OMoE with the O-step dense freeze off (dense weight gradients computed
and discarded) to measure what not computing them saves. Shapes: "small" (the test model) and "bert_base" (BERT-base FFN: d_model 768, d_ff 3072, 4 experts,
12 MoE layers; few steps). Step times are medians of barrier-to-barrier wall time per optimizer step.
Exchange bytes come from DeepSpeed's comms logger: what each rank's collectives actually sent (the
input tensor of each all-gather / all-reduce). The dense figure is what each rank would send to
all-gather its local experts' dense projectors instead.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "small": dict(d_in=16, d_model=32, d_ff=64, num_layers=2, num_experts=4, seq_len=8, steps=81, micro_batch=16),
    "bert_base": dict(d_in=32, d_model=768, d_ff=3072, num_layers=12, num_experts=4, seq_len=16, steps=11, micro_batch=8),
}
SKIP_STEP = 5


def launch_self(args):
    # Not environment.free_local_port: importing omoe_ds imports deepspeed, which logs to stdout before our JSON.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               os.path.abspath(__file__), "--worker-out", out, "--shapes", *args.shapes]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("DS_ACCELERATOR", "cpu")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
            sys.exit(proc.returncode)
        print(open(out).read())


def worker(args):
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from deepspeed.comm.comm import comms_logger

    import omoe_ds
    from omoe_ds.core import collectives
    from omoe_ds.finetune.small_job import micro_batches
    from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec, make_task

    deepspeed.init_distributed()
    world = dist.get_world_size()
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
                         f"{world} ranks x OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              "ep_size": 2, "skip_step": SKIP_STEP}
    for shape_name in args.shapes:
        shape = dict(SHAPES[shape_name])
        steps, micro_batch = shape.pop("steps"), shape.pop("micro_batch")
        spec = SmallMoESpec(num_classes=6, **shape)
        x, y = make_task(spec, micro_batch * world * steps, seed=0)
        result = {"shapes": {**shape, "micro_batch_per_rank": micro_batch, "timed_steps": steps}}
        # "omoe_no_freeze": dense weight gradients still computed (and discarded) in O steps, to measure the saving.
        for variant in ("adamw", "omoe", "omoe_no_freeze"):
            enabled = variant != "adamw"
            torch.manual_seed(0)
            model = SmallMoEClassifier(spec, ep_size=2)
            config = {"train_micro_batch_size_per_gpu": micro_batch, "steps_per_print": 10 ** 9,
                      "zero_optimization": {"stage": 2},
                      "comms_logger": {"enabled": True, "prof_all": False, "verbose": False,
                                       "prof_ops": list(collectives.O_STEP_LOGS)},
                      "omoe": {"enabled": enabled, "skip_step": SKIP_STEP}}
            engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                            config=config)
            if variant == "omoe_no_freeze":
                engine.omoe.freeze_dense_in_o_steps = False
            comms_logger.comms_dict.clear()
            times, kinds, exchange_s, projection_s = [], [], [], []
            for step in range(steps):
                xb, yb = next(micro_batches(x, y, step, micro_batch * world, 1))
                dist.barrier()
                start = time.perf_counter()
                if enabled:
                    engine.omoe.projection_seconds[0] = 0.0
                engine.backward(engine(xb, yb))
                engine.step()
                dist.barrier()
                times.append(time.perf_counter() - start)
                is_o = enabled and engine.omoe.config.is_o_step(step)
                kinds.append("O" if is_o else "R")
                if is_o:
                    exchange_s.append(engine.omoe.exchange_seconds)
                    projection_s.append(engine.omoe.projection_seconds[0])
            timed = list(zip(times, kinds))[1:]  # step 0 pays one-off allocation costs
            r_times = [t for t, k in timed if k == "R"]
            if not enabled:
                result["adamw_step_s"] = statistics.median(r_times)
                result["adamw_mean_step_s"] = statistics.mean(r_times)
                continue
            o_times = [t for t, k in timed if k == "O"]
            if variant == "omoe_no_freeze":
                result["o_step_s_without_dense_freeze"] = statistics.median(o_times)
                result["o_step_saved_by_dense_freeze_s"] = result["o_step_s_without_dense_freeze"] - result["o_step_s"]
                continue
            n_o = len(o_times)
            logged = comms_logger.comms_dict
            bytes_of = lambda name: sum(size * rec[0] for size, rec in logged.get(name, {}).items())  # noqa: E731
            layer_n = [spec.d_model + 1, spec.d_ff + 1]
            r_step = statistics.median(r_times)
            o_step = statistics.median(o_times)
            cycle_omoe = ((SKIP_STEP - 1) * r_step + o_step) / SKIP_STEP
            result.update({
                "r_step_s": r_step, "o_step_s": o_step, "o_steps_timed": n_o,
                "o_step_projector_update_and_exchange_s": statistics.median(exchange_s),
                "o_step_grad_projection_s": statistics.median(projection_s),
                "throughput_ratio_omoe_over_adamw": result["adamw_step_s"] / cycle_omoe,
                "exchange_bytes_per_o_step": sum(bytes_of(n) for n in collectives.O_STEP_LOGS) / n_o,
                # per rank sent, like the logged factor bytes: its E_local dense n×n projectors per weight
                "dense_allgather_bytes_per_o_step": 4 * spec.num_layers * (spec.num_experts // 2) * sum(n * n for n in layer_n),
                "projector_bytes_per_rank": 4 * spec.num_layers * (spec.num_experts // 2 + 1) * sum(n * n for n in layer_n),
            })
            result["dense_over_factor_bytes"] = result["dense_allgather_bytes_per_o_step"] / result["exchange_bytes_per_o_step"]
        report[shape_name] = result
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "bert_base"])
    parser.add_argument("--worker-out", default=None)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
    else:
        launch_self(args)
