#!/usr/bin/env bash
# Creates .venv and installs recforge in the one order that works:
#   torch -> the fbgemm build that matches it -> torchrec (--no-deps) + its own deps -> recforge[dev].
# torchrec declares the CUDA `fbgemm-gpu`; letting pip resolve it would replace the CPU build,
# so torchrec never goes through the resolver. Re-running is quick: every step is skipped when
# the pinned version is already there, and the project step is skipped while pyproject.toml
# is unchanged.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
# Extra pip arguments for torch only, e.g. TORCH_PIP_ARGS="--index-url <a CUDA wheel index>".
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}

cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
have() { "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FBGEMM=fbgemm-gpu
    echo "[install] GPU found by nvidia-smi: CUDA torch build and $FBGEMM"
else
    FBGEMM=fbgemm-gpu-cpu
    echo "[install] no GPU: CPU torch build and $FBGEMM"
fi

# A torch version string carries its build after '+' (2.13.0+cpu); compare the release only.
torch_release=$("$PY" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])' 2>/dev/null || true)
if [ "$torch_release" != "$TORCH_VERSION" ]; then
    echo "[install] torch==$TORCH_VERSION"
    # shellcheck disable=SC2086
    pip_install "torch==$TORCH_VERSION" $TORCH_PIP_ARGS
fi

if ! have "$FBGEMM" "$FBGEMM_VERSION"; then
    echo "[install] $FBGEMM==$FBGEMM_VERSION"
    pip_install --no-deps "$FBGEMM==$FBGEMM_VERSION"
fi

if ! have torchrec "$TORCHREC_VERSION"; then
    echo "[install] torchrec==$TORCHREC_VERSION (--no-deps) and its own dependencies"
    pip_install --no-deps "torchrec==$TORCHREC_VERSION"
    pip_install tensordict torchmetrics tqdm pyre-extensions iopath
fi

stamp="$VENV/.recforge-installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[install] recforge (editable) with dev extras"
    pip_install -e ".[dev]"
    "$PY" -c 'import torch, torchrec, fbgemm_gpu, lightning, mlflow, pyarrow, onnxruntime' \
        || { echo "[install] import check failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
echo "[install] ready: $("$PY" -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__ if hasattr(torchrec, "__version__") else "1.8.0")')"
