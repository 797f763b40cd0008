#!/usr/bin/env bash
# README command 1: set up, then the main job on its embedded default.
#
#   bash launch/main.sh
#
# Today's default: the small MoE classifier, AdamW vs OMoE (same seed, data, budget), 2 ranks
# with EP=2 under ZeRO-2 through the deepspeed launcher (gloo on CPU). Prints a side-by-side table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
. launch/env.sh
mkdir -p results
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29610}" --module omoe_ds.small_job \
  --deepspeed_config "${DS_CONFIG:-ds_configs/omoe_zero2.json}" --ep-size "${EP_SIZE:-2}" --steps "${STEPS:-300}" \
  --out results/small_job.json "$@"
