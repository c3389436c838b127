#!/usr/bin/env bash
# Source on the lent GPU machine (no network): installs the carried fla/gguf wheels and puts
# the checkout's src/ on the path.  Usage: `source scripts/device_env.sh` (carry .wheels).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
radlads() { python3 -m radlads "$@"; }
