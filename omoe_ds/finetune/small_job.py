"""AdamW vs OMoE on the small MoE classifier, expert-parallel through the deepspeed launcher.

    deepspeed --num_gpus 2 --master_port 29610 --module omoe_ds.small_job \
        --deepspeed_config ds_configs/omoe_zero2.json --ep-size 2 --steps 300

(on CPU, export DS_ACCELERATOR=cpu). Both runs share seed, data and budget; rank 0 prints a table
and writes --out as JSON. With --rank-out DIR every rank also writes DIR/rank<R>.json: where it ran
(rank, local rank, node rank and the launcher env that gave it, hostname, the ssh address it was started
through, MASTER_ADDR/PORT) and its final parameters, flattened, for each run, so launches can be compared
exactly (tests/multinode).

The file also runs as a script (`python omoe_ds/small_job.py …`), for launchers that cannot pass
`--module` (DeepSpeed 0.19.8's `--launcher mpich` and `--launcher slurm`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import time

import deepspeed
import torch

from ..core import collectives
from ..core.config import resolve_ds_config
from ..initialize import initialize
from ..experts import find_expert_layers
from ..studies.diversity import expert_parameter_variance, mean_param_variance
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


# What a launcher tells a rank about where it runs; recorded by --rank-out.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "OMPI_COMM_WORLD_NODE_RANK", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_JOB_ID", "SSH_CONNECTION")


def launch_address() -> str | None:
    """The address this rank was started through when an ssh login started it (pdsh, OpenMPI's prted,
    MPICH's hydra proxy): the server side of SSH_CONNECTION; None otherwise."""
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[2] if len(parts) == 4 else None


def host_identity() -> str:
    """Which host this rank is on: the hostname, refined by the ssh address or Slurm node name it was
    started for (several "hosts" can share one machine, e.g. loopback addresses in tests)."""
    where = launch_address() or os.environ.get("SLURMD_NODENAME") or ""
    return f"{socket.gethostname()}/{where}"


def node_rank() -> tuple[int, str]:
    """(this rank's node index, where it came from). The launcher's word when it gives one (DeepSpeed's
    CROSS_RANK, Slurm's SLURM_NODEID, torchrun's GROUP_RANK); MPI launchers give none, so then it is the
    position of this rank's host among the distinct hosts of all ranks in rank order. Collective."""
    for key in ("CROSS_RANK", "SLURM_NODEID", "GROUP_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]), key
    hosts = collectives.gather_objects(host_identity())
    return list(dict.fromkeys(hosts)).index(host_identity()), "derived: distinct hosts of the ranks in rank order"


def flat_parameters(module) -> dict:
    """Every parameter of this rank's module (its local experts under EP), flattened, as floats."""
    return {name: p.detach().float().reshape(-1).tolist() for name, p in module.named_parameters()}


def fail_here(rank: int, step: int, args) -> None:
    """--fail-rank: this rank dies with --fail-code after --fail-at-step steps of the first run, mid-job
    (its peers are then inside a collective), as a crashed rank would."""
    if args.fail_rank == rank and step == args.fail_at_step:
        print(f"small_job: rank {rank} on {host_identity()} exits with code {args.fail_code} at step {step} "
              f"(--fail-rank {rank})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(args.fail_code)


def run_one(ds_config: dict, spec: SmallMoESpec, ep_size: int, steps: int, seed: int, lr: float, data,
            on_step=None, keep_params: bool = False) -> dict:
    torch.manual_seed(seed)
    model = SmallMoEClassifier(spec, ep_size=ep_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config)
    global_batch = engine.train_batch_size()
    (x_train, y_train), (x_test, y_test) = data
    start = time.perf_counter()
    losses = train(engine, x_train, y_train, steps, global_batch, on_step=on_step)
    seconds = time.perf_counter() - start
    variance = mean_param_variance(expert_parameter_variance(find_expert_layers(engine.module)))
    result = {"optimizer": "omoe" if engine.omoe is not None else "adamw", "steps": steps,
              "final_loss": sum(losses[-10:]) / len(losses[-10:]), "train_seconds": seconds,
              "test_accuracy": accuracy(engine, x_test, y_test), "expert_param_variance": variance}
    if keep_params:
        result["losses"] = losses
        result["params"] = flat_parameters(engine.module)
    return result


def write_rank_record(directory: str, args, results: list) -> None:
    """DIR/rank<R>.json: where this rank ran, and its per-run losses and final parameters."""
    rank, world = data_parallel_rank_and_size()
    node, node_source = node_rank()
    record = {"rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", args.local_rank)),
              "node_rank": node, "node_rank_source": node_source, "hostname": socket.gethostname(),
              "launch_address": launch_address(), "host_identity": host_identity(), "pid": os.getpid(),
              "master_addr": os.environ.get("MASTER_ADDR"), "master_port": os.environ.get("MASTER_PORT"),
              "env": {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ}, "ep_size": args.ep_size,
              "steps": args.steps, "runs": results}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here (rank 0)")
    parser.add_argument("--rank-out", default=None, metavar="DIR",
                        help="every rank writes DIR/rank<R>.json: where it ran and its final parameters")
    parser.add_argument("--fail-rank", type=int, default=None, help="(failure drills) this rank exits mid-job")
    parser.add_argument("--fail-at-step", type=int, default=1, help="with --fail-rank: after this many steps")
    parser.add_argument("--fail-code", type=int, default=3, help="with --fail-rank: its exit status")
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
        on_step = None
        if args.fail_rank is not None and not enabled:
            on_step = lambda engine, step: fail_here(data_parallel_rank_and_size()[0], step + 1, args)  # noqa: E731
        results.append(run_one(config, spec, args.ep_size, args.steps, args.seed, args.lr, data, on_step=on_step,
                               keep_params=args.rank_out is not None))
    if args.rank_out:
        write_rank_record(args.rank_out, args, results)
        for r in results:
            r.pop("params", None)
            r.pop("losses", None)
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


def cli(argv=None):
    """The command: the job, then every rank leaves the process group together (collectives.shutdown).
    main() alone leaves the group up for callers that go on using it."""
    main(argv)
    collectives.shutdown()


if __name__ == "__main__":
    cli()
