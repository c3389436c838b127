#!/usr/bin/env bash
# A real-teacher conversion on a remote GPU host: import SmolLM2 from the stashed GGUF, tokenize
# the stashed corpus (once per host), convert with the user's command, evaluate student vs
# teacher, and pack the small result files into $RUN/results/$NAME/.
# Start it detached (setsid) so that it outlives one job-size limit; it logs to stdout.
#   NAME=rwkv7 STEP1=16M STEP2=32M STEP3=8M setsid bash scripts/device_convert.sh > /root/rwkv7.log 2>&1 &
# Knobs (environment): ARCH, STEP1/2/3 (token budgets), SOFTMAX (layers kept as softmax, e.g.
# 10,20, or none for a pure student; unset, the preset's: auto:2 windowed, for this teacher),
# SEQ_LEN and GLOBAL_BATCH (steps 1-2: --seq-len, --global-batch-size), EXTRA (more
# convert flags, apart by spaces or joined by "+": --a=1+--b=2, for a STUDY line), PASSKEY
# (lengths), COPY (copying-probe distances), WINDOWS (held-out windows of 2048). Tokenized shards
# packed as $STASH/data.tar.xz (`tar cJf data.tar.xz data` where they were made, then relay.sh;
# 36 MB for the SmolLM2 corpus against 39 MB of text) are used instead of tokenizing the corpus
# here, if this host's import of the teacher gives the ids they hold
# (radlads.data.check_tokenizer; GGUF imports differ between transformers releases); else the
# corpus is tokenized, and must be stashed too.
# With STEP3 > 0 the student after step 2 is evaluated too (step 3 on/off from one run), unless
# EVAL_STEP2=0 (the export and evaluation take ~2 minutes of a job's time).
set -euo pipefail
source scripts/device_env.sh
ARCH=${ARCH:-rad-rwkv7}; NAME=${NAME:-$ARCH}
STEP1=${STEP1:-16M}; STEP2=${STEP2:-32M}; STEP3=${STEP3:-0}; EXTRA=${EXTRA:-}
# 256 (last, so that the keys at 1k-8k stay those of earlier runs): can the student copy at all?
# Set but empty (PASSKEY= or COPY=), that probe is skipped, for a run near the job-size limit.
PASSKEY=${PASSKEY-1k,4k,8k,256}; COPY=${COPY-0,64,256,1k,4k}; WINDOWS=${WINDOWS:-64}
RUN=${RUN:-/root/run}; STASH=${STASH:-/root/stash}
mkdir -p "$RUN/results/$NAME"
# Runs started side by side (device_study.sh on a host of several GPUs) import the teacher and
# tokenize the corpus once: the first takes the lock, the others wait and reuse its files.
exec 9> "$RUN/inputs.lock"
flock 9
TEACHER=$(python3 -c "from radlads.teachers import resolve_teacher as r; print(r('$STASH/SmolLM2-135M-Instruct.Q4_1.gguf', cache_dir='$RUN/teacher'))")
if [ ! -f "$RUN/data/index.json" ] && [ -f "$STASH/data.tar.xz" ]; then
  tar xJf "$STASH/data.tar.xz" -C "$RUN"
  # Shards made under another transformers release may not match this host's import of the teacher.
  python3 -c "from radlads.data import ShardIndex, check_tokenizer as c; c(ShardIndex.load('$RUN/data'), '$TEACHER')" \
    || { echo "the relayed shards do not match this host's tokenizer: tokenizing here"; rm -rf "$RUN/data"; }
fi
if [ ! -f "$RUN/data/index.json" ]; then
  radlads prepare-data --teacher "$TEACHER" --data "$STASH/corpus.jsonl.xz" --out "$RUN/data" --quiet
fi
flock -u 9
echo "inputs_ready $(date +%T)" > "$RUN/results/$NAME/wall.txt"
knobs=()
[ -n "${SOFTMAX:-}" ] && knobs+=(--softmax-layers "$SOFTMAX")
[ -n "${SEQ_LEN:-}" ] && knobs+=(--seq-len "$SEQ_LEN")
[ -n "${GLOBAL_BATCH:-}" ] && knobs+=(--global-batch-size "$GLOBAL_BATCH")
start=$(date +%s)
# shellcheck disable=SC2086  # EXTRA is several flags
radlads convert --teacher "$TEACHER" --data "$RUN/data" --out "$RUN/$NAME" --arch "$ARCH" "${knobs[@]}" \
  --step1-tokens "$STEP1" --step2-tokens "$STEP2" --step3-tokens "$STEP3" --quiet ${EXTRA//+--/ --}
echo "convert_s $(($(date +%s) - start))" >> "$RUN/results/$NAME/wall.txt"

evaluate() {  # evaluate MODEL_DIR LABEL
  radlads eval --model "$1" --teacher "$TEACHER" --data "$RUN/data" --seq-len 2048 --max-windows "$WINDOWS" \
    --passkey "$PASSKEY" --copy "$COPY" --out "$1/eval" --quiet > /dev/null
  cp "$1/eval/results.json" "$RUN/results/$NAME/results-$2.json"
  cp "$1/eval/report.md" "$RUN/results/$NAME/report-$2.md"
}
# Pack as it goes and score the final student first: a run cut short by the host's time limit
# still leaves its training record and the result that matters most.
cp "$RUN/$NAME/metrics.jsonl" "$RUN/$NAME/radlads.json" "$RUN/results/$NAME/"
evaluate "$RUN/$NAME" final
if [ "$STEP3" != 0 ] && [ "${EVAL_STEP2:-1}" != 0 ]; then
  radlads export --checkpoint "$RUN/$NAME/checkpoints/step2" --out "$RUN/$NAME-step2" --teacher "$TEACHER" --quiet
  evaluate "$RUN/$NAME-step2" step2
fi
echo "done $NAME"
