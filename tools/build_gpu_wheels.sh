#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for Python 3.12 manylinux x86_64.
#
#   bash tools/build_gpu_wheels.sh      # here, from the repo root; then carry ".whl" to the GPU run
#
# The GPU image (see /work/.library/device/KINDS.md) already has torch, accelerate 1.15, ninja,
# py-cpuinfo, msgpack, numpy, psutil, rich, typer, pyyaml, safetensors, tokenizers, pyarrow,
# huggingface-hub. It lacks deepspeed and hjson (DeepSpeed), pydantic (+ core, annotated-types,
# typing-inspection; also needed by DeepSpeed), datasets (+ dill, multiprocess), and has an older
# transformers (5.17) than the one this project is developed and tested with (5.24). For
# tools/gpu_bench.sh: TRL (the GKDTrainer row) and Liger-Kernel (its fused linear JSD; the image's
# Triton runs it), both pure Python.
# Versions are pinned to the shared virtualenv's so the GPU runs what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl
mkdir -p .whl

# DeepSpeed ships only an sdist; its wheel is pure Python (C++/CUDA ops are JIT-built when used,
# and this project's GPU path uses none). Its setup.py imports torch: build without isolation.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  transformers==5.24.0 regex==2026.11.19 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  trl==1.16.0 liger-kernel==0.8.5

ls -l .whl | awk 'NR > 1 {printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
printf "total %.1f MiB in %d wheels\n" "$(echo "$total / 1048576" | bc -l)" "$(ls .whl/*.whl | wc -l)"
if [ "$total" -gt $((40 * 1048576)) ]; then
  echo "error: .whl/ is over 40 MiB" >&2
  exit 1
fi
