#!/usr/bin/env bash
# Every GPU check in one go (under 8 minutes: 445 s of part limits): the CUDA tests, the speed,
# recipe and LoRA benchmarks, the server's tests, FSDP on NCCL and the memory benchmark. Run from the repository root on a machine
# with a CUDA build of torch:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Missing pure-Python dependencies may be put as wheels in .gpu/wheels (an offline machine).
# Each part has its own time limit, so one slow part cannot starve the others; the figures go
# to OUT_DIR (default: gpu-check/) as markdown, one file per part, plus the recipe plot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run one part with a limit, keep its output
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.err"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    tail -n 40 "$OUT/$name.md"
    [ $rc -eq 0 ] || tail -n 20 "$OUT/$name.err"
}

if [ -d .gpu/wheels ]; then
    "$PY" -m pip install --quiet --no-deps --no-index .gpu/wheels/*.whl 2>&1 | tail -n 3
fi
if ! "$PY" -c 'import pytest' 2>/dev/null && [ -d .gpu/test-wheels ]; then
    "$PY" -m pip install --quiet --no-deps --no-index .gpu/test-wheels/*.whl 2>&1 | tail -n 3
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda",
torch.version.cuda, "|", torch.cuda.get_device_name(0), "| transformers",
transformers.__version__, "| peft", peft.__version__)'
} | tee "$OUT/machine.md"

part tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_precision.py \
    tests/test_answers_accuracy.py
# all seven recipe runs take ~150 s on an H100; two give the GPU rows of docs/recipe.md in ~60 s
part recipe 70 "$PY" benchmarks/bench_recipe.py --device cuda --precision bf16 \
    --only default,gpt2-adamw --out "$OUT/recipe"
part speed 40 "$PY" benchmarks/bench_speed.py --parts in-process --device cuda --precision bf16 --steps 60 \
    --ref-steps 200 --eval-iters 10
part lora 35 "$PY" benchmarks/bench_lora.py --device cuda --precision bf16 --steps 20
# the server on the GPU (DEVICE=auto): batched decoding, the openai client, 16 concurrent clients
part serve 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_serve_engine.py tests/test_serve_live.py
# PARALLEL=fsdp on NCCL (2 processes where 2 GPUs are lent; one GPU: the sharded checkpoint
# of CUDA tensors and bf16), then the memory of DDP vs FSDP for the 355M GPT-2-medium shape
NGPU=$("$PY" -c 'import torch; print(min(torch.cuda.device_count(), 2))')
part fsdp 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fsdp.py -k "cuda or sharded"
part memory 80 "$PY" benchmarks/bench_memory.py --device cuda --nproc "$NGPU" --shape medium \
    --steps 3 --batch 4 --block 1024
# question/answer learning: a smoke run of bench_qa (it trains on the CPU; answers batched)
part qa 30 "$PY" benchmarks/bench_qa.py --quick --out "$OUT/qa"
echo "=== done in ${SECONDS}s"
