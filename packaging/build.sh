#!/usr/bin/env bash
# Build DICOMFuse for people who don't use pip, on Linux and macOS (Windows: packaging/build.ps1):
#   packaging/dist/dicomfuse           one self-contained executable (PyInstaller, packaging/dicomfuse.spec)
#   packaging/dist/python/*.whl, *.tar.gz   the wheel and sdist (python -m build), which the binary is built from
# Everything is made in its own venv, packaging/.build-venv (git-ignored): PyInstaller, build and pipx never enter
# the project's .venv. Safe to run again: the venv is reused, the outputs are replaced.
#
#   bash packaging/build.sh                 then: .venv/bin/python -m pytest packaging   (test_binary, test_wheel)
#   PYTHON=python3.12 bash packaging/build.sh   build with another interpreter (default: python3)
#
# macOS uses this same script (the result is packaging/dist/dicomfuse for the Mac's architecture). The binary
# runs where it was built: Linux x86_64 with this glibc or newer, macOS on that architecture. It needs the
# user's FUSE: `fuse3` (Linux) or macFUSE (macOS); it never contains libfuse itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.build-venv"
dist="$here/dist"
started=$SECONDS

python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating the build venv $venv with $("$python" -c 'import sys; print(sys.version.split()[0])')"
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -m pip install -q --upgrade pip
"$vpy" -m pip install -q "pyinstaller>=6.10,<7" "pyinstaller-hooks-contrib>=2024.8" "build>=1.2" "pipx>=1.5"

echo "== wheel and sdist -> $dist/python"
rm -rf "$dist/python"
mkdir -p "$here/build"
"$vpy" -m build --outdir "$dist/python" "$root" >"$here/build/python-build.log" 2>&1 || {
  tail -40 "$here/build/python-build.log"; exit 1; }
wheel="$(ls "$dist/python"/dicomfuse-*.whl)"
sdist="$(ls "$dist/python"/dicomfuse-*.tar.gz)"
echo "   $(basename "$wheel")  $(basename "$sdist")"

echo "== installing the wheel into the build venv"
"$vpy" -m pip install -q "$wheel"                                 # its dependencies
"$vpy" -m pip install -q --no-deps --force-reinstall "$wheel"     # this build's dicomfuse, even at the same version

echo "== PyInstaller"
"$venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath "$dist" --workpath "$here/build/pyinstaller" "$here/dicomfuse.spec"
binary="$dist/dicomfuse"

# The user's FUSE library must be the one used: fail if one got into the bundle.
bundled="$("$venv/bin/pyi-archive_viewer" --list "$binary" | grep -iE "[/ '](lib)?(fuse3?|osxfuse|macfuse|fuse-t)[.-]|winfsp-" || true)"
if [ -n "$bundled" ]; then
  echo "error: a FUSE library was bundled; the user's own must be used:" >&2
  echo "$bundled" >&2
  exit 1
fi

"$binary" --version
bytes=$(wc -c <"$binary" | tr -d ' ')
echo "== built $binary ($(( (bytes + 524288) / 1048576 )) MB, $bytes bytes) in $(( SECONDS - started )) s"
