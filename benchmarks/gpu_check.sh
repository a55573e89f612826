#!/usr/bin/env bash
# Every GPU check in one go (under 13 minutes on one H100): the CUDA tests, then the speed,
# recipe, LoRA and sampling benchmarks on the GPU. Run from the repository root on a machine
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

part tests 85 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_precision.py \
    tests/test_answers_accuracy.py
# all seven recipe runs take ~150 s on an H100; three give the GPU table of docs/recipe.md in ~75 s
part recipe 95 "$PY" benchmarks/bench_recipe.py --device cuda --precision bf16 \
    --only default,llama-adamw,gpt2-adamw --out "$OUT/recipe"
part recipe_compile 60 "$PY" benchmarks/bench_recipe.py --device cuda --precision bf16 --compile \
    --only default --out "$OUT/recipe_compile"
part step_parts 30 "$PY" benchmarks/bench_step_parts.py --device cuda --steps 40
part speed 40 "$PY" benchmarks/bench_speed.py --parts in-process --device cuda --precision bf16 --steps 60 \
    --ref-steps 200 --eval-iters 10
part speed_compile 60 "$PY" benchmarks/bench_speed.py --parts in-process --device cuda --precision bf16 --compile \
    --steps 60 --ref-steps 200 --eval-iters 10
part lora 35 "$PY" benchmarks/bench_lora.py --device cuda --precision bf16 --steps 20
part sample 35 "$PY" benchmarks/bench_sample.py --device cuda
# PARALLEL=fsdp on NCCL (2 processes where 2 GPUs are lent; one GPU: the sharded checkpoint
# of CUDA tensors and bf16), then the memory of DDP vs FSDP for the 355M GPT-2-medium shape
NGPU=$("$PY" -c 'import torch; print(min(torch.cuda.device_count(), 2))')
part fsdp 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fsdp.py -k "cuda or sharded"
part memory 150 "$PY" benchmarks/bench_memory.py --device cuda --nproc "$NGPU" --shape medium \
    --steps 3 --batch 4 --block 1024
# question/answer learning: a smoke run of bench_qa (it trains on the CPU; answers batched)
part qa 40 "$PY" benchmarks/bench_qa.py --quick --out "$OUT/qa"
echo "=== done in ${SECONDS}s"
