#!/usr/bin/env bash
# Source on the remote GPU host: save_gpu_cache packs Triton's autotuning results under /tmp/gpu-cache
# (device_env.sh points the caches there) into $OUT/gpu-cache.tgz. Apart from device_env.sh so that
# device_study.sh's collect can save them without installing anything.
save_gpu_cache() {  # what comes back from $OUT is at most 16 MiB a file; a job cut short leaves no half archive
  (cd /tmp && find gpu-cache -name '*.autotune.json' -print0 | tar czf "$OUT/gpu-cache.tmp" --null -T -) \
    && mv "$OUT/gpu-cache.tmp" "$OUT/gpu-cache.tgz" \
    && echo "saved $(tar tzf "$OUT/gpu-cache.tgz" | wc -l) autotuning results ($(du -h "$OUT/gpu-cache.tgz" | cut -f1))"
}
