#!/usr/bin/env bash
# One CUDA benchmark pass, sized to fit ~13 minutes on one H100/H200-class GPU: scripts/bench.py (training 26m and
# 104m: baseline / ours / compiled, SFT padded / packed; decoding 26m at batch 1 and 8), scripts/bench_stages.py (the
# real pretrain stage compiled: 26m, 104m, 104m at batch 64), scripts/bench_memory.py (each --optim's bytes and the
# peak against the memory planner, 104m) and scripts/bench_quality.py at 26m (held-out bpb per
# FLOP and per second, every mode; it needs out/bench_quality/ from a CPU run of it, carried over: the GPU box has no
# network to fetch the corpus). Every step writes into $1 as it goes, so a cut-off run still leaves its finished
# parts.   bash scripts/bench_gpu.sh out/bench_gpu
set -uo pipefail
out=$(realpath -m "${1:-out/bench_gpu}"); mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 300 python3 scripts/bench.py --device cuda --presets 26m,104m --modes baseline,ours,compiled,sft_padded,sft_packed --repeats 1 \
  --steps 10 --batch_size 32 --decode_modes baseline,ours,compiled,int8 --json "$out/bench_cuda.json" 2>&1 \
  | tee "$out/bench.log"
for run in "26m --compile" "104m --compile" "104m --compile --batch_size 64"; do
  set -- $run
  name=stages_$1_compiled${3:+_batch$4}
  timeout 85 python3 scripts/bench_stages.py --preset "$1" --stages pretrain --steps 30 --extra="${*:2}" \
    --out "$out/$name.json" 2>&1 | grep -v "^\s*$" | tail -3 | tee -a "$out/stages.log"
done
# the optimizers' bytes per parameter and the peak allocated memory beside scripts/plan_memory.py's figure
timeout 150 python3 scripts/bench_memory.py --device cuda --dtype bfloat16 --preset 104m --seq_len 512 --batch_size 16 \
  --steps 20 --json "$out/bench_memory_cuda.json" --figure "$out/optimizers_cuda.png" 2>&1 | tail -5 | tee "$out/memory.log"
q=out/bench_quality
if ls $q/train-*.jsonl >/dev/null 2>&1; then
  evals=(); for f in $q/eval/*.jsonl; do evals+=(--eval_data "$f"); done
  timeout 240 python3 scripts/bench_quality.py --device cuda --data "$(ls $q/train-*.jsonl | head -1)" "${evals[@]}" \
    --preset 26m --seq_len 512 --batch_size 32 --steps 600 --learning_rate 1e-3 --work_dir "$out/quality" \
    --json "$out/quality_cuda.json" --figure "$out/quality_cuda.png" 2>&1 | tee "$out/quality.log"
else
  echo "no out/bench_quality/train-*.jsonl: run python3 scripts/bench_quality.py on a CPU first" | tee "$out/quality.log"
fi
