#!/usr/bin/env bash
# Set up everything rat needs on a fresh Debian/Ubuntu machine, then run one task.
#
#   bash tools/bootstrap.sh demo   # system packages + .venv + pip install -e .[dev], then ./run_train.sh (the demo)
#   bash tools/bootstrap.sh test   # the same set-up, then ruff and the whole test suite
#   bash tools/bootstrap.sh        # set-up only
#
# System packages (needs root or sudo; skipped with RAT_SKIP_APT=1 when you manage them yourself):
#   g++ pkg-config libopencv-dev libturbojpeg0-dev  — to build ffcv's C extension
#   python3-dev python3-venv                        — headers and venv for Debian's own Python
# The Python environment lives in .venv (override with RAT_VENV); it is re-installed only when setup.py changes.
set -euo pipefail
cd "$(dirname "$0")/.."

task="${1:-setup}"
case "$task" in
  setup|demo|test) ;;
  *) echo "bootstrap.sh: unknown task '$task' (use one of: setup, demo, test)" >&2; exit 2 ;;
esac

APT_PACKAGES=(g++ pkg-config libopencv-dev libturbojpeg0-dev python3-dev python3-venv)
if [[ "${RAT_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    sudo_cmd=()
    [[ "$(id -u)" != 0 ]] && sudo_cmd=(sudo)
    echo "[bootstrap] installing system packages: ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PYTHON="${PYTHON:-python3}"
VENV="${RAT_VENV:-.venv}"
stamp="$VENV/.rat-installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[bootstrap] creating Python environment in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
  # ffcv's setup.py imports numpy at build time, so it builds without build isolation after numpy is in.
  "$VENV/bin/python" -m pip install -q "numpy>=1.26,<3" "Cython>=3" pkgconfig
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev]"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

case "$task" in
  demo) exec ./run_train.sh ;;
  test) ruff check . && exec python -m pytest ;;
  setup) echo "[bootstrap] ready: source $VENV/bin/activate" ;;
esac
