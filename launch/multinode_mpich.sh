#!/usr/bin/env bash
# OMoE small job on several nodes through `deepspeed --launcher mpich` (MPICH's Hydra mpirun).
#
# How it runs: the runner calls `mpirun -n <sum of slots> -ppn <slots> -genv MASTER_ADDR ... -genv
# WORLD_SIZE ... -hosts a,b <venv python> -u .../deepspeed/launcher/launcher_helper.py --launcher mpich
# omoe_ds/small_job.py ...`; Hydra starts a proxy per host over ssh; DeepSpeed's helper turns PMI_RANK /
# MPI_LOCALRANKID into RANK / LOCAL_RANK. No mpi4py needed on this path.
# The job is given as a FILE (omoe_ds/small_job.py), not --module: DeepSpeed 0.19.8's MPICH runner puts
# `-m` in front of the helper's path when --module is given, and the ranks die with "No module named ...".
#
# Needs: MPICH's mpirun (Hydra) on PATH on every host (Debian/Ubuntu: apt-get install mpich; or
# pip install mpich into the venv), passwordless ssh to every host (Hydra uses `ssh`; options via
# ~/.ssh/config), this repo + venv at the same paths everywhere. Every host needs the same slots.
#
# Hostfile: same as launch/multinode_pdsh.sh (`node-a slots=4`); only the host names and the slots
# per host are used. Environment of the ranks: MASTER_ADDR/MASTER_PORT/WORLD_SIZE/LOCAL_SIZE from the
# runner, plus every KEY=VALUE line of ./.deepspeed_env / ~/.deepspeed_env / DS_ENV_FILE (-genv).
# Network: MPI_IFACE (default eth0) is passed to Hydra as -iface; MPICH_EXTRA_ARGS adds mpirun options
# (e.g. "-genv FI_TCP_IFACE eth0" for MPICH's libfabric tcp transport). MASTER_PORT (29610) on the
# first host must be free and reachable from all hosts.
#
# Example:
#   HOSTFILE=hostfile bash launch/multinode_mpich.sh --steps 300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then . launch/env.sh; fi
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --launcher mpich --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29610}" --launcher_args="-iface ${MPI_IFACE:-eth0} ${MPICH_EXTRA_ARGS:-}" \
    omoe_ds/small_job.py --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" \
    --ep-size "${EP_SIZE:-2}" "$@"
