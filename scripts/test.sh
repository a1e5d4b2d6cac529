#!/usr/bin/env bash
# One command for the tests: install everything (Debian packages, Orthanc, the package with its
# test extras), lint, then run the whole suite (unit + real mounts against Orthanc and the local
# store). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests
exec .venv/bin/python -m pytest "$@"
