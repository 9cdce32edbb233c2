#!/usr/bin/env bash
# The device machine's side of the GPU check (benchmarks/device/README.md). From the repo root:
#
#     bash benchmarks/device/run.sh [benchmarks/gpu_check.py options]
#
# Offline, with the machine's own python3 and packages: the carried wheels (.whl/, made here
# by `make device-wheels`) into $SITE, this checkout importable with its entry points, the
# allocator settings, then benchmarks/gpu_check.py writing into $OUT, ending by itself
# DEADLINE_S seconds after this script starts (keep it ~30 s under run's timeout_s).
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
DEADLINE_S=${DEADLINE_S:-390}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
start=$SECONDS
mkdir -p "$OUT"
exec > >(tee -a "$OUT/logs.txt") 2>&1  # everything below also lands in $OUT/logs.txt
say() { echo "[run.sh +$((SECONDS - start))s] $*"; }

say "$(command -v "$PY"): $("$PY" -V 2>&1); $(nproc) cores; $(uname -m)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "no nvidia-smi"
df -h /tmp "$OUT" | sed 's/^/  /'

# 1. The carried wheels, offline, into $SITE (ahead of the image's packages on PYTHONPATH).
ls .whl/*.whl >/dev/null 2>&1 || { say "no .whl/*.whl: run 'make device-wheels' here, carry .whl"; exit 3; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { say "installing .whl/ failed"; exit 3; }
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" benchmarks/device/deps.py "$SITE" .whl/fallback || say "deps: a requirement is missing (above)"

# 2. This checkout: importable through PYTHONPATH; its entry points (mistral-tiny, ...) beside
#    python3 through an editable install with the image's setuptools, no index, no isolation.
#    gpu_check.py does not need them (it runs each CLI as `python3 -c`); the tests that call
#    `<python dir>/mistral-convert` do.
if PYTHONWARNINGS=ignore "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    say "entry points: $(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/mistral-*"
else
    say "editable install failed: CLIs run as 'python3 -c'; tests calling entry points will fail"
fi
"$PY" -c "import mistral_common, convert.cli, verify.cli, checkpoint.cli, model_jax.cli" \
    || { say "the project does not import"; exit 3; }

# 3. Two frameworks share the GPU: neither takes it whole at start-up. Nothing reaches a hub.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTORCH_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

budget=$((DEADLINE_S - (SECONDS - start)))
say "setup done; gpu_check.py with a budget of ${budget}s"
# --keep-work: a rerun on the still-warm machine reuses the 7B checkpoints in /tmp.
"$PY" benchmarks/gpu_check.py "$OUT" --budget "$budget" --keep-work "$@"
rc=$?
say "gpu_check.py exit $rc; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
