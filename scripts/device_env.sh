#!/usr/bin/env bash
# Source on the remote GPU host (no network): installs the carried fla/gguf wheels (once per host,
# so that runs started side by side do not install over each other; again when a carried wheel is
# new to the host, e.g. .wheels-extra sent after the first job) and puts the checkout's src/ on the
# path.  Usage: `source scripts/device_env.sh` (carry .wheels).
# Triton's and TorchInductor's caches live under /tmp/gpu-cache. `save_gpu_cache` packs Triton's
# autotuning results (small JSON files; the compiled kernels, ~200 MB after a training benchmark,
# are too big to bring back) into $OUT/gpu-cache.tgz. Copy that file to .gpu-cache/ here and send
# .gpu-cache with the next job: it is unpacked first, and fla's kernels compile only the configs
# that won instead of benchmarking every one again.
# More wheels, installed the same way: .wheels-extra/ (copied; scripts/device_wheels.sh fetches the
# server's and torchao's) and /root/stash (relayed there by
# scripts/relay.sh, for wheels over the host's file-size limit), e.g. fla's TileLang backend:
# tilelang (~50 MB, relayed), z3-solver, apache-tvm-ffi and torch-c-dlpack-ext; the host has nvcc.
# shellcheck disable=SC2206  # one word per wheel
wheels=(.wheels/*.whl $(ls .wheels-extra/*.whl /root/stash/*.whl 2> /dev/null || true))
new=0  # a carried wheel that /tmp/site/.installed does not list
for w in "${wheels[@]}"; do grep -qxF "${w##*/}" /tmp/site/.installed 2> /dev/null || new=1; done
if ((new)); then
  # a failed install is not marked done, and the caller stops (without fla, CUDA runs fall back to a slow kernel)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { echo "device_env.sh: the wheels did not install (is .wheels carried?)" >&2; return 1; }
  for w in "${wheels[@]}"; do echo "${w##*/}"; done >> /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/gpu-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/gpu-cache/inductor
export TRITON_CACHE_AUTOTUNING=1  # Triton >= 3.3: autotuning results go to the cache too
mkdir -p /tmp/gpu-cache
if [ -f .gpu-cache/gpu-cache.tgz ]; then tar xzf .gpu-cache/gpu-cache.tgz -C /tmp; fi
radlads() { python3 -m radlads "$@"; }
source scripts/gpu_cache.sh
