#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test msa-train on the CPU:
# a C compiler and make, jansson (configs), HDF5 (data, checkpoints), OpenBLAS (CPU GEMMs),
# pkg-config. Needs root (or sudo). Safe to run again: installs only what is missing.
set -euo pipefail
pkgs=(build-essential pkg-config libjansson-dev libhdf5-dev libopenblas-openmp-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_deps: all of ${pkgs[*]} already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
