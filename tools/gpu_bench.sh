#!/usr/bin/env bash
# GPU throughput and memory, one prepared job for a lent GPU (issue #15; budget: 8 minutes).
#
#   bash tools/gpu_bench.sh            # from the repo root, on the GPU machine
#
# Installs the wheels carried in .whl/ as tools/gpu_check.sh does, then:
#   1. tools/bench.py --device cuda: merge_distill online and from the cache, both floors and, if
#      trl imports, TRL's GKDTrainer at K = 1 (lmbda 0, forward KL); tokens/s and peak memory.
#   2. tools/bench_blend.py --device cuda --head 896 at B = 1, T = 4096, V = 151,936, K = 3, bf16
#      teachers: the loss phase from hidden states, current path against the fused driver
#      (max_memory_allocated).
#   3. tools/bench_blend.py at K = 1 with the teachers' logits made from hidden states as well:
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
  BENCH=(--quick --ks 1 --no-trl --work /tmp/gpu_bench_dry)
  BLEND=(--batch 1 --seq 256 --vocab 8192 --chunk-tokens 128 --head 64 --ks 3 --teacher-dtype bfloat16)
  LIGER=(--batch 1 --seq 256 --vocab 8192 --chunk-tokens 128 --head 64 --ks 1 --teacher-dtype bfloat16)
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  BENCH=(--reps 3 --steps 16 --threads 4 --batch 32)
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
step "$PY" tools/bench_blend.py --device "$DEVICE" "${BLEND[@]}"
step "$PY" tools/bench_blend.py --device "$DEVICE" "${LIGER[@]}" --impls ours,fused,fused_heads,liger
log "failed steps: $failed"
exit "$failed"
