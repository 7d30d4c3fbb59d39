#!/usr/bin/env bash
# The GPU checks, as one call of a lent GPU machine (no registry there): the CUDA tests
# (tests/test_gpu.py: AMP bf16/fp16, DataLoader, resume, fused CNNs, ResNet-18s and fp16 MLPs)
# and the fused benchmark on CUDA (16 digits CNNs, 8 ResNet-18s; GPU utilisation of each). The machine's own
# torch is used; the pure-Python packages it lacks travel as wheels in .whl/ (hydra-core,
# omegaconf, antlr4-python3-runtime; see docs/benchmarks.md). Logs go to $OUT (or ./gpu-logs).
set -o pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, platform; print('torch', torch.__version__, 'Python', platform.python_version(), torch.cuda.get_device_name())" | tee -a "$OUT/machine.txt"
timeout "${TEST_S:-240}" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  --durations=5 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_S:-300}" python3 scripts/bench_fused.py --device cuda --only ${CASES:-cnn16 resnet8} \
  --repeats "${REPEATS:-2}" 2>&1 | tee "$OUT/bench_fused.log"
