#!/usr/bin/env bash
# The wheels bench/gpu_device.sh installs on a lent GPU machine, made here (PyPI is reachable here, not there). The
# image has Python 3.12, torch 2.11 (CUDA 13), triton and an older transformers, and no deepspeed or pydantic; these
# are requirements-lock.txt's versions (deepspeed is an sdist: built here into a pure-Python wheel, its ops JIT-built
# on the GPU), plus liger-kernel for the Liger lever (torchao: train.float8). Run in the repo root:
#   bash bench/gpu_wheels.sh        # -> .whl/ (about 25 MB), ignored through .git/info/exclude
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pins=""
for package in pydantic pydantic_core annotated-types typing-inspection hjson transformers tokenizers huggingface_hub \
               safetensors httpx2 httpcore2 hf-xet regex click torchao; do
  pins="$pins $(grep -i "^$package==" requirements-lock.txt)"
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins liger-kernel==0.8.5
python3 -m pip wheel -q --no-deps -w .whl "$(grep -i '^deepspeed==' requirements-lock.txt)"
ls .whl
