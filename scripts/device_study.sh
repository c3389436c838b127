#!/usr/bin/env bash
# Several conversions one after another on a remote GPU host, as one detached job: one line of
# STUDY per run, holding scripts/device_convert.sh's knobs (NAME, ARCH, STEP1/2/3, SOFTMAX, EXTRA,
# ...). The GPU runs one conversion at a time (two side by side ran at 0.49 + 0.49 of their
# speeds alone), and the corpus is tokenized once, by the first run. A run that fails is logged
# and the next one starts. Results land in $RUN/results/NAME/ as device_convert.sh packs them.
#   STUDY='NAME=hyb-auto SOFTMAX=auto:2 STEP1=16M STEP2=24M
#   NAME=hyb-need SOFTMAX=8,20 STEP1=16M STEP2=24M' setsid bash scripts/device_study.sh > /root/study.log 2>&1 &
set -uo pipefail
: "${STUDY:?one line of device_convert.sh knobs per run}"
while IFS= read -r knobs; do
  [ -z "$knobs" ] && continue
  echo "== $(date +%T) $knobs"
  # shellcheck disable=SC2086  # each line is several VAR=value words
  env $knobs bash scripts/device_convert.sh || echo "== run failed (exit $?): $knobs"
done <<< "$STUDY"
echo "== $(date +%T) study done"
