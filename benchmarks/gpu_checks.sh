#!/usr/bin/env bash
# The GPU checks of the models and the GPU performance issue in one pass, for a CUDA machine
# that has torch, triton, timm and pytest but not our venv (e.g. a lent H100; estimated at
# 8 minutes, not yet run on one). Results and logs go to $OUT (default /tmp/spikescale-gpu).
#
#   bash benchmarks/gpu_checks.sh [tests|lif|memory|compiled|speed ...]    # default: all five
#
# Pure-Python packages the checks need beyond that (SpikingJelly 2.0, the anchor, and what the
# model tests import) are installed from .whl/ when it holds wheels; where nothing can be
# downloaded on the GPU machine, fetch them beforehand (psutil and scikit-learn for its Python):
#
#   pip download --no-deps -d .whl spikingjelly==2.0.0 loguru omegaconf antlr4-python3-runtime==4.9.3
#   pip download --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 psutil scikit-learn scipy threadpoolctl joblib
#
# A module still missing is named before anything runs (exit 3).
set -uo pipefail
OUT=${OUT:-/tmp/spikescale-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ss-site .whl/*.whl \
        && export PYTHONPATH=/tmp/ss-site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$($PY - <<'PY'
import importlib.util
need = ["torch", "triton", "timm", "pytest", "omegaconf", "sklearn", "psutil", "spikingjelly", "loguru"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_checks: missing Python modules: $missing (see the wheels named at the top of $0)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
status=0
for step in ${@:-tests lif memory compiled speed}; do
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
    compiled)  # issue 8: the T = 6 checkpointing target with compiled none and blocks+time too
        $PY -m benchmarks.train_step --device cuda --models spiking_resnet34 --precisions bf16 \
            --steps 6 --compile none blocks+time --rounds 2 --out "$OUT/train_step-compiled-T6.json" 2>&1 \
            | tee "$OUT/compiled.log" || status=1 ;;
    speed)  # issue 8: images/s against SpikingJelly and the ANN bound at T = 4, eager and compiled
        $PY -m benchmarks.train_step --device cuda --precisions bf16 fp32 --steps 4 --compile \
            --out "$OUT/train_step-speed.json" 2>&1 | tee "$OUT/speed.log" || status=1 ;;
    *) echo "unknown step '$step' (tests, lif, memory, compiled, speed)" >&2; exit 2 ;;
    esac
done
exit $status
