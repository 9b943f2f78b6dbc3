#!/usr/bin/env bash
# GPU throughput and memory, one prepared job for a lent GPU (issue #15; budget: 8 minutes).
#
#   bash tools/gpu_bench.sh            # from the repo root, on the GPU machine
#
# Installs the wheels carried in .whl/ as tools/gpu_check.sh does, then:
#   1. tools/bench.py --device cuda --size 135m --precision bf16: teachers and student of
#      SmolLM2-135M's shape (V = 49,152), rows of 1024: merge_distill online, fused
#      (train.fused_loss) and from the cache, both floors and, if trl imports, TRL's GKDTrainer at
#      K = 1 (lmbda 0, forward KL); tokens/s and peak memory (max_memory_allocated), K = 1 and 3.
#   2. the same with --size v152k: random-init Llamas with Qwen's vocabulary (V = 151,936), rows of
#      4096, batch 1.
#   3. tools/bench_blend.py --device cuda --head 896 at B = 1, T = 4096, V = 151,936, K = 3, bf16
#      teachers: the loss phase from hidden states, current path against the fused driver.
#   4. tools/bench_blend.py at K = 1 with the teachers' logits made from hidden states as well:
#      the current path, fused, fused with head teachers, and Liger-Kernel's LigerFusedLinearJSD
#      (jsd_beta 0 = forward KL, the same loss) when liger-kernel is carried in .whl/.
# The log goes to $OUT/gpu_bench.log when OUT is set (else /tmp/gpu_bench.log) and to stdout.
# Exit status: the number of failed steps.
# Dry run on a machine without a GPU (small sizes, CPU): GPU_BENCH_DRY=1 bash tools/gpu_bench.sh
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_bench.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }

if [ -z "${GPU_BENCH_DRY:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" || exit 100
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ -n "${GPU_BENCH_DRY:-}" ]; then
  DEVICE=cpu
  BENCH=(--quick --ks 1 --variants floor,online,fused --no-trl --work /tmp/gpu_bench_dry)
  BENCH_BIG=(--size tiny-v8k --quick --ks 1 --precision bf16 --variants floor_chunked,online,fused --no-trl
             --work /tmp/gpu_bench_dry_bf16)
  BLEND=(--batch 1 --seq 256 --vocab 8192 --chunk-tokens 128 --head 64 --ks 3 --teacher-dtype bfloat16)
  LIGER=(--batch 1 --seq 256 --vocab 8192 --chunk-tokens 128 --head 64 --ks 1 --teacher-dtype bfloat16)
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  BENCH=(--size 135m --precision bf16 --reps 1 --warmup 2 --steps 8 --threads 4 --batch 8 --ks 1,3
         --variants floor,floor_chunked,online,fused,cache)
  BENCH_BIG=(--size v152k --precision bf16 --reps 1 --warmup 2 --steps 4 --threads 4 --batch 1 --ks 1,3
             --variants floor_chunked,online,fused)
  BLEND=(--batch 1 --seq 4096 --vocab 151936 --head 896 --ks 3 --teacher-dtype bfloat16)
  LIGER=(--batch 1 --seq 4096 --vocab 151936 --head 896 --ks 1 --teacher-dtype bfloat16)
fi

failed=0
step() {
  local t0=$SECONDS
  log "---- $*"
  set -o pipefail
  timeout 300 "$@" 2>&1 | grep -v "FutureWarning\|^Loading weights" | tee -a "$LOG"
  local rc=$?
  log "---- exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
step "$PY" tools/bench.py --device "$DEVICE" "${BENCH[@]}"
step "$PY" tools/bench.py --device "$DEVICE" "${BENCH_BIG[@]}"
step "$PY" tools/bench_blend.py --device "$DEVICE" "${BLEND[@]}"
step "$PY" tools/bench_blend.py --device "$DEVICE" "${LIGER[@]}" --impls ours,fused,fused_heads,liger
log "failed steps: $failed"
exit "$failed"
