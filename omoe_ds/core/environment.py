"""How a rank joins the job: the launcher's environment mapped onto a DeepSpeed process group.

init_distributed serves every way a rank can be started (see LAUNCHER_ENV); the collectives themselves are
in collectives.py.
"""
from __future__ import annotations

import os
import socket

import deepspeed
import torch

# A rank started by any of these has a rank in its env: DeepSpeed/torch launchers, OpenMPI, MPICH/Hydra (PMI),
# PMIx launchers, Slurm's srun. init_distributed maps each onto RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def free_local_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a master address of our own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(dist_init_required=None) -> None:
    """deepspeed.init_distributed for every way a rank can be started (see LAUNCHER_ENV):

    * a DeepSpeed or torch launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: used as is;
    * an MPI launcher (mpirun/mpiexec of OpenMPI or MPICH, `deepspeed --launcher openmpi`) set only its own
      OMPI_COMM_WORLD_* / PMI_* / PMIX_RANK: DeepSpeed's mpi4py discovery (auto_mpi_discovery=True) finds
      rank, world size and local rank. DeepSpeed would take rank 0's first `hostname -I` address and port
      29500 as the master; MASTER_ADDR / MASTER_PORT in the env (`mpirun -x`, .deepspeed_env) win over both.
      The launcher's local rank wins over DeepSpeed's hostname count, and MPI is finalized right after
      (gloo carries the job). Without mpi4py the launcher's rank variables are read directly (MASTER_ADDR
      is then required);
    * srun (SLURM_PROCID, no RANK): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR from the env
      or the job's first node, MASTER_PORT from the env or 29500;
    * nothing: a one-process gloo group (DeepSpeed would otherwise try MPI discovery and fail on a missing
      mpi4py).
    OMOE_DIST_TIMEOUT (seconds) bounds the rendezvous and every collective (DeepSpeed's default:
    DEEPSPEED_TIMEOUT minutes, 10). A rank that cannot join raises an error naming it, its host and the
    master address it tried; one still not joined after timeout + max(timeout, 60 s) exits (watchdog)."""
    import subprocess
    import sys
    from datetime import timedelta
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
    env = os.environ
    mpi_rank_env = [k for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") if k in env]
    required = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    kwargs = {}
    if env.get("OMOE_DIST_TIMEOUT"):
        kwargs["timeout"] = timedelta(seconds=float(env["OMOE_DIST_TIMEOUT"]))

    def first(*keys):
        return next((env[k] for k in keys if k in env), None)

    if not torch.distributed.is_initialized():
        if not any(k in env for k in LAUNCHER_ENV):
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_local_port())),
                               ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                env.setdefault(key, value)
        elif "RANK" not in env and "SLURM_PROCID" in env:
            if "MASTER_ADDR" not in env:
                nodes = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
                                       capture_output=True, text=True).stdout.split()
                env["MASTER_ADDR"] = nodes[0] if nodes else "127.0.0.1"
            env.setdefault("MASTER_PORT", str(TORCH_DISTRIBUTED_DEFAULT_PORT))
            env["RANK"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env.get("SLURM_LOCALID", "0")
            env["WORLD_SIZE"] = first("SLURM_NTASKS", "SLURM_NPROCS") or "1"
        elif mpi_rank_env and not all(k in env for k in required):
            master_addr = env.get("MASTER_ADDR")
            port = int(env.get("MASTER_PORT", TORCH_DISTRIBUTED_DEFAULT_PORT))
            kwargs["distributed_port"] = port
            try:
                import mpi4py  # noqa: F401
            except ImportError:
                if master_addr is None:
                    raise RuntimeError(f"started by an MPI launcher ({mpi_rank_env[0]}={env[mpi_rank_env[0]]}) "
                                       "without mpi4py and without MASTER_ADDR: pip install mpi4py (the [mpi] extra) "
                                       "or export MASTER_ADDR to the ranks (mpirun -x MASTER_ADDR=...)")
                env["RANK"] = first("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
                env["WORLD_SIZE"] = first("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE") or "1"
                env["LOCAL_RANK"] = first("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK") or "0"
                env["MASTER_PORT"] = str(port)
            else:  # DeepSpeed's mpi4py discovery (what auto_mpi_discovery=True runs), then two corrections
                from deepspeed.comm.comm import mpi_discovery
                from mpi4py import MPI
                mpi_discovery(distributed_port=port, verbose=False)
                if master_addr is not None:
                    env["MASTER_ADDR"] = master_addr
                # DeepSpeed counts same-hostname ranks for LOCAL_RANK; the launcher's own count is exact
                # (and DeepSpeed's engine asserts they agree under OpenMPI).
                local = first("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
                if local is not None:
                    env["LOCAL_RANK"] = local
                # MPI has done its part (gloo carries the job): finalize now, while every rank is here. Left
                # to exit time, MPI_Finalize is a barrier that a crashed peer's partners, stuck in gloo, never
                # reach, and Open MPI's progress thread slows the interpreter's teardown (tens of seconds).
                MPI.Finalize()
    import threading
    from deepspeed.constants import default_pg_timeout
    where = f"{socket.gethostname()}" + (f" (ssh {env['SSH_CONNECTION'].split()[2]})"
                                          if len(env.get("SSH_CONNECTION", "").split()) == 4 else "")
    who = (f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} on host {where}", f"process group at "
           f"MASTER_ADDR={env.get('MASTER_ADDR')} MASTER_PORT={env.get('MASTER_PORT')}")
    # The rendezvous can block past its timeout (a client connected to a port some other program holds
    # waits for a store reply forever): a watchdog ends this rank then, so a launch always ends. Its
    # limit leaves room for what DeepSpeed does before the rendezvous (loading its shm op, under a lock).
    timeout_s = (kwargs.get("timeout") or default_pg_timeout).total_seconds()
    limit = timeout_s + max(timeout_s, 60.0)
    joined = threading.Event()

    def watchdog():
        if not joined.wait(limit):
            print(f"{who[0]}: no {who[1]} after {limit:.0f} s (rank 0 down or unreachable, or MASTER_PORT held "
                  "by another program); exiting", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, name="omoe-init-watchdog", daemon=True).start()
    try:
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=True, dist_init_required=dist_init_required,
                                   **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        raise RuntimeError(f"{who[0]} could not join the {who[1]}: {err}") from err
    finally:
        joined.set()
