"""Every collective OMoE issues, and nothing else. Math lives in projector.py.

All ops go through deepspeed.comm, so DeepSpeed's comms logger (config section "comms_logger")
records them under the log names below; bench/step_overhead.py reads its byte counts from there.
"""
from __future__ import annotations

import torch
import deepspeed.comm as dist
from deepspeed.utils import groups

WINDOW_REDUCE_LOG = "omoe_window_allreduce"
FACTOR_GATHER_LOG = "omoe_factor_allgather"
O_STEP_LOGS = (WINDOW_REDUCE_LOG, FACTOR_GATHER_LOG)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def ep_group(ep_size: int):
    return groups._get_expert_parallel_group(f"ep_size_{ep_size}")


def ep_rank(ep_size: int) -> int:
    """This rank's position in its EP group; it owns experts ep_rank·E_local … (ep_rank+1)·E_local − 1."""
    return dist.get_rank(group=ep_group(ep_size)) if ep_size > 1 else 0


def max_over_group_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In place, the maximum over `group` (None: no parallel dimension): the k=2 gate's capacity without
    token dropping, as DeepSpeed's own top-2 gate computes it (unnamed in the comms log, as DeepSpeed's)."""
    if group is not None and _group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def sum_windows_over_world_(flat: torch.Tensor) -> torch.Tensor:
    """The one window exchange of an O step: every rank's partial sums, laid out per global expert
    (core/windows.py), summed over the whole world. Every rank gets every expert's totals, which sums over
    the EP group (x is recorded where tokens are sent) and over the EDP replicas (h where they run)."""
    if world_size() > 1:
        dist.all_reduce(flat, log_name=WINDOW_REDUCE_LOG)
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
    """In place, the sum over every rank of a metric tensor, wherever it lives (NCCL reduces device tensors
    only: on an accelerator a CPU tensor travels through it)."""
    if world_size() > 1:
        from deepspeed.accelerator import get_accelerator
        device = torch.device(get_accelerator().current_device_name())
        if device.type != "cpu" and tensor.device.type == "cpu":
            on_device = tensor.to(device)
            dist.all_reduce(on_device, log_name="omoe_metric_allreduce")
            return tensor.copy_(on_device)
        dist.all_reduce(tensor, log_name="omoe_metric_allreduce")
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together, at the end of a job. A rank that exits while a peer still holds
    its gloo pairs can be aborted in teardown ("terminate called without an active exception", seen once in
    CI): the barrier lets every rank finish its last collective first, and the explicit destroy tears the
    group down in the main thread instead of at interpreter exit."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (evaluation outputs of sharded eval sets)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
