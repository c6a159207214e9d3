#!/usr/bin/env bash
# The GPU benchmark, run once on a GPU machine (H100/H200 image: torch 2.11, transformers 5.17, no TRL).
#
# Prepare on the CPU machine, in the repo root (the image lacks trl, datasets, dill, multiprocess):
#   echo /.gpu/ >> .git/info/exclude
#   pip download --python-version 3.12 --only-binary=:all: --no-deps trl==1.16.0 datasets dill multiprocess -d .gpu/whl
# Then, with the device tool:
#   run(command="bash bench/gpu_run.sh", carry=[".gpu"], timeout_s=560)
# Everything lands in $OUT: gpu.json (every run), gpu.md (the table for BENCHMARKS.md), log.txt, env.txt.
# Commit gpu.json as bench/results/gpu-<date>.json and paste gpu.md into BENCHMARKS.md.
#
# Budget: runs start only during the first BUDGET_S seconds (default 430), in priority order: qwen05
# prompt-heavy (preftune, TRL default, preftune with checkpointing, TRL without, then FlexAttention off and
# the plain path for the bf16 exactness check), qwen05 response-heavy, llama1b prompt-heavy, llama1b
# response-heavy. Skipped runs are listed; rerun them with PRESETS=llama1b EXTRA_FIRST= EXACT= bash bench/gpu_run.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/preftune-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate, trl, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout $(( ${BUDGET_S:-430} + 120 )) python3 bench/run.py --device cuda \
  --presets "${PRESETS:-qwen05,llama1b}" --steps "${STEPS:-16}" --batch-size 8 --runs 1 \
  --extra-first "${EXTRA_FIRST-preftune_sdpa}" ${EXACT---exact} --budget-s "${BUDGET_S:-430}" \
  --fixture-dir /tmp/preftune-fixture --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tee "$OUT/log.txt"
