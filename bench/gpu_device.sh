#!/usr/bin/env bash
# Issue 30's checks on a lent GPU machine, as one prepared command (the device tool's run, carry [".whl"] made by
# bench/gpu_wheels.sh), in the repo root:
#   bash bench/gpu_device.sh
# 1. the carried wheels installed over the image's torch (its torch, CUDA and triton are used as they are);
# 2. the smoke check (about a minute, at most 100 + 90 s): the GPU parity tests of the levers, then bench/gpu_mfu.py
#    --tiny on the levers that compile or need a GPU (a failure there is shown and the measurement runs anyway: it
#    records each phase's error and goes on);
# 3. the measurement: bench/gpu_mfu.py at seq 2048 within BUDGET_S seconds (default 200), every phase written as it ends.
# At most about 8 minutes: run it with timeout_s 540. Everything lands in $OUT (bench/measured/ without it); copy
# gpu-mfu.json to bench/measured/gpu-mfu-<gpu>.json.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 2
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
OUT=${OUT:-bench/measured}
BUDGET_S=${BUDGET_S:-200}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 100 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu.py \
  -k "flex or liger or float8 or bf16_pipeline_matches_hf_on_cuda and llama" 2>&1 | tail -15 | tee "$OUT/gpu-tests.txt"
timeout 90 python3 bench/gpu_mfu.py --tiny --no-baseline --only compile,documents-flex,liger,float8 --budget-s 60 \
  --out "$OUT/gpu-mfu-smoke.json"
timeout $(( BUDGET_S + 60 )) python3 bench/gpu_mfu.py --budget-s "$BUDGET_S" --out "$OUT/gpu-mfu.json"
