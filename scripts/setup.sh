#!/usr/bin/env bash
# Installs what nibble needs to build and test, from Debian's packages (and the CUTLASS
# headers from PyPI when CUDA is present). Idempotent: installs only what is missing.
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in cmake g++ make libgtest-dev nlohmann-json3-dev libcli11-dev zlib1g-dev; do
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
