#!/usr/bin/env bash
# One command for a newcomer: install, generate a demo dataset, mount it at ~/dicomfuse-demo.
# Extra arguments go to 'dicomfuse demo' (e.g. --mountPath /tmp/dicom). Ctrl+C unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dicomfuse demo "$@"
