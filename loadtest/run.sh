#!/usr/bin/env bash
# Headless m1serve load test with a summary; see loadtest/README.md.
#   loadtest/run.sh --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:9000 -u 8 -t 60s --profile default --out out/
# Same arguments as `python -m loadtest.run --help`. Exit code non-zero on any failed request.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m loadtest.run "$@"
