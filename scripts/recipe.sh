#!/usr/bin/env bash
# The real path, in order (docs/recipe.md): download -> pretrain -> SFT -> chat, then the optional stages.
#
#   bash scripts/recipe.sh                          # one GPU: the "zero" model (pretrain + SFT), then a chat check
#   NGPU=4 bash scripts/recipe.sh                   # four GPUs of one machine (torchrun: the global batch is 4x)
#   STAGES="pretrain sft kd dpo reason grpo agent lora" bash scripts/recipe.sh     # the whole chain
#   EXTRA="--use_wandb --compile" bash scripts/recipe.sh                           # flags for every training command
#   TINY=1 OUT=out/tiny bash scripts/recipe.sh      # the same commands on demo/data with a tiny model: CPU minutes
#
# Each stage starts from its default --from (the chain below, as in docs/recipe.md); OUT is where out/<stage> go.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-1}
STAGES=${STAGES:-"pretrain sft"}
OUT=${OUT:-out}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
if [ "$NGPU" -gt 1 ]; then RUN="$PY -m torch.distributed.run --standalone --nproc_per_node $NGPU"; else RUN="$PY"; fi

# the default --from of each stage (its script's --help says the same)
declare -A FROM=([sft]=pretrain [kd]=sft [dpo]=sft [reason]=dpo [grpo]=reason [agent]=sft [lora]=dpo)
if [ -n "${TINY:-}" ]; then
  DATA=demo/data
  declare -A FILE=([pretrain]=pretrain.jsonl [sft]=sft.jsonl [kd]=kd.jsonl [dpo]=dpo.jsonl [reason]=reason.jsonl
                   [grpo]=reason_prompts.jsonl [agent]=agent_rl.jsonl [lora]=lora_medical.jsonl)
  SMALL="--max_steps 2 --batch_size 2 --max_seq_len 128 --num_workers 0 --log_interval 1"
  SCRATCH="--preset tiny"
  RL="--num_generations 2 --max_new_tokens 16"
  CHAT="--max_new_tokens 16"
else
  DATA=dataset
  declare -A FILE=([pretrain]=pretrain_t2t_mini.jsonl [sft]=sft_t2t_mini.jsonl [kd]=sft_t2t_mini.jsonl
                   [dpo]=dpo.jsonl [reason]=sft_t2t_mini.jsonl [grpo]=rlaif.jsonl [agent]=agent_rl.jsonl
                   [lora]=lora_medical.jsonl)
  SMALL="" SCRATCH="" RL="" CHAT=""
fi

# a stage whose starting point is neither trained before it nor already in $OUT would fail later: say so now
done_before=" "
for stage in $STAGES; do
  [ -n "${FILE[$stage]:-}" ] || { echo "recipe: unknown stage '$stage' (pretrain sft kd dpo reason grpo agent lora)" >&2; exit 2; }
  from=${FROM[$stage]:-}
  if [ -n "$from" ] && [[ "$done_before" != *" $from "* ]] && [ ! -e "$OUT/$from" ]; then
    echo "recipe: $stage starts from $OUT/$from, which neither exists nor is in STAGES; add '$from' before '$stage'" >&2
    exit 2
  fi
  done_before+="$stage "
done

if [ -z "${TINY:-}" ]; then
  $PY data_process.py download $STAGES
fi
for stage in pretrain sft; do  # the token counts of docs/recipe.md's table: lines x mean tokens of a 20k-row sample
  if [[ " $STAGES " == *" $stage "* ]]; then
    $PY data_process.py stats "$DATA/${FILE[$stage]}" --image_dir "$OUT/stats"
  fi
done

EXTRA="--image_dir $OUT/images $EXTRA"  # loss curves beside the checkpoints, not over the repository's figures
for stage in $STAGES; do
  data="$DATA/${FILE[$stage]}"
  echo "=== $stage: $data ==="
  case $stage in
    pretrain) $RUN 1-pretrain.py --data_path "$data" --out_dir "$OUT" $SCRATCH $SMALL $EXTRA ;;
    sft)      $RUN 2-sft.py --data_path "$data" --out_dir "$OUT" $SMALL $EXTRA ;;
    kd)       $RUN 3-KD.py --data_path "$data" --out_dir "$OUT" $SMALL $EXTRA ;;
    dpo)      $RUN 4-RLHF.py --data_path "$data" --out_dir "$OUT" $SMALL $EXTRA ;;
    reason)   $RUN 6-reason.py --data_path "$data" --out_dir "$OUT" $SMALL $EXTRA ;;
    grpo)     $RUN 6-reason.py --method grpo --data_path "$data" --out_dir "$OUT" $SMALL $RL $EXTRA ;;
    agent)    $RUN 6-reason.py --method agent --data_path "$data" --out_dir "$OUT" $SMALL $RL $EXTRA ;;
    lora)     $RUN 5-LoRA.py --data_path "$data" --out_dir "$OUT" $SMALL $EXTRA ;;
  esac
done

# did it work: the last chat model answers the built-in questions (greedy); a pretrained-only model continues text
last=${STAGES##* }
$PY eval_model.py --stage "$last" --out_dir "$OUT" --auto --temperature 0 $CHAT
