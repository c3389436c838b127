#!/usr/bin/env bash
# Several conversions on a remote GPU host, as one detached job: one line of STUDY per run,
# holding scripts/device_convert.sh's knobs (NAME, ARCH, STEP1/2/3, SOFTMAX, EXTRA, ...) as
# VAR=value words: a line splits at spaces, so EXTRA's flags take the form --flag=value, several
# joined by "+" (EXTRA=--step2-repeat-fraction=0.5+--step3-repeat-fraction=0.5). Each GPU
# runs one conversion at a time (two side by side on one GPU ran at 0.49 + 0.49 of their speeds
# alone): on a host of several GPUs the runs go side by side, one per GPU (GPUS, default all of
# them), each next line taking the first GPU that frees up. The corpus is tokenized once, by the
# first run. A run that fails is logged and the next one starts. Results land in
# $RUN/results/NAME/ as device_convert.sh packs them, with Triton's autotuning results
# (gpu-cache.tgz, for .gpu-cache/ next time) once the study ends.
#   STUDY='NAME=hyb-auto SOFTMAX=auto:2 STEP1=16M STEP2=24M
#   NAME=one-lr STEP1=16M STEP2=24M EXTRA=--step2-new-lr-scale=1' setsid bash scripts/device_study.sh > /root/study.log 2>&1 &
# Then, in each following job (it keeps the host warm and brings back whatever is done so far,
# even if the job hits its time limit):
#   bash scripts/device_study.sh collect 570    # $OUT/results.tgz every few seconds, up to 570 s
# Each collect brings back the autotuning results so far too ($OUT/gpu-cache.tgz, see
# device_env.sh): a study cut short by the host's time limit still saves the next one the tuning.
set -uo pipefail
RUN=${RUN:-/root/run}; LOG=${LOG:-/root/study.log}

if [ "${1:-}" = collect ]; then
  : "${OUT:?collect writes into the job output folder OUT}"
  source scripts/gpu_cache.sh
  end=$((SECONDS + ${2:-570}))
  while ((SECONDS < end)); do
    finished=0
    grep -q "study done" "$LOG" 2> /dev/null && finished=1  # before packing: the last pack holds it all
    # Each run's training record as it grows too: a run cut short still shows how far it got.
    for metrics in "$RUN"/*/metrics.jsonl; do
      [ -f "$metrics" ] && cp "$metrics" "$RUN/results/$(basename "$(dirname "$metrics")")/metrics.jsonl" 2> /dev/null
    done
    tar czf "$OUT/results.tmp" -C "$(dirname "$RUN")" "$(basename "$RUN")/results" -C "$(dirname "$LOG")" "$(basename "$LOG")" 2> /dev/null
    mv "$OUT/results.tmp" "$OUT/results.tgz"
    save_gpu_cache > /dev/null 2>&1
    ((finished)) && break
    sleep 8
  done
  tr '\r' '\n' < "$LOG" | grep -v -e tokenizing -e Writing | tail -12
  exit 0
fi

: "${STUDY:?one line of device_convert.sh knobs per run}"
# once, before the runs add their autotuning results to the cache; "study done" ends `collect` early
source scripts/device_env.sh || { echo "== $(date +%T) study done: no run started"; exit 1; }
GPUS=${GPUS:-$(nvidia-smi -L 2> /dev/null | wc -l)}
((GPUS > 0)) || GPUS=1
declare -A busy  # GPU index -> pid of the run on it
convert_on() {   # convert_on GPU KNOBS...: one run on one GPU, logged with its knobs
  local gpu=$1; shift
  echo "== $(date +%T) gpu $gpu: $*"
  env CUDA_VISIBLE_DEVICES="$gpu" "$@" bash scripts/device_convert.sh || echo "== run failed (exit $?): $*"
}
while IFS= read -r knobs; do
  [ -z "$knobs" ] && continue
  while :; do  # the first free GPU
    for gpu in $(seq 0 $((GPUS - 1))); do
      pid=${busy[$gpu]:-}
      if [ -z "$pid" ] || ! kill -0 "$pid" 2> /dev/null; then break 2; fi
    done
    wait -n
  done
  # shellcheck disable=SC2086  # each line is several VAR=value words
  convert_on "$gpu" $knobs &
  busy[$gpu]=$!
done <<< "$STUDY"
wait
OUT=$RUN/results save_gpu_cache
echo "== $(date +%T) study done"
