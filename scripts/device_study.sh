#!/usr/bin/env bash
# Several conversions one after another on a remote GPU host, as one detached job: one line of
# STUDY per run, holding scripts/device_convert.sh's knobs (NAME, ARCH, STEP1/2/3, SOFTMAX, EXTRA,
# ...). The GPU runs one conversion at a time (two side by side ran at 0.49 + 0.49 of their
# speeds alone), and the corpus is tokenized once, by the first run. A run that fails is logged
# and the next one starts. Results land in $RUN/results/NAME/ as device_convert.sh packs them,
# with Triton's autotuning results (gpu-cache.tgz, for .gpu-cache/ next time) once the study ends.
#   STUDY='NAME=hyb-auto SOFTMAX=auto:2 STEP1=16M STEP2=24M
#   NAME=hyb-need SOFTMAX=8,20 STEP1=16M STEP2=24M' setsid bash scripts/device_study.sh > /root/study.log 2>&1 &
# Then, in each following job (it keeps the host warm and brings back whatever is done so far,
# even if the job hits its time limit):
#   bash scripts/device_study.sh collect 570    # $OUT/results.tgz every few seconds, up to 570 s
set -uo pipefail
RUN=${RUN:-/root/run}; LOG=${LOG:-/root/study.log}

if [ "${1:-}" = collect ]; then
  : "${OUT:?collect writes into the job output folder OUT}"
  end=$((SECONDS + ${2:-570}))
  while ((SECONDS < end)); do
    finished=0
    grep -q "study done" "$LOG" 2> /dev/null && finished=1  # before packing: the last pack holds it all
    tar czf "$OUT/results.tmp" -C "$(dirname "$RUN")" "$(basename "$RUN")/results" -C "$(dirname "$LOG")" "$(basename "$LOG")" 2> /dev/null
    mv "$OUT/results.tmp" "$OUT/results.tgz"
    ((finished)) && break
    sleep 8
  done
  tr '\r' '\n' < "$LOG" | grep -v -e tokenizing -e Writing | tail -12
  exit 0
fi

: "${STUDY:?one line of device_convert.sh knobs per run}"
source scripts/device_env.sh  # once, before the runs add their autotuning results to the cache
while IFS= read -r knobs; do
  [ -z "$knobs" ] && continue
  echo "== $(date +%T) $knobs"
  # shellcheck disable=SC2086  # each line is several VAR=value words
  env $knobs bash scripts/device_convert.sh || echo "== run failed (exit $?): $knobs"
done <<< "$STUDY"
OUT=$RUN/results save_gpu_cache
echo "== $(date +%T) study done"
