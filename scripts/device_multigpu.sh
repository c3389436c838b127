#!/usr/bin/env bash
# Multi-GPU `radlads convert` (FSDP2, sharded DCP checkpoints) on a remote host with 2 GPUs, in one
# job within a job-size limit: run from the repo root with .wheels copied (docs/benchmarks.md,
# "Multi-GPU (FSDP2)").
#   bash scripts/device_multigpu.sh
# Steps 1 and 2 of a random Qwen2.5-0.5B-shaped teacher on random tokens through the user's
# commands: 1 GPU (`python3 -m radlads convert`), 2 GPUs at the same per-GPU batch (`torchrun
# --nproc-per-node 2 -m radlads convert`), then a resume: a 2-GPU step 2 (`radlads step2 --nproc 2`)
# killed right after its mid-step checkpoint and continued on 1 GPU at the same global batch.
# Writes $OUT/multigpu.json, $OUT/summary.md and $OUT/logs/*.log (what it has if a stage fails or
# runs out of time) and prints the table. Every size below can be overridden from the environment;
# `SHAPE=tiny STEP1=8k STEP2=8k SEQ=64 BATCH=2` runs it on CPU (gloo) as a smoke test.
set -euo pipefail
if [ -d .wheels ]; then
  source scripts/device_env.sh
else  # a CPU smoke run: the installed packages
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
# NVLink multicast (NVLS) off: not every host supports it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Keep Triton's autotuning results on disk, so the later runs do not benchmark again (Triton >= 3.3).
export TRITON_CACHE_AUTOTUNING=1

OUT=${OUT:-bench/results/multigpu}; WORK=${WORK:-/tmp/radlads-multigpu}
SHAPE=${SHAPE:-qwen2.5-0.5b}; STEP1=${STEP1:-768k}; STEP2=${STEP2:-384k}
SEQ=${SEQ:-512}; BATCH=${BATCH:-16}; BUDGET_S=${BUDGET_S:-430}
DEADLINE=$((SECONDS + BUDGET_S))

python3 - <<'PY'
import importlib.util, sys, torch
if torch.cuda.is_available() and importlib.util.find_spec("fla") is None:
    sys.exit("fla is missing: carry .wheels (scripts/device_env.sh installs it); without it the "
             "student runs its reference recurrence, far too slow for this benchmark")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    sys.exit(f"this benchmark needs 2 GPUs; this machine has {torch.cuda.device_count()}")
PY

rm -rf "$WORK" "$OUT/logs"
mkdir -p "$WORK" "$OUT/logs"
# What the numbers depend on: the GPUs, how they are linked, the disk the checkpoints go to.
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nvidia-smi topo -m || true
fi
df -h "$WORK" | tail -1
STAGES=$WORK/stages.txt

source scripts/stage.sh  # stage NAME SECONDS CMD...: DEADLINE, STAGES, $OUT/logs

HALF=$(python3 -c "from radlads.train.config import parse_tokens; print(parse_tokens('$STEP2') // 2)")
printf 'step1: {log_every: 3, heldout_batches: 2}\nstep2: {log_every: 3, heldout_batches: 2}\n' > "$WORK/run.yaml"
# --no-compile: sharded runs train eagerly (radlads convert), so the 1-GPU runs must too to compare.
common=(--teacher "$WORK/teacher" --data "$WORK/data" --config "$WORK/run.yaml" --step1-tokens "$STEP1"
        --step2-tokens "$STEP2" --step3-tokens 0 --seq-len "$SEQ" --batch-size "$BATCH" --quiet --no-compile)

stage inputs 150 python3 bench/multigpu.py inputs --work "$WORK" --shape "$SHAPE"
stage gpu1 240 python3 -m radlads convert "${common[@]}" --out "$WORK/gpu1"
stage gpu2 180 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  -m radlads convert "${common[@]}" --out "$WORK/gpu2"

# The resume starts from the 2-GPU run's finished steps 0-1 (linked, not recomputed).
mkdir -p "$WORK/resume/checkpoints"
ln -s "$WORK/gpu2/checkpoints/step0" "$WORK/gpu2/checkpoints/step1" "$WORK/resume/checkpoints/"
stage resume-2gpu 120 python3 bench/multigpu.py kill-after-checkpoint --checkpoint "$WORK/resume/checkpoints/step2" \
  -- python3 -m radlads step2 "${common[@]}" --out "$WORK/resume" --nproc 2 --checkpoint-every "$HALF"
cp "$WORK/resume/metrics.jsonl" "$WORK/resume/metrics.before-resume.jsonl" 2>/dev/null || true
stage resume-1gpu 150 python3 -m radlads step2 "${common[@]}" --out "$WORK/resume" --grad-accum 2

python3 bench/multigpu.py summary --work "$WORK" --out "$OUT"
echo "wall: $SECONDS s"
