#!/usr/bin/env bash
# The GPU checks of the models and the GPU performance issue in one pass, for a CUDA machine
# that has torch, triton, timm, psutil, scikit-learn and pytest but not our venv (e.g. a lent
# H100; estimated at 8 minutes, not yet run on one). Results and logs go to $OUT (default
# /tmp/spikescale-gpu).
#
#   bash benchmarks/gpu_checks.sh [tests|lif|memory|speed ...]    # default: all four
#
# SpikingJelly 2.0 (the anchor) is pure Python: where nothing can be downloaded, put its wheels
# in .whl/ first (pip download --no-deps spikingjelly==2.0.0 loguru -d .whl) and they are
# installed from there.
set -uo pipefail
OUT=${OUT:-/tmp/spikescale-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ss-site .whl/*.whl \
        && export PYTHONPATH=/tmp/ss-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
status=0
for step in ${@:-tests lif memory speed}; do
    case $step in
    tests)  # the fused kernel against the reference, checkpointing modes, the models on CUDA
        $PY -m pytest -q -p no:cacheprovider tests/models tests/benchmarks 2>&1 | tee "$OUT/pytest-models.log" \
            || status=1 ;;
    lif)
        $PY -m benchmarks.lif --devices cuda --repeats 20 --out "$OUT" 2>&1 | tee "$OUT/lif.log" || status=1 ;;
    memory)  # issue 8: peak memory against T for each checkpointing mode, ResNet-34 bf16
        $PY -m benchmarks.train_step --device cuda --models spiking_resnet34 --precisions bf16 \
            --steps 1 2 4 6 8 16 --rounds 2 --out "$OUT/train_step-memory.json" 2>&1 | tee "$OUT/memory.log" \
            || status=1 ;;
    speed)  # issue 8: images/s against SpikingJelly and the ANN bound at T = 4
        $PY -m benchmarks.train_step --device cuda --precisions bf16 fp32 --steps 4 \
            --out "$OUT/train_step-speed.json" 2>&1 | tee "$OUT/speed.log" || status=1 ;;
    *) echo "unknown step '$step' (tests, lif, memory, speed)" >&2; exit 2 ;;
    esac
done
exit $status
