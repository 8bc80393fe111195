#!/usr/bin/env bash
# Runs the C++ kernels' aarch64 build (NEON and portable levels) on an x86-64 Debian/Ubuntu machine:
# csrc/ cross-compiled with setup.py's aarch64 flags, then the self-check and the CPU kernel tests
# under qemu-user with an aarch64 Python and torch. This checks results, not speed (emulated time
# says nothing about an ARM CPU). On a real ARM machine, run the README's test command instead.
#
# Needs root and apt-get (qemu-user-static, the cross compiler, arm64 Python packages) and PyPI
# (torch 2.9.1, the last aarch64 CPU-only wheel there; later aarch64 wheels are CUDA builds).
# Downloads about 150 MB once (825 MB unpacked in .arm/); later runs reuse them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ARM=$ROOT/.arm
TORCH_AARCH64=2.9.1
SYSROOT=$ARM/sysroot  # Debian's arm64 python3.11 and the libraries it and torch load
SITE=$ARM/site        # aarch64 wheels, unpacked
BUILD=$ARM/build
PY=$SYSROOT/usr/bin/python3.11-qemu

bash scripts/setup.sh >/dev/null  # the host venv: setup.py's flags, and the x86 pip that fetches wheels
mkdir -p "$ARM"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  apt-get update -qq >/dev/null && apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu >/dev/null
fi

if [ ! -x "$PY" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq >/dev/null
  mkdir -p "$ARM/debs" "$SYSROOT"
  # python3.11:arm64 cannot be installed beside the host's python3.11, so its packages are unpacked.
  packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances --no-pre-depends python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 \
    libgomp1:arm64 libstdc++6:arm64 | grep -E '^[a-z0-9].*:arm64$' | sort -u)
  (cd "$ARM/debs" && apt-get download $packages >/dev/null)
  for deb in "$ARM"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  # qemu-user runs the interpreter; naming this wrapper as argv[0] makes it sys.executable, so the
  # tests' subprocesses (sys.executable -c ...) run under qemu too.
  cat >"$PY" <<'EOF'
#!/bin/sh
bin=$(cd "$(dirname "$0")" && pwd)
exec qemu-aarch64-static -L "${bin%/usr/bin}" -0 "$bin/python3.11-qemu" "$bin/python3.11" "$@"
EOF
  chmod +x "$PY"
fi

if [ ! -d "$SITE/torch" ]; then
  mkdir -p "$ARM/wheels" "$SITE"
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp -d "$ARM/wheels" \
    "torch==$TORCH_AARCH64" numpy markupsafe
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d "$ARM/wheels" \
    filelock typing-extensions sympy mpmath networkx jinja2 fsspec pytest pluggy iniconfig packaging pygments
  for wheel in "$ARM"/wheels/*.whl; do .venv/bin/python -m zipfile -e "$wheel" "$SITE"; done
fi

# csrc/ with exactly the flags setup.py uses for aarch64 (-std: torch 2.9's BuildExtension default).
setup_py() { .venv/bin/python -c "import runpy; print(' '.join(runpy.run_path('setup.py', run_name='gmt_kernels_setup')$1))"; }
read -r -a COMPILE <<<"$(setup_py "['compile_args']('aarch64', 'unix', 'linux')")"
read -r -a LINK <<<"$(setup_py "['link_args']('unix', 'linux')")"
TORCH_DIR=$SITE/torch
INCLUDES=(-I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" -I"$SYSROOT/usr/include/python3.11"
  -I"$SYSROOT/usr/include/aarch64-linux-gnu/python3.11" -idirafter "$SYSROOT/usr/include")
rm -rf "$BUILD" && mkdir -p "$BUILD"
printf '%s\n' csrc/*.cpp | xargs -P "$(nproc)" -I{} sh -c 'aarch64-linux-gnu-g++ -std=c++17 -fPIC \
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "$@" -c {} -o "$0/$(basename {} .cpp).o"' \
  "$BUILD" "${COMPILE[@]}" "${INCLUDES[@]}"
EXT=_C.cpython-311-aarch64-linux-gnu.so
aarch64-linux-gnu-g++ -shared "${LINK[@]}" "$BUILD"/*.o -L"$TORCH_DIR/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -o "$BUILD/$EXT"

# A copy of the working tree (tracked and untracked files git does not ignore) with the aarch64 module.
rm -rf "$ARM/src" && mkdir -p "$ARM/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$ARM/src"
cp "$BUILD/$EXT" "$ARM/src/gmt_kernels/"
cd "$ARM/src"
export PYTHONPATH=$ARM/src:$SITE
"$PY" -m gmt_kernels.selfcheck --quick --json "$ARM/selfcheck.json"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cpu_capability.py tests/test_cpu_backend.py \
  tests/test_criteria_kernels.py -k "not triton" "$@"  # triton is not in this Python
