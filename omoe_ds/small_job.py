"""AdamW vs OMoE on the small MoE classifier, expert-parallel through the deepspeed launcher.

    deepspeed --num_gpus 2 --master_port 29610 --module omoe_ds.small_job \
        --deepspeed_config ds_configs/omoe_zero2.json --ep-size 2 --steps 300

(on CPU, export DS_ACCELERATOR=cpu). Both runs share seed, data and budget; rank 0 prints a table
and writes --out as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import deepspeed
import torch

from . import collectives, initialize
from .config import resolve_ds_config
from .diversity import expert_parameter_variance, mean_param_variance
from .moe_layers import find_moe_layers
from .small_moe import SmallMoEClassifier, SmallMoESpec, make_task


def data_parallel_rank_and_size():
    import deepspeed.comm as dist
    return dist.get_rank(), dist.get_world_size()


def micro_batches(x, y, step: int, global_batch: int, gas: int):
    """This rank's micro-batches of global step `step`: the same global batch for any world size."""
    rank, world = data_parallel_rank_and_size()
    n = x.shape[0]
    idx = (torch.arange(global_batch) + step * global_batch) % n
    per_micro = global_batch // gas
    per_rank = per_micro // world
    for k in range(gas):
        rows = idx[k * per_micro + rank * per_rank: k * per_micro + (rank + 1) * per_rank]
        yield x[rows], y[rows]


def model_dtype(engine) -> torch.dtype:
    """bf16 configs train a bf16 model; inputs must match it."""
    return next(engine.module.parameters()).dtype


def train(engine, x, y, steps: int, global_batch: int, on_step=None) -> list:
    gas = engine.gradient_accumulation_steps()
    dtype = model_dtype(engine)
    losses = []
    engine.train()
    for step in range(steps):
        for xb, yb in micro_batches(x, y, step, global_batch, gas):
            loss = engine(xb.to(dtype), yb)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().item())
        if on_step is not None:
            on_step(engine, step)
    return losses


@torch.no_grad()
def accuracy(engine, x, y, batch: int = 256) -> float:
    """Every rank evaluates its shard (the MoE all-to-all needs all ranks), then the counts are summed."""
    rank, world = data_parallel_rank_and_size()
    engine.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    shard = torch.arange(rank, x.shape[0], world)
    for i in range(0, max(len(shard), 1), batch):
        rows = shard[i:i + batch]
        pred = engine.module.logits(x[rows].to(model_dtype(engine))).argmax(-1)
        correct += torch.tensor([(pred == y[rows]).sum().item(), len(rows)], dtype=torch.float64)
    engine.train()
    collectives.sum_over_world_(correct)
    return float(correct[0] / correct[1])


def run_one(ds_config: dict, spec: SmallMoESpec, ep_size: int, steps: int, seed: int, lr: float, data) -> dict:
    torch.manual_seed(seed)
    model = SmallMoEClassifier(spec, ep_size=ep_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config)
    global_batch = engine.train_batch_size()
    (x_train, y_train), (x_test, y_test) = data
    start = time.perf_counter()
    losses = train(engine, x_train, y_train, steps, global_batch)
    seconds = time.perf_counter() - start
    variance = mean_param_variance(expert_parameter_variance(find_moe_layers(engine.module)))
    return {"optimizer": "omoe" if engine.omoe is not None else "adamw", "steps": steps,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "train_seconds": seconds,
            "test_accuracy": accuracy(engine, x_test, y_test), "expert_param_variance": variance}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    ds_config = resolve_ds_config(args)
    spec = SmallMoESpec()
    data = make_task(spec, 4096, seed=args.seed), make_task(spec, 1024, seed=args.seed + 1)
    results = []
    for enabled in (False, True):
        config = copy.deepcopy(ds_config)
        config.setdefault("omoe", {})["enabled"] = enabled
        results.append(run_one(config, spec, args.ep_size, args.steps, args.seed, args.lr, data))
    rank, world = data_parallel_rank_and_size()
    if rank == 0:
        print(f"\nsmall MoE classifier: {spec.num_layers} MoE layers x {spec.num_experts} experts, "
              f"EP={args.ep_size} on {world} ranks, {args.steps} steps, seed {args.seed}")
        print(f"{'optimizer':<10}{'test acc':>10}{'final loss':>12}{'train s':>10}{'expert var':>14}")
        for r in results:
            print(f"{r['optimizer']:<10}{r['test_accuracy']:>10.4f}{r['final_loss']:>12.4f}"
                  f"{r['train_seconds']:>10.1f}{r['expert_param_variance']:>14.3e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"spec": spec.__dict__, "ep_size": args.ep_size, "world_size": world, "runs": results}, f,
                          indent=2)


if __name__ == "__main__":
    main()
