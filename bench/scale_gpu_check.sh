#!/usr/bin/env bash
# Scale-out checks on one GPU (issue 15). One process under FSDP2 and under DeepSpeed ZeRO-3 still runs the
# sharding code (fully_shard / ZeRO partitioning, sharded checkpoints, gathered final/), so a single GPU
# checks what the CPU tests cannot: NCCL, CUDA placement, bf16 FSDP2, DeepSpeed. Each run: 4 steps of a random
# 0.67B Llama (no downloads). Prints, per run, the loss and final-weight gaps to the one-process fp32 run, the
# wrapper type, and the peak GPU memory against `preftune plan`. About 4 minutes on an H100.
#
#   bash bench/scale_gpu_check.sh                   # SCALE_DIR=/tmp/scale_gpu by default (models: GBs)
#   DS_WHEELS=path/to/wheels bash bench/scale_gpu_check.sh   # also ZeRO-3 (pip installs deepspeed from there)
#
# The GPU image has no DeepSpeed and Python 3.12; build its wheels on the CPU machine, in the repo root (checked
# there: a py3-none-any deepspeed wheel and cp312 wheels of its compiled dependencies):
#   echo /ds_wheels/ >> .git/info/exclude
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w ds_wheels
#   .venv/bin/pip download --python-version 3.12 --only-binary=:all: --no-deps hjson msgpack ninja py-cpuinfo \
#       einops pydantic pydantic_core annotated_types typing_inspection -d ds_wheels
# then, with the device tool (ignored paths travel only when named in carry):
#   run(command="SCALE_DIR=/tmp/scale_gpu DS_WHEELS=ds_wheels timeout 560 bash bench/scale_gpu_check.sh; cp /tmp/scale_gpu/*.log $OUT/",
#       carry=["ds_wheels"], timeout_s=590)
set -uo pipefail
OUT=${SCALE_DIR:-/tmp/scale_gpu}  # not $OUT: the device tool uses that name for what comes back
PY=${PY:-python}
ACC=${ACC:-accelerate}
SEQ=${SEQ:-256}
BS=${BS:-8}
HIDDEN=${HIDDEN:-2048}   # HIDDEN=64 LAYERS=2 SEQ=64: a quick dry run on a CPU
LAYERS=${LAYERS:-16}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=4

$PY - "$OUT" "$SEQ" "$BS" "$HIDDEN" "$LAYERS" <<'PYEOF'
import json, random, sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import WORDS, build_tiny_model
out, seq, bs, hidden, layers = Path(sys.argv[1]), *map(int, sys.argv[2:])
if not (out / "model" / "config.json").is_file():
    build_tiny_model(out / "model", hidden=hidden, layers=layers)  # 2048 × 16: ~0.67B parameters
rng = random.Random(0)
words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
rows = [{"prompt": "question: " + words(200), "chosen": " yes good " + words(200), "rejected": " no bad " + words(200)}
        for _ in range(64)]
(out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "args.json").write_text(json.dumps({"seq_len": seq, "batch_size": bs}))
PYEOF

COMMON=(train --model "$OUT/model" --data "$OUT/pairs.jsonl" --max-steps 4 --batch-size "$BS" --max-length "$SEQ"
        --max-prompt-length $((SEQ / 2)) --learning-rate 1e-5 --lr-scheduler constant --warmup-ratio 0
        --eval-fraction 0.25 --progress false --seed 3 --save-steps 2 --prefix-sharing false --overwrite)
run() {  # name, launcher words...; logs to $OUT/name.log
  local name=$1; shift
  echo "== $name: $*"
  "$@" bench/peak_memory.py "${COMMON[@]}" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "   exit $?; $(grep -E '^(engine|WRAPPER|PEAK|done)' "$OUT/$name.log" | tr '\n' ' ')"
}
FSDP=(configs/accelerate/fsdp2_8gpu.yaml --num_processes 1)

run one $PY                                                                        # fp32, one process
run fsdp2 $ACC launch --config_file "${FSDP[@]}" --mixed_precision no               # FSDP2, fp32, act. ckpt
run fsdp2_bf16 $ACC launch --config_file "${FSDP[@]}"                               # as shipped: bf16
# FSDP2 killed after logging step 3 (checkpoint of step 2 on disk), then resumed
export KILL_AFTER=3
run fsdp2_resumed $ACC launch --config_file "${FSDP[@]}" --mixed_precision no
unset KILL_AFTER
$ACC launch --config_file "${FSDP[@]}" --mixed_precision no bench/peak_memory.py "${COMMON[@]/--overwrite/--resume}" \
  --output-dir "$OUT/fsdp2_resumed" >> "$OUT/fsdp2_resumed.log" 2>&1; echo "   resumed: exit $?"

if [ -n "${DS_WHEELS:-}" ]; then
  $PY -m pip install --quiet --no-index --find-links "$DS_WHEELS" deepspeed && \
    run zero3 $ACC launch --config_file configs/accelerate/zero3_8gpu.yaml --num_processes 1 --mixed_precision no
fi

$PY bench/scale_compare.py "$OUT" one fsdp2 fsdp2_resumed fsdp2_bf16 zero3
$PY -m preftune plan --model "$OUT/model" --gpus 1 --gpu-memory 80GB --seq-len "$SEQ" --batch-size "$BS"
