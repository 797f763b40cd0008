"""Every collective OMoE issues, and nothing else. Math lives in projector.py.

All ops go through deepspeed.comm, so DeepSpeed's comms logger (config section "comms_logger")
records them under the log names below; bench/step_overhead.py reads its byte counts from there.
"""
from __future__ import annotations

import os
import socket

import deepspeed
import torch
import deepspeed.comm as dist
from deepspeed.utils import groups

ROUTING_COUNTS_LOG = "omoe_routing_counts"
WINDOW_REDUCE_LOG = "omoe_window_allreduce"
FACTOR_GATHER_LOG = "omoe_factor_allgather"
O_STEP_LOGS = (WINDOW_REDUCE_LOG, FACTOR_GATHER_LOG)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def ep_group(ep_size: int):
    return groups._get_expert_parallel_group(f"ep_size_{ep_size}")


def edp_group(ep_size: int):
    return groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")


def ep_rank(ep_size: int) -> int:
    """This rank's position in its EP group; it owns experts ep_rank·E_local … (ep_rank+1)·E_local − 1."""
    return dist.get_rank(group=ep_group(ep_size)) if ep_size > 1 else 0


def routed_counts_to_local_experts(sent_counts: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Per source rank, how many tokens it routed to each of my local experts.

    sent_counts[e] is what this rank sends to global expert e; the result is [ep_size, E_local]
    because the MoE all-to-all delivers rank g's block for my experts at index g.
    """
    counts = sent_counts.to(torch.int64).reshape(ep_size, -1).contiguous()
    if ep_size == 1:
        return counts
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=ep_group(ep_size), log_name=ROUTING_COUNTS_LOG)
    return received


def sum_over_expert_replicas_(flat: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Sum window input sums and token counts over the expert-data-parallel group, so every replica
    of an expert derives the same mean input and therefore the same projector."""
    group = edp_group(ep_size)
    if _group_size(group) > 1:
        dist.all_reduce(flat, group=group, log_name=WINDOW_REDUCE_LOG)
    return flat


def gather_over_ep(local_rows: torch.Tensor, ep_size: int, log_name: str = "omoe_gather_over_ep") -> torch.Tensor:
    """All-gather per-local-expert rows [E_local, N] over the EP group into [M, N], global-expert order."""
    if ep_size == 1:
        return local_rows
    gathered = local_rows.new_empty((ep_size * local_rows.shape[0], local_rows.shape[1]))
    dist.all_gather_into_tensor(gathered, local_rows.contiguous(), group=ep_group(ep_size), log_name=log_name)
    return gathered


def gather_factors(local_factors: torch.Tensor, ep_size: int) -> torch.Tensor:
    """The O-step exchange: every expert's rank-1 factor, never the dense projectors."""
    return gather_over_ep(local_factors, ep_size, log_name=FACTOR_GATHER_LOG)


def broadcast_from_rank0(tensor: torch.Tensor, log_name: str = "omoe_metric_broadcast") -> torch.Tensor:
    """Rank 0's tensor on every rank, its row count included (other ranks' rows may differ and are dropped)."""
    if world_size() == 1:
        return tensor
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    dist.broadcast(rows, 0, log_name=log_name)
    shared = tensor.contiguous() if rank() == 0 else tensor.new_empty((int(rows), *tensor.shape[1:]))
    if shared.numel():
        dist.broadcast(shared, 0, log_name=log_name)
    return shared


def sum_over_world_(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, log_name="omoe_metric_allreduce")
    return tensor


LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


def free_local_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a master address of our own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(dist_init_required=None) -> None:
    """deepspeed.init_distributed, plus a one-process gloo group when no launcher, MPI or Slurm set the
    rank: DeepSpeed would otherwise fall into MPI discovery and fail on a missing mpi4py."""
    if not torch.distributed.is_initialized() and not any(k in os.environ for k in LAUNCHER_ENV):
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_local_port())), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_init_required=dist_init_required)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (evaluation outputs of sharded eval sets)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
