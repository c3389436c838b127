#!/usr/bin/env bash
# The single-GPU checks and measurements of the performance work, in one job on a remote GPU host
# (copy .wheels, and .gpu-cache if an earlier job saved one; docs/benchmarks.md says what each
# number means):
#   bash scripts/device_perf.sh
# Stages, each cut to what is left of BUDGET_S (default 560 s, for a 600 s job-size limit):
#   gpu-tests  the GPU parity tests of what users run: fla's bf16 kernels (RWKV-7 with RAD-RWKV7's
#              decay floor) against the per-token loop, their gradients, CUDA-graph decoding
#   training   bench/training.py, Qwen2.5-0.5B shape, steps 1-3: radlads and baseline, GPU time
#              by kernel family, radlads' timelines (the first update compiles and autotunes for
#              minutes)
#   kernels    bench/recurrence_kernels.py (fla chunk with and without the floor, fused, reference)
# Writes $OUT/training.json, $OUT/traces.tar (the trace-*.json.gz), $OUT/recurrence_kernels.json,
# $OUT/logs/*.log, $OUT/stages.txt and $OUT/gpu-cache.tgz (Triton's autotuning results, for the next
# job): 8 files at most, for hosts that return only a few files per job.
# With .ab/ copied (an earlier commit's src/ and bench/, written by `bash scripts/ab_base.sh REV`),
# the training stage runs that tree first (stage training-base, $OUT/base/training.json), then this
# one, each on half the time: the same arguments on the same machine, for ratios between trees
# (so TRAINING_ARGS may only use flags both trees' bench/training.py know).
# Override stage arguments with TESTS_K (and its time limit TESTS_S), TRAINING_ARGS, KERNELS_ARGS, e.g.
# TRAINING_ARGS="--shapes smollm2-135m --eager" (shell-quoted, as on a command line:
# KERNELS_ARGS="--methods 'fla chunk + floor'"); leave stages out with SKIP="gpu-tests kernels".
# CPU smoke run (no GPU stage has work; seconds):
#   OUT=/tmp/perf BUDGET_S=240 TRAINING_ARGS=--tiny KERNELS_ARGS=--tiny bash scripts/device_perf.sh
set -euo pipefail
source scripts/device_env.sh
OUT=${OUT:-bench/results}; BUDGET_S=${BUDGET_S:-560}
TESTS_K=${TESTS_K:-"test_graphs or bf16 or autocast"}; TESTS_S=${TESTS_S:-200}
TRAINING_ARGS=${TRAINING_ARGS:-"--shapes qwen2.5-0.5b --profile 20 --trace"}
KERNELS_ARGS=${KERNELS_ARGS:-"--budget-s 100"}
DEADLINE=$((SECONDS + BUDGET_S)); STAGES=$OUT/stages.txt
mkdir -p "$OUT/logs"
source scripts/stage.sh

stage gpu-tests "$TESTS_S" python3 -m pytest -q -s -m gpu tests -k "$TESTS_K"
reserve=190; skipped kernels && reserve=0  # the kernels' time, kept from the training benchmark
left=$((DEADLINE - SECONDS - reserve))
eval "training_args=($TRAINING_ARGS)" "kernels_args=($KERNELS_ARGS)"  # words, with their quotes
if [ -d .ab/src ]; then  # an earlier tree to compare with (scripts/ab_base.sh): first, on half the time
  left=$((left / 2))
  stage training-base $((left + 20)) env PYTHONPATH="/tmp/site:$PWD/.ab/src" \
    python3 .ab/bench/training.py "${training_args[@]}" --budget-s "$left" --out "$OUT/base"
  left=$((DEADLINE - SECONDS - reserve))
fi
stage training $((left + 20)) python3 bench/training.py "${training_args[@]}" --budget-s "$left" --out "$OUT"
stage kernels 150 python3 bench/recurrence_kernels.py "${kernels_args[@]}" --out "$OUT"
save_gpu_cache
traces=$(cd "$OUT" && ls trace-*.json.gz base/trace-*.json.gz 2> /dev/null || true)
if [ -n "$traces" ]; then  # one file for all, see above
  tar -cf "$OUT/traces.tar" -C "$OUT" --remove-files $traces
fi
cat "$STAGES"
skipped gpu-tests || tail -n 20 "$OUT/logs/gpu-tests.log"
skipped training || grep -v -i warn "$OUT/logs/training.log" | tail -n 70
if [ -f "$OUT/base/training.json" ] && [ -f "$OUT/training.json" ]; then
  echo "## This tree against .ab/ ($(cat .ab/REV)), same machine"
  python3 bench/compare_runs.py "$OUT/base/training.json" "$OUT/training.json"
fi
