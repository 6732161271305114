#!/usr/bin/env bash
# Prepares, on this machine (network to the package registry, nvcc), what
# bench/device_check.sh installs on a GPU machine that has no network:
#
#   bench/device_prepare.sh [DEST]      # DEST defaults to .whl (gitignored)
#
# DEST then holds two wheels, together a few MiB (the GPU machine's tool carries at
# most 64 MiB with the working tree):
#   lora_da-<version>-cp312-cp312-linux_x86_64.whl   this project, CUDA backend compiled
#       in (LORA_DA_CUDA=ON: the build fails without nvcc rather than leave it out),
#       for the architectures CMakeLists.txt names (sm_80, sm_90);
#   scipy_openblas32-<version>-py3-none-manylinux...whl   its BLAS/LAPACK, the one
#       runtime dependency that machine lacks (it has torch, triton, numpy, safetensors,
#       tqdm, transformers, peft, pytest, pytest-xdist and hypothesis).
# The build runs without build isolation in a Python 3.12 virtual environment
# (build/device-venv-py<ver>) holding the build dependencies from the registry:
# scikit-build-core, pybind11 and the same scipy-openblas32. Python 3.12 is taken
# from $PYTHON312, else python3.12 on the PATH, else pyenv's, else `uv python find`.
# $DEVICE_PYTHON_VERSION picks another version (default 3.12, the GPU machine's).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST="${1:-.whl}"
VERSION="${DEVICE_PYTHON_VERSION:-3.12}"
TAG="cp${VERSION/./}"

runs_version() {  # whether "$1" is a working Python $VERSION (a pyenv shim may not be)
  "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$VERSION'.split('.'))))" 2>/dev/null
}

find_python() {
  local candidate
  for candidate in "${PYTHON312:-}" "$(command -v "python$VERSION" || true)" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$VERSION"*/bin/python"$VERSION" \
      "$(command -v uv >/dev/null && uv python find "$VERSION" 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && runs_version "$candidate"; then
      echo "$candidate"
      return
    fi
  done
  echo "device_prepare.sh: no Python $VERSION found (set PYTHON312 to one, e.g. a pyenv or uv build)" >&2
  return 1
}

PY="$(find_python)"
echo "Python $VERSION: $PY"
if ! command -v nvcc >/dev/null; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDACXX=/usr/local/cuda/bin/nvcc; else
    echo "device_prepare.sh: no nvcc (on the PATH or /usr/local/cuda/bin): the wheel would have no CUDA backend" >&2
    exit 1
  fi
fi

VENV="build/device-venv-py$VERSION"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27"
OPENBLAS_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("scipy-openblas32"))')"

mkdir -p "$DEST"
rm -f "$DEST"/lora_da-*.whl "$DEST"/scipy_openblas32-*.whl  # one version of each (two stop the install)
LORA_DA_CUDA=ON "$VENV/bin/python" -m pip wheel . --no-build-isolation --no-deps -w "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "scipy-openblas32==$OPENBLAS_VERSION"

# Check what was built: the extension loads under Python $VERSION and has the CUDA backend.
WHEEL="$(ls "$DEST"/lora_da-*-"$TAG"-*.whl)"
CHECK="$(mktemp -d)"
trap 'rm -rf "$CHECK"' EXIT
"$VENV/bin/python" - "$WHEEL" "$CHECK" <<'EOF'
import ctypes, importlib.util, os, sys, zipfile
import scipy_openblas32
wheel, where = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.startswith("lora_da/_core"))
    archive.extract(name, where)
ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"), mode=ctypes.RTLD_GLOBAL)
spec = importlib.util.spec_from_file_location("_core", os.path.join(where, name))
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
info = core.build_info()
print("build_info:", info)
if not info["cuda"]:
    sys.exit("device_prepare.sh: the wheel has no CUDA backend")
EOF
ls -l "$DEST"
SIZE=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${SIZE} MiB (with the working tree, at most 64 MiB travel to the GPU machine)"
[ "$SIZE" -le 48 ] || { echo "device_prepare.sh: $DEST is over 48 MiB" >&2; exit 1; }
echo "Carry it: run bench/device_check.sh on the GPU machine with carry [\"$DEST\"] (README.md, GPU)."
