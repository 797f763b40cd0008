#!/usr/bin/env bash
# OMoE small job on ONE node: NUM_RANKS ranks (default 2) at EP=2, through the deepspeed launcher.
# This is the reference every multi-node launch in launch/ must reproduce (tests/multinode compares
# them at 1e-6).
#
# Needs: the venv (bash launch/setup.sh). No ssh, no hostfile: with no /job/hostfile DeepSpeed runs
# everything on localhost. Port: MASTER_PORT (default 29610) free on 127.0.0.1.
# Env knobs: NUM_RANKS (2), MASTER_PORT (29610), DS_CONFIG (ds_configs/omoe_zero2.json), EP_SIZE (2).
# Extra arguments go to omoe_ds.small_job (--steps, --out FILE, --rank-out DIR, --seed, ...).
#
# Example:
#   bash launch/single_node.sh --steps 300 --out runs/small_1node.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then . launch/env.sh; fi
exec deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29610}" \
    --module omoe_ds.small_job --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" \
    --ep-size "${EP_SIZE:-2}" "$@"
