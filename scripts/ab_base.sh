#!/usr/bin/env bash
# Write .ab/ (git-ignored): src/ and bench/ as committed at REV, for scripts/device_perf.sh to time
# against the working tree in the same job on the same GPU host. Usage: bash scripts/ab_base.sh REV;
# then copy .ab to the host with .wheels and .gpu-cache. `rm -rf .ab` to stop comparing.
set -euo pipefail
rev=${1:?usage: bash scripts/ab_base.sh REV}
rm -rf .ab && mkdir .ab
git archive "$rev" src bench | tar -x -C .ab
git rev-parse "$rev" > .ab/REV
echo "A/B base: $(git log -1 --format='%h %s' "$rev")"
