#!/usr/bin/env bash
# The GPU check of issue 17, on one GPU machine without network, in under 10 minutes:
#   1. parity:     the quickstart's first fp32 steps on the tiny Llama equal the CPU's (1e-4)
#   2. quickstart: the quickstart recipe end to end (train, evaluate) on a SmolLM2-shaped model
#                  with random weights (the built-in GGUF is too big to carry)
#   3. llama-1b:   LoRA in bf16 on a random Llama-3.2-1B shape, SST-2, AESLC and alpaca (packed;
#                  TRL padding-free) (100 measured steps after 10 of warm-up, each trainer,
#                  one round): tokens/s, peak memory and MFU, llama-tune against TRL
#                  (benchmarks/train_throughput.py)
#      packed-attention (before the throughput runs): on the 1B shape, packed alpaca rows
#                  through torch's varlen flash attention train as through one SDPA call per
#                  example (bf16 noise), and the step time of each
#      compiled:   llama-tune alone on SST-2 with model.compile (each decoder layer compiled,
#                  during the warm-up steps): the 1B step is launch-bound, which fusing helps
#   4. profile:    torch.profiler over 5 of llama-tune's 1B steps: where a step's time goes
#   5. llama-8b:   QLoRA on a random Llama-3.1-8B shape for a few steps: peak memory; then the
#                  same in bf16 LoRA for comparison
# Prepare here first: bash benchmarks/gpu/prepare.sh. Then, with the device tool:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu"], timeout_s=560)
# Results land in $OUT: gpu.log (everything printed), the throughput JSONs and runs.tar.gz (the
# run folders without weights). Each phase has its own time limit and a failed phase does not
# stop the next. Dry run on a CPU with tiny shapes: SKIP_INSTALL=1 SMALL=1 bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/gpu}
RUNS=${RUNS:-/tmp/llama-tune-gpu}
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/gpu.log") 2>&1

PYTHON=${PYTHON:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$REPO/src:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export LLAMA_TUNE_DATA=$REPO/.gpu/data LLAMA_TUNE_CACHE=$RUNS/cache
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENIZER=$REPO/.gpu/smollm2-tokenizer

# SMALL=1 swaps every shape for the tiny one and shortens runs: a dry run of this script.
if [ -n "${SMALL:-}" ]; then
    QUICK_SHAPE=tiny LARGE_SHAPE=tiny HUGE_SHAPE=tiny STEPS=6 QUICK="train.max_steps=6 data.max_eval_rows=16"
    SST2_BATCH=8 AESLC_BATCH=4 PACKED_ROWS=8
else
    QUICK_SHAPE=smollm2-135m LARGE_SHAPE=llama-3.2-1b HUGE_SHAPE=llama-3.1-8b STEPS=${STEPS:-100} QUICK=""
    SST2_BATCH=64 AESLC_BATCH=16 PACKED_ROWS=32
fi
export PYTHON RUNS OUT TOKENIZER QUICK_SHAPE LARGE_SHAPE HUGE_SHAPE STEPS QUICK

# Phases are cut to what is left of DEADLINE seconds, so that the files are packed before the
# device tool's own time limit (timeout_s) stops the script. PHASES picks some phases by name
# (to rerun them), STEPS the measured steps of the throughput runs.
DEADLINE=${DEADLINE:-520}
PHASES=${PHASES:-environment parity quickstart large-shape packed-attention throughput-sst2 throughput-sst2-compiled throughput-aeslc throughput-alpaca profile huge-shape qlora-8b lora-8b}
phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, report its exit status and time
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ " $PHASES " == *" $name "* ]] || return 0
    limit=$((limit < DEADLINE - SECONDS ? limit : DEADLINE - SECONDS))
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, ${DEADLINE} s deadline reached"
        return
    fi
    echo "=== $name (limit ${limit} s)"
    # The phases are shell functions: a child bash runs them (export -f) under timeout.
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@"
    echo "=== $name: exit $? after $((SECONDS - started)) s"
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PYTHON" - <<'PYTHON'
import torch, transformers, peft, accelerate, datasets, bitsandbytes, trl, pyarrow
from llama_tune.runtime import model_device
print({m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate, datasets, bitsandbytes, trl, pyarrow)})
print("model device:", model_device())
if torch.cuda.is_available():
    from model_flops import measured_matmul_tflops
    print(f"bf16 8192^3 matmul: {measured_matmul_tflops():.0f} TFLOP/s")
PYTHON
}

quickstart() {
    "$PYTHON" benchmarks/gpu/shapes.py "$QUICK_SHAPE" "$RUNS/quick-model" --tokenizer "$TOKENIZER" &&
        # $QUICK: dry-run overrides, split into words on purpose.
        # shellcheck disable=SC2086
        "$PYTHON" -m llama_tune train recipes/quickstart.yaml "model.name=$RUNS/quick-model" \
            "output.dir=$RUNS/quickstart" $QUICK --overwrite &&
        "$PYTHON" -m llama_tune evaluate "$RUNS/quickstart" --split test --limit 400 --base
}

throughput() {  # throughput TASK BATCH MAX_LENGTH [OPTIONS...]
    "$PYTHON" benchmarks/train_throughput.py --model "$RUNS/large-model" --task "$1" \
        --batch-size "$2" --max-length "$3" --steps "$STEPS" --warmup 10 --rows 4000 \
        --rounds 1 --precision bf16 --output "$OUT" "${@:4}"
}

memory() {  # memory NAME OVERRIDES...: a few QLoRA/LoRA steps on the 8B shape, peak memory
    local name=$1
    shift
    "$PYTHON" -m llama_tune train recipes/sst2_qlora.yaml "model.name=$RUNS/huge-model" \
        "output.dir=$RUNS/$name" train.max_steps=10 train.batch_size=8 logging.every=1 \
        validation.every=null checkpoint.every=null data.max_eval_rows=16 "$@" --overwrite &&
        "$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print('$name', s['device'], 'peak GiB', s['peak_memory_gib'], 'tokens/s', s['tokens_per_s'])" \
            "$RUNS/$name/summary.json"
}

export -f environment quickstart throughput memory
phase environment 90 environment
phase parity 90 bash -c "'$PYTHON' benchmarks/gpu/parity.py run .gpu/tiny '$RUNS/parity-gpu' &&
    '$PYTHON' benchmarks/gpu/parity.py compare .gpu/parity-cpu '$RUNS/parity-gpu'"
phase quickstart 150 quickstart
phase large-shape 60 "$PYTHON" benchmarks/gpu/shapes.py "$LARGE_SHAPE" "$RUNS/large-model" --tokenizer "$TOKENIZER"
phase packed-attention 60 "$PYTHON" benchmarks/gpu/packed_attention.py --model "$RUNS/large-model" \
    --rows "$PACKED_ROWS"
phase throughput-sst2 150 throughput sst2 "$SST2_BATCH" 128
phase throughput-sst2-compiled 150 throughput sst2 "$SST2_BATCH" 128 --ours-only --compile
phase throughput-aeslc 150 throughput aeslc "$AESLC_BATCH" 512
phase throughput-alpaca 150 throughput alpaca "$AESLC_BATCH" 1024
phase profile 90 "$PYTHON" benchmarks/gpu/profile_steps.py --model "$RUNS/large-model" \
    --batch-size "$SST2_BATCH"
rm -rf "$RUNS/large-model"
phase huge-shape 120 "$PYTHON" benchmarks/gpu/shapes.py "$HUGE_SHAPE" "$RUNS/huge-model" --tokenizer "$TOKENIZER"
phase qlora-8b 120 memory qlora-8b
phase lora-8b 90 memory lora-8b model.quantization=none

tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude='*-model' \
    --exclude=cache --exclude='*.pt' --exclude='*.bin' . 2>/dev/null
echo "=== done in $SECONDS s"
