#!/usr/bin/env bash
# Steps 1-3 of `radlads convert` at the Qwen2.5-7B shape on one GPU (docs/guide.md, "A 7B-shaped
# conversion on one GPU"), on a remote GPU host: run from the repo root with .wheels copied (fla,
# and torchao's wheel in .wheels or .wheels-extra for the smaller optimizer states).
#   bash scripts/device_scale.sh                 # step 0, then steps 1, 2 and 3
#   STEPS=2 bash scripts/device_scale.sh         # one step per job within a job-size limit
#   SHAPE=qwen2.5-0.5b STEPS=2 OPTIMIZERS="adamw adamw-bf16-state adamw-8bit" bash scripts/device_scale.sh
#       # each step under each optimizer, from the same step 0: their losses side by side
# BUDGET_S (590 s) bounds one job: each stage is cut to what is left of it, and skipped when
# under 30 s are left (scripts/stage.sh).
# The teacher folder holds config.json alone (bench/scale.py inputs) and `--random-teacher-weights`
# builds it directly on the GPU; the tokens are random: throughput and memory depend on neither.
# Step 0 runs once into $WORK/step0; each step K then runs with `radlads stepK` in its own folder
# $WORK/stepK starting from that step 0, so the steps run in any order and in separate jobs on
# one host (where $WORK persists between them), and the disk holds step 0 (bf16, ~16 GB for the 7B) plus one
# finished step (fp32, ~32 GB): a finished step's weights are deleted once it has been measured
# (KEEP_WEIGHTS=1 keeps them). No mid-step checkpoint is written (it would hold the optimizer
# state too). Flags as `radlads plan --gpu-memory-gb 141` recommends: activation checkpointing,
# the optimizer chosen by `--optimizer auto` from the same memory estimate.
# Writes $OUT/<shape>-one-gpu.json (bench/scale.py summary of every step measured so far in
# $WORK), $OUT/stepK/{metrics.jsonl,radlads.json,config.yaml} and $OUT/logs/*.log, and prints the
# summary. Every size below can be overridden from the environment; `SHAPE=tiny SEQ=64 SEQ3=128
# UPDATES=4 UPDATES3=2` runs it on CPU as a smoke test.
set -euo pipefail
if [ -d .wheels ]; then
  source scripts/device_env.sh
else  # a CPU smoke run: the installed packages
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export TRITON_CACHE_AUTOTUNING=1

SHAPE=${SHAPE:-qwen2.5-7b}; STEPS=${STEPS:-1 2 3}; OPTIMIZER=${OPTIMIZER:-auto}
# one work folder per shape: its inputs and step 0 are reused by later jobs on the same host
OUT=${OUT:-bench/results/scale}; WORK=${WORK:-/tmp/radlads-scale-$SHAPE}
OPTIMIZERS=${OPTIMIZERS:-$OPTIMIZER}  # several: one run of each step per optimizer, named stepK-OPT
SEQ=${SEQ:-512}; SEQ3=${SEQ3:-16384}
BATCH=${BATCH:-32}      # sequences per update of steps 1-2: what --preset auto gives a 7B teacher
UPDATES=${UPDATES:-50}  # updates of steps 1 and 2
UPDATES3=${UPDATES3:-60} # updates of step 3, one sequence of SEQ3 tokens each
LOG_EVERY=${LOG_EVERY:-10}; LOG_EVERY3=${LOG_EVERY3:-5}
BUDGET_S=${BUDGET_S:-590}
DEADLINE=$((SECONDS + BUDGET_S))

python3 - <<'PY'
import importlib.util, sys, torch
if torch.cuda.is_available() and importlib.util.find_spec("fla") is None:
    sys.exit("fla is missing: copy .wheels (scripts/device_env.sh installs it); without it the "
             "student runs its reference recurrence, far too slow for this benchmark")
if torch.cuda.is_available() and importlib.util.find_spec("torchao") is None:
    print("torchao is missing: --optimizer auto keeps to fp32 AdamW, which the 7B's step 2 does not fit")
PY

mkdir -p "$WORK" "$OUT/logs"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
df -h "$WORK" | tail -1
STAGES=$OUT/stages.txt
source scripts/stage.sh # stage NAME SECONDS CMD...: DEADLINE, STAGES, $OUT/logs

cat > "$WORK/run.yaml" << YAML
teacher: $WORK/teacher
data: $WORK/data
random_teacher_weights: true
activation_checkpointing: true
step1: {tokens: $((UPDATES * BATCH * SEQ)), global_batch_size: $BATCH, seq_len: $SEQ, log_every: $LOG_EVERY, heldout_batches: 2, optimizer: $OPTIMIZER}
step2: {tokens: $((UPDATES * BATCH * SEQ)), global_batch_size: $BATCH, seq_len: $SEQ, log_every: $LOG_EVERY, heldout_batches: 2, optimizer: $OPTIMIZER}
step3: {tokens: $((UPDATES3 * SEQ3)), global_batch_size: 1, seq_len: $SEQ3, log_every: $LOG_EVERY3, heldout_batches: 2, optimizer: $OPTIMIZER}
YAML
# --checkpoint-every past the step's end: no mid-step checkpoint
common=(--config "$WORK/run.yaml" --checkpoint-every 1000B --quiet)

if [ ! -f "$WORK/data/index.json" ]; then
  step12=$((UPDATES * BATCH * SEQ)) step3=$((UPDATES3 * SEQ3)) window=$((SEQ3 > BATCH * SEQ ? SEQ3 : BATCH * SEQ))
  stage inputs 120 python3 bench/scale.py inputs --work "$WORK" --shape "$SHAPE" \
    --train-tokens $(((step12 > step3 ? step12 : step3) + window)) --heldout-tokens $((4 * window))
fi
if [ ! -f "$WORK/step0/checkpoints/step0/trainer.json" ]; then
  stage step0 240 python3 -m radlads step0 "${common[@]}" --out "$WORK/step0"
fi
several=$(($(wc -w <<< "$OPTIMIZERS") > 1))
for k in $STEPS; do
  for opt in $OPTIMIZERS; do
    name=step$k
    if ((several)); then name=step$k-$opt; fi
    run=$WORK/$name
    rm -rf "$run"
    mkdir -p "$run/checkpoints"
    ln -s "$WORK/step0/checkpoints/step0" "$run/checkpoints/step0"
    stage "$name" 540 python3 -m radlads "step$k" "${common[@]}" --optimizer "$opt" --out "$run"
    if [ "${KEEP_WEIGHTS:-0}" != 1 ]; then
      rm -f "$run"/model*.safetensors* "$run/checkpoints/step$k"/model*.safetensors*
    fi
    mkdir -p "$OUT/$name"
    cp "$run"/{metrics.jsonl,radlads.json,config.yaml} "$OUT/$name/" 2> /dev/null || true
  done
  read -r first _ <<< "$OPTIMIZERS"
  if ((several)) && [ -f "$WORK/step$k-$first/radlads.json" ]; then  # the first is the reference
    compared=()
    for opt in $OPTIMIZERS; do [ -f "$WORK/step$k-$opt/radlads.json" ] && compared+=("$WORK/step$k-$opt"); done
    python3 bench/scale.py optimizers --run "${compared[@]}" --out "$OUT/$SHAPE-step$k-optimizers.json"
  elif ((several)); then
    echo "step $k under $first did not finish: no comparison" | tee -a "$STAGES"
  fi
done

if ((!several)); then
  runs=()
  for k in 1 2 3; do [ -f "$WORK/step$k/metrics.jsonl" ] && runs+=("$WORK/step$k"); done
  if ((${#runs[@]})); then
    python3 bench/scale.py summary --run "${runs[@]}" --out "$OUT/$SHAPE-one-gpu.json"
  fi
fi
command -v save_gpu_cache > /dev/null && save_gpu_cache
echo "wall: $SECONDS s"
