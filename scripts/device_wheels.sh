#!/usr/bin/env bash
# Here, before a job on a remote GPU host (no network): download the wheels that its image lacks
# for `radlads serve` and bench/serve.py (the server and the openai client), for the smaller
# optimizer states (torchao) and for the GPU tests (hypothesis), into .wheels-extra/ (git-ignored,
# ~10 MB). Carry .wheels and .wheels-extra; `source scripts/device_env.sh` there installs both.
#   bash scripts/device_wheels.sh [PYTHON_VERSION]   # the host's Python, default 3.12
# Pinned to the versions the test suite runs with on a CPU (openai 3.x needs httpx2, fastapi
# opentelemetry-api). The host image already has anyio, h11, idna, annotated-doc, click,
# prometheus-client and tqdm.
set -euo pipefail
py=${1:-3.12}
mkdir -p .wheels-extra
for pkg in fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 uvicorn==0.55.0 openai==3.60.0 jiter==0.19.0 \
  sniffio==1.3.1 distro==1.9.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
  opentelemetry-api==1.45.2 torchao==0.18.0 hypothesis==6.155.2 attrs==26.1.0 \
  sortedcontainers==2.4.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .wheels-extra "$pkg" 2> /dev/null
done
ls .wheels-extra && du -sh .wheels-extra
