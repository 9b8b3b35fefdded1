#!/usr/bin/env bash
# Installs what reattn builds and tests with, from Debian/Ubuntu packages. Run as root
# (or through sudo). The CUDA backend additionally needs nvcc and NCCL (/usr/local/cuda).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential cmake python3 python3-yaml python3-numpy python3-pip python3-setuptools \
  libopenmpi-dev openmpi-bin \
  libyaml-cpp-dev libboost-dev nlohmann-json3-dev libspdlog-dev libcli11-dev libgtest-dev zlib1g-dev \
  > /dev/null
echo "install-deps: done"
