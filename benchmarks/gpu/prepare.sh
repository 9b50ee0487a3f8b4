#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu/run.sh needs on a GPU machine without network:
#   .whl/  wheels of the project's pinned libraries that the GPU image lacks or has older
#          (bitsandbytes cut to its CUDA 13 and CPU libraries, to fit the 64 MiB a call carries)
#   .gpu/  SST-2 and the first AESLC rows, SmolLM2's tokenizer, the tiny Llama, and its fp32
#          quickstart run on this CPU (the reference the GPU parity run is compared with)
# Both folders are git-ignored (.git/info/exclude). Then, with the device tool:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu"], timeout_s=560)
# Dry run of the whole script on this CPU, tiny shapes: SKIP_INSTALL=1 SMALL=1 bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${LLAMA_TUNE_DATA:-../shared/datasets}
TRL_VERSION=1.16.0  # the peer of the throughput benchmark (not a project dependency)
PYTHON=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude

rm -rf .gpu .whl
mkdir -p .gpu/data/classification/sst2 .gpu/data/summarisation/aeslc .gpu/data/instruction \
    .gpu/smollm2-tokenizer .whl
cp "$DATA"/classification/sst2/{train,validation,test}.jsonl .gpu/data/classification/sst2/
cp -r "$DATA"/instruction/alpaca_en_demo .gpu/data/instruction/
head -n 4000 "$DATA"/summarisation/aeslc/train.jsonl >.gpu/data/summarisation/aeslc/train.jsonl
for split in validation test; do
    head -n 400 "$DATA/summarisation/aeslc/$split.jsonl" >".gpu/data/summarisation/aeslc/$split.jsonl"
done
BUILTIN=$("$PYTHON" -c 'from llama_tune import models; print(models.builtin_folder("smollm2-135m-instruct"))')
cp "$BUILTIN"/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2-tokenizer/

"$PYTHON" benchmarks/gpu/shapes.py tiny .gpu/tiny --tokenizer .gpu/smollm2-tokenizer
LLAMA_TUNE_DATA=.gpu/data "$PYTHON" benchmarks/gpu/parity.py run .gpu/tiny .gpu/parity-cpu
rm -rf .gpu/parity-cpu/checkpoints

# Versions from constraints.txt, for CPython 3.12 on x86-64 (the GPU image's Python).
pin() { grep -i "^$1==" constraints.txt; }
PACKAGES="transformers peft huggingface_hub datasets evaluate pydantic pydantic_core annotated-types
typing-inspection typing_extensions dill multiprocess gguf bitsandbytes tokenizers httpx2 httpcore2
truststore click fsspec regex nltk sacrebleu"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(for package in $PACKAGES; do pin "$package"; done) "trl==$TRL_VERSION"
# rouge_score is published as source only: build its (pure Python) wheel here.
"$PYTHON" -m pip wheel -q --no-deps -w .whl "$(pin rouge_score)"
zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
du -sh .whl .gpu
