#!/usr/bin/env bash
# GPU proof of the distributed layer, one short job (about 2 minutes on one H100).
#
#   bash tools/gpu_check.sh            # from the repo root, on the GPU machine
#
# Installs the wheels carried in .whl/ (built here by tools/build_gpu_wheels.sh; nothing comes
# from the internet), then runs tools/gpu_check.py three times, one process each:
#   1. plain accelerate (no DeepSpeed): bf16 teachers whole on the GPU, student in bf16 autocast
#   2. DeepSpeed forced: ZeRO-3 bf16 teachers (inference engines), ZeRO-3 student
#   3. DeepSpeed forced: ZeRO-3 bf16 teachers, ZeRO-2 student
# The log goes to $OUT/gpu_check.log when OUT is set (else /tmp/gpu_check.log) and to stdout.
# Exit status: the number of failed runs (0 = all passed).
# Dry run on a machine without a GPU: GPU_CHECK_NO_WHEELS=1 GPU_CHECK_ARGS=--tiny bash tools/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }

if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" || exit 100
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
else
  log "no .whl/ wheels found: using the image's packages only"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, accelerate, transformers, deepspeed, pydantic; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| accelerate', accelerate.__version__, '| transformers', transformers.__version__, \
'| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__)" 2>&1 | grep -v WARNING | tee -a "$LOG"

failed=0
run() {
  local t0=$SECONDS
  log "---- python3 tools/gpu_check.py $*"
  set -o pipefail
  timeout 240 python3 tools/gpu_check.py "$@" ${GPU_CHECK_ARGS:-} 2>&1 | grep -v "FutureWarning\|return func(\|^Loading weights" | tee -a "$LOG"
  local rc=$?
  set +o pipefail
  log "---- exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
run --mode never
run --mode always --student-stage 3
run --mode always --student-stage 2
log "---- python3 tools/gpu_engine_check.py (the real engine: merge-distill run, bf16, ZeRO-3 teachers)"
t0=$SECONDS
set -o pipefail
timeout 240 python3 tools/gpu_engine_check.py 2>&1 | grep -v "FutureWarning\|return func(\|^Loading weights\|Writing model" | tee -a "$LOG"
rc=$?
set +o pipefail
log "---- exit $rc after $((SECONDS - t0)) s"
[ "$rc" -eq 0 ] || failed=$((failed + 1))
log "gpu_check: $failed failed run(s)"
exit "$failed"
