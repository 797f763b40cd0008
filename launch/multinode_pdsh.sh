#!/usr/bin/env bash
# OMoE small job on several nodes with a hostfile, through DeepSpeed's default launcher (pdsh over ssh).
#
# How it runs: `deepspeed --hostfile H` checks ssh to the first host, then pdsh ssh's into every host
# and runs `cd $PWD; <this venv's python> -u -m deepspeed.launcher.launch --node_rank=%n ...` there;
# each node's launcher starts its ranks with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and the
# node rank (CROSS_RANK) set.
#
# Needs on the launching node: pdsh (apt-get install pdsh) and passwordless ssh, as this user, to every
# host of the hostfile (keys in ~/.ssh; host keys known; a non-default port or key: a `Host` block in
# ~/.ssh/config, or SSH_PORT=N here). On every host: this repo and its .venv at the SAME paths (a shared
# filesystem, or identical installs).
#
# Hostfile (MPI style; one host per line; slots = ranks on that host; the order gives the node rank,
# the first host is node 0 and holds rank 0):
#     node-a slots=4
#     node-b slots=4
# EP groups are runs of ep_size consecutive ranks, so ep_size <= slots keeps each all-to-all inside a node.
#
# Environment of the remote ranks: an ssh session starts bare. DeepSpeed exports PYTHON*, UCX*, ...
# from here, plus every KEY=VALUE line of ./.deepspeed_env and ~/.deepspeed_env (DS_ENV_FILE=/path
# names another file), e.g.
#     DS_ACCELERATOR=cpu              # CPU/gloo clusters
#     OMP_NUM_THREADS=1
#     GLOO_SOCKET_IFNAME=eth0         # the interface on which the hosts reach each other
#     NCCL_SOCKET_IFNAME=eth0         # GPU clusters
#
# Ports: MASTER_PORT (default 29610) on the first host must be free and reachable from all hosts
# (gloo/NCCL also open ephemeral ports between all hosts); ssh on 22 or SSH_PORT.
# MASTER_ADDR: the first host's address as the others reach it (default: the first hostfile entry;
# DeepSpeed alone would ssh there and take the first address of `hostname -I`).
# OMOE_DIST_TIMEOUT=S (in .deepspeed_env) makes a rank give up on missing peers after S seconds.
#
# Example:
#   printf 'node-a slots=2\nnode-b slots=2\n' > hostfile
#   HOSTFILE=hostfile bash launch/multinode_pdsh.sh --steps 300 --out runs/small_2nodes.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then . launch/env.sh; fi
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
ssh_port=()
if [ -n "${SSH_PORT:-}" ]; then ssh_port=(--ssh_port "$SSH_PORT"); fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29610}" \
    "${ssh_port[@]}" --module omoe_ds.small_job \
    --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" --ep-size "${EP_SIZE:-2}" "$@"
