#!/usr/bin/env bash
# Run the flexattn gallery: every variant checked against the float64 reference, timed, pictured.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flexattn demo "$@"
