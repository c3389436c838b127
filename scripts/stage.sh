# Sourced by the GPU-host scripts. `stage NAME SECONDS CMD...` runs CMD with a time limit, cut to
# what is left before $DEADLINE (in bash's $SECONDS), output to $OUT/logs/NAME.log; it records how
# the stage ended in $STAGES and returns 0, so later stages and the summary still run. Stages
# named in $SKIP (space-separated) are not run.
skipped() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
stage() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS - 20)) start=$SECONDS rc=0
  shift 2
  if skipped "$name"; then
    echo "$name: skipped (SKIP)" | tee -a "$STAGES"
    return 0
  fi
  ((left < limit)) && limit=$left
  if ((limit < 30)); then
    echo "$name: skipped (budget)" | tee -a "$STAGES"
    return 0
  fi
  timeout --kill-after=20 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  local how="ok"
  ((rc == 124)) && how="timed out (limit ${limit} s)"
  ((rc != 0 && rc != 124)) && how="failed (exit $rc, see logs/$name.log)"
  echo "$name: $how after $((SECONDS - start)) s" | tee -a "$STAGES"
}
