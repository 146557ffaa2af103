#!/usr/bin/env bash
# Create benchmarks/.venv-original: Python 3.11 + TensorFlow 2.19 (CPU) + FastAPI, the
# re-created original stack that benchmarks/bench_serve.py compares our service with.
# Downloads a few hundred MB from PyPI. Idempotent: rerunning only fills in what is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-original"
req="$here/original_stack/requirements.txt"
py="${PYTHON:-python3.11}"

if ! command -v "$py" >/dev/null; then
    echo "setup_original.sh: $py not found; set PYTHON to a Python 3.11 interpreter" >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# tensorflow-cpu is the same 2.19 code without CUDA wheels; take it when PyPI has it.
if "${pip[@]}" install "tensorflow-cpu==2.19.*"; then
    "${pip[@]}" install -r <(grep -v '^tensorflow' "$req")
else
    echo "setup_original.sh: tensorflow-cpu==2.19.* unavailable, installing tensorflow==2.19.*" >&2
    "${pip[@]}" install -r "$req"
fi

"$venv/bin/python" - <<'PY'
import tensorflow as tf, keras, fastapi, uvicorn, PIL
print(f"original stack ready: tensorflow {tf.__version__}, keras {keras.__version__}, "
      f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, pillow {PIL.__version__}")
PY
