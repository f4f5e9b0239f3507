#!/usr/bin/env bash
# Every check of the lent GPU machine in one run (see ../shared/docs/gpu.md): the Triton
# kernels on CUDA, issue 13's measurement (benchmarks/bench_gpu.py) with its torch-ops
# baseline and the gpu-marked tests first, then each user-facing command with --device cuda
# on a tiny checkpoint, the server on CUDA over real HTTP, a short `pio bench --device cuda`,
# and last the whole test suite on that machine's torch. Writes under $OUT.
# Run from the checkout root there, with the wheels it lacks in .whl (gpu.md says how):
#   bash benchmarks/gpu_smoke.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 INFERENCE_PIO_OFFLINE=1
export INFERENCE_PIO_CACHE=/tmp/pio-cache
# the project is not installed there: a `pio` on PATH that runs it from the tree
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m inference_pio "$@"\n' >/tmp/bin/pio \
  && chmod +x /tmp/bin/pio && export PATH=/tmp/bin:$PATH
log=$OUT/log.txt
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"; nproc; } >"$log" 2>&1

step() { echo "=== $1" | tee -a "$log"; shift; timeout "$@" >>"$log" 2>&1; echo "rc=$?" | tee -a "$log"; }

# One device call runs at most 600 s (and a session has 900 s of device time): the Triton
# kernels' correctness on CUDA first (a wrong kernel makes the figures meaningless), then the
# measurement, its torch-ops baseline, and the rest as far as the time goes; the log keeps
# every finished step.
step "Triton kernels on CUDA against their oracles" 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/test_triton_kernels.py
step "issue 13: the 48-layer bf16 model on the GPU (decode 1/16/64, prefill 2048, step profile)" 300 python3 benchmarks/bench_gpu.py --num-layers 48
step "issue 13 baseline: the same with torch ops (no Triton), decode 1/16" 150 python3 benchmarks/bench_gpu.py --num-layers 48 --ops cuda --streams 1,16 --tokens 16
step "gpu-marked tests (transformers on CUDA, torch and Triton ops, batch compositions, no host sync)" 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" -m gpu tests/test_device_path.py
step "kernels warmup (CPU build on this machine)" 240 pio warmup
step "make a tiny checkpoint" 60 pio make-test-model --out /tmp/tiny --force
step "generate on cuda (fp32)" 120 pio generate --model /tmp/tiny --device cuda --dtype float32 --raw --prompt "def fib(n):" --max-tokens 16 --temperature 0 --json
step "generate on cuda (bf16, chat template)" 120 pio generate --model /tmp/tiny --device cuda --prompt "Write a sort." --max-tokens 16
step "bench on cuda, 4 layers bf16" 300 pio bench --device cuda --num-layers 4 --quantization bf16 --prompt-len 128 --streams 1,16 --decode-tokens 16
# the server on CUDA, one completion over real HTTP
pio serve --model /tmp/tiny --device cuda --port 8391 >"$OUT/serve.txt" 2>&1 &
spid=$!
for _ in $(seq 1 120); do curl -sf localhost:8391/health >/dev/null && break; sleep 1; done
echo "=== serve on cuda" | tee -a "$log"
curl -s localhost:8391/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"/tmp/tiny","prompt":"def add(a, b):","max_tokens":8,"temperature":0}' >>"$log" 2>&1
echo | tee -a "$log"
kill -INT $spid; wait $spid; echo "serve rc=$?" | tee -a "$log"
tail -5 "$OUT/serve.txt" >>"$log"
step "test suite on this torch (CPU tests)" 420 python3 -m pytest -q -x -p no:cacheprovider -o addopts="-ra" tests
