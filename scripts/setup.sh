#!/usr/bin/env bash
# Installs what nibble needs to build and test, from Debian's packages (and the CUTLASS
# headers from PyPI when CUDA is present). Idempotent: installs only what is missing.
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in cmake g++ make libgtest-dev nlohmann-json3-dev libcli11-dev zlib1g-dev libopenblas-dev; do
  have_pkg "$p" || need+=("$p")
done

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "setup: missing packages (${need[*]}) and no root or sudo to install them." >&2
      echo "setup: ask an administrator to run: apt-get install ${need[*]}" >&2
      exit 1
    fi
  fi
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"; } >/tmp/nibble-apt.log 2>&1; then
    echo "setup: apt-get failed (log: /tmp/nibble-apt.log). Install by hand: ${need[*]}" >&2
    tail -5 /tmp/nibble-apt.log >&2
    exit 1
  fi
fi

# CUTLASS 4.2.0 C++ headers (CUTLASS 3.x collective builders, CuTe) for the sm_90a INT8 GEMM.
# Only when a CUDA compiler exists. The PyPI wheel nvidia-cutlass carries the headers under
# cutlass_library/source/include; we unpack only that folder into the git-ignored .cache/.
# CMake reads it through NIBBLE_CUTLASS_DIR (CMakeLists.txt). A failed download only warns:
# the CPU build and tests must not depend on it, and CMake then leaves the CUTLASS kernels out.
CUTLASS_VERSION=4.2.0
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cutlass_dest="$repo_root/.cache/cutlass-$CUTLASS_VERSION"
cutlass_include="$cutlass_dest/cutlass_library/source/include"
nvcc_bin="$(command -v nvcc || true)"
[ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc_bin=/usr/local/cuda/bin/nvcc
if [ -n "$nvcc_bin" ] && [ ! -f "$cutlass_include/cutlass/cutlass.h" ]; then
  echo "setup: fetching CUTLASS $CUTLASS_VERSION headers (PyPI wheel nvidia-cutlass) into $cutlass_dest"
  tmp="$(mktemp -d)"
  if python3 -m pip download -q --no-deps "nvidia-cutlass==$CUTLASS_VERSION.0" -d "$tmp" >"$tmp/pip.log" 2>&1; then
    # Python's zipfile instead of unzip(1), which not every image has.
    python3 - "$tmp" "$cutlass_dest" <<'PY' || true
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/nvidia_cutlass-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")]
    z.extractall(sys.argv[2], names)
PY
  fi
  if [ ! -f "$cutlass_include/cutlass/cutlass.h" ]; then
    echo "setup: WARNING: could not fetch the CUTLASS $CUTLASS_VERSION headers (log below); the CUDA" >&2
    echo "setup: INT8 GEMM kernels will be left out. Re-run scripts/setup.sh with network access." >&2
    tail -5 "$tmp/pip.log" >&2 || true
  fi
  rm -rf "$tmp"
fi
