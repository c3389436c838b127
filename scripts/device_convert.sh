#!/usr/bin/env bash
# The real-teacher run on the GPU (issue: real teacher): import SmolLM2 from the stashed GGUF,
# tokenize the stashed corpus, convert (steps 0-2), evaluate student vs teacher.
# Meant to be started detached (setsid) so it outlives one 10-minute device call; logs to $RUN/log.
#   ARCH=rad-rwkv7 STEP1=12M STEP2=8M setsid bash scripts/device_convert.sh > /root/run.log 2>&1 &
set -euo pipefail
source scripts/device_env.sh
ARCH=${ARCH:-rad-rwkv7}; STEP1=${STEP1:-12M}; STEP2=${STEP2:-8M}
RUN=${RUN:-/root/run}; STASH=${STASH:-/root/stash}
mkdir -p "$RUN"
TEACHER=$(python3 -c "from radlads.teachers import resolve_teacher as r; print(r('$STASH/SmolLM2-135M-Instruct.Q4_1.gguf', cache_dir='$RUN/teacher'))")
[ -f "$RUN/data/index.json" ] || radlads prepare-data --teacher "$TEACHER" --data "$STASH/corpus.jsonl.xz" --out "$RUN/data" --quiet
date +%s > "$RUN/$ARCH.start"
radlads convert --teacher "$TEACHER" --data "$RUN/data" --out "$RUN/$ARCH" --arch "$ARCH" \
  --step1-tokens "$STEP1" --step2-tokens "$STEP2" --step3-tokens 0 --seq-len 512 --batch-size 32 \
  --step2-lr 1e-4 --checkpoint-every 2M --quiet
date +%s > "$RUN/$ARCH.end"
radlads eval --model "$RUN/$ARCH" --teacher "$TEACHER" --data "$RUN/data" --seq-len 2048 --max-windows 64 \
  --passkey 1k,4k --speed 1k,4k,16k --out "$RUN/$ARCH/eval" --quiet
echo "done $ARCH"
