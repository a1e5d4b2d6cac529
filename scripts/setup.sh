#!/usr/bin/env bash
# Install what DICOMFuse needs on Debian/Ubuntu, then the package into .venv.
#   scripts/setup.sh          runtime: fuse3, rsync
#   scripts/setup.sh --test   also Orthanc with its DICOMweb plugin and the test extras
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 rsync python3 python3-venv)
extras=""
if [ "${1:-}" = "--test" ]; then
  packages+=(orthanc orthanc-dicomweb curl)
  extras="[test]"
fi

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "Installing Debian packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
  # The Debian package starts a system Orthanc where an init system runs; tests start their own.
  if [ "${1:-}" = "--test" ] && command -v service >/dev/null 2>&1; then
    $sudo_cmd service orthanc stop >/dev/null 2>&1 || true
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
