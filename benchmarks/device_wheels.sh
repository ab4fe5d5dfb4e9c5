#!/usr/bin/env bash
# Fill .whl/ with the wheels the H200 image lacks (the server's stack and the chat's line editor), for Python 3.12
# on x86-64 Linux; h200_engine.sh installs them there. Run here (PyPI is reachable), then name .whl in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl fastapi uvicorn httptools uvloop prometheus-client prompt_toolkit opentelemetry-api py-spy
ls .whl
