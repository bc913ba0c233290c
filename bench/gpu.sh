#!/usr/bin/env bash
# Everything issue 13 asks of a GPU, in one command, for any session or machine that has one:
#   bash bench/gpu.sh [OUT_DIR]          (default artifacts/gpu; set up as the README's test command does)
# 1. tests.log:  the whole test suite on CUDA, both hosts (ComfyUI trains and samples on the GPU it finds: every
#                family through the nodes, device placement, model management between nodes);
# 2. memory.log: bench/memory.py at the full depth, 1024 px, batch 1, rank 16: bf16, fp8, fp8 + checkpointing and
#                fp8 + offload under 10 and 16 GB, for FLUX.1, Qwen-Image and SDXL (max allocated / reserved,
#                step time, share of the bf16 peak);
# 3. suite.log:  bench/suite.py at 512 px, batch 1 and 4: our step against ComfyUI's own trainer, and the
#                cold / warm prompt.
# Each part writes its own log and a failing part does not stop the next; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-artifacts/gpu}"
mkdir -p "$out"
PY=.comfyui/0.33.0/venv/bin/python  # the host venv the benchmarks run in (bash scripts/dev.sh test makes it)
if [ ! -x "$PY" ]; then
  echo "bench/gpu.sh: $PY is missing; run 'bash scripts/dev.sh test' once first (it sets the hosts up)" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "bench/gpu.sh: torch in $PY finds no CUDA device; this script measures a GPU" >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")' | tee "$out/device.txt"
status=0
run() {  # run NAME COMMAND...: output to $out/NAME.log (and the terminal), remember the first failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$status" -ne 0 ] || status=$rc
}
run tests bash scripts/dev.sh test
run memory "$PY" bench/memory.py --px 1024 --models flux qwen sdxl --budgets-gb 10 16
run suite "$PY" bench/suite.py --sizes 512 --batches 1 4
exit "$status"
