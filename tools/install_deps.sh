#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test msa-train on the CPU:
# a C compiler and make, jansson (configs), HDF5 (data, checkpoints), OpenBLAS (CPU GEMMs),
# OpenMPI (dist/: mpicc's flags for the build, mpirun for distributed runs and tests/test_dist),
# pkg-config, and Python 3 with venv for the tools (tools/hf_import.py, hf_export.py,
# hf_tokenize.py, plot_run.py). The tools' PyPI packages (tools/requirements.txt) go into a virtual environment
# at .venv in the repository (Debian refuses system-wide pip installs, PEP 668); `make test` runs
# the Python tests with .venv/bin/python. Needs root (or sudo) for apt. Safe to run again: installs
# only what is missing.
#   --fuzz  also clang with its sanitizer and libFuzzer runtimes and LLVM's OpenMP, for `make fuzz-smoke`
#           (tests/fuzz/; CI installs them, building and training need none of them)
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(build-essential pkg-config libjansson-dev libhdf5-dev libopenblas-openmp-dev libopenmpi-dev openmpi-bin
      python3 python3-venv python3-pip)
for arg in "$@"; do
    case $arg in
    --fuzz)
        pkgs+=(clang libomp-dev)
        # Debian 12 ships libFuzzer and the sanitizer runtimes in libclang-rt-dev, which clang only
        # recommends; older releases have them in a package clang depends on
        if apt-cache show libclang-rt-dev >/dev/null 2>&1; then pkgs+=(libclang-rt-dev); fi
        ;;
    *) echo "usage: tools/install_deps.sh [--fuzz]" >&2; exit 2 ;;
    esac
done
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_deps: all of ${pkgs[*]} already installed"
else
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "install_deps: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# Python packages of the tools, in .venv (kept out of git)
modules=$(sed -e 's/#.*//' -e 's/[<>=!~ ].*//' tools/requirements.txt | grep . | paste -sd, -)
if .venv/bin/python -c "import $modules" >/dev/null 2>&1; then
    echo "install_deps: .venv already has the tools' Python packages"
else
    # the python3 on PATH (it may be a pyenv one), else Debian's own
    python3 -m venv .venv 2>/dev/null || { rm -rf .venv; /usr/bin/python3 -m venv .venv; }
    echo "install_deps: installing tools/requirements.txt into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r tools/requirements.txt
fi

# CUTLASS's C++ headers for the CUDA build's grouped GEMM (kernels/cuda/moe_grouped_gemm.cu), from PyPI's
# nvidia-cutlass wheel (include/ and tools/util/include/ of its cutlass_library/source) into
# .deps/cutlass/include, where the Makefile looks (CUTLASS_INCLUDE). Header-only, ~28 MB; .deps is kept out
# of git and carried to machines without network as it is.
cutlass_version=4.2.0.0
cutlass_dir=.deps/cutlass
if [ "$(cat "$cutlass_dir/VERSION" 2>/dev/null)" = "$cutlass_version" ]; then
    echo "install_deps: $cutlass_dir has CUTLASS $cutlass_version"
else
    echo "install_deps: unpacking CUTLASS $cutlass_version's headers into $cutlass_dir/include"
    wheel_dir=$(mktemp -d)
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" "nvidia-cutlass==$cutlass_version"
    rm -rf "$cutlass_dir"
    .venv/bin/python - "$wheel_dir"/nvidia_cutlass-*.whl "$cutlass_dir/include" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
roots = ("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/")
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        root = next((r for r in roots if name.startswith(r)), None)
        if root is None or name.endswith("/"):
            continue
        path = os.path.join(dest, name[len(root):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(z.read(name))
        n += 1
if n == 0:
    sys.exit(f"install_deps: {wheel} has no CUTLASS headers under {roots}")
PY
    echo "$cutlass_version" > "$cutlass_dir/VERSION"
    rm -rf "$wheel_dir"
fi
