#!/usr/bin/env bash
# README command 1: set up, then the main job on its embedded default.
#
#   bash launch/main.sh
#
# Fine-tunes the offline MiniLM-L6 (BERT) as an MoE model, 4 experts in every layer copied from the
# pretrained FFN, on TREC (6 classes), on 2 ranks with EP=2 under ZeRO-2 through the deepspeed
# launcher (gloo on CPU): once with AdamW, once with OMoE over AdamW, same seed and budget, then
# prints a side-by-side table. Default budget: 1 epoch (151 steps of 32 questions), max length 24 tokens (covers 97.6% of
# TREC), lr 1e-4 with warmup + linear decay. Override with TASK=, EPOCHS=, MAX_LENGTH=, LR=, SEED=,
# MODEL=, NUM_RANKS=, EP_SIZE=, DS_CONFIG=.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
. launch/env.sh
TASK=${TASK:-trec} SEED=${SEED:-42}
runs=()
for optimizer in adamw omoe; do
  out="runs/${TASK}_${optimizer}_seed${SEED}"
  deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29640}" --module omoe_ds.train \
    --model "${MODEL:-minilm-l6}" --task "$TASK" --experts 4 --ep-size "${EP_SIZE:-2}" --optimizer "$optimizer" \
    --deepspeed_config "${DS_CONFIG:-ds_configs/finetune_zero2.json}" --epochs "${EPOCHS:-1}" --max-length "${MAX_LENGTH:-24}" \
    --lr "${LR:-1e-4}" --seed "$SEED" --output-dir "$out" --overwrite "$@"
  runs+=("$out")
done
python -m omoe_ds.compare "${runs[@]}"
