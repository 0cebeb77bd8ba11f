#!/usr/bin/env bash
# Device check: every GPU figure BENCHMARKS.md lacks, on one GPU in at most 8 minutes.
#
#   bash scripts/device_check.sh              # one CUDA GPU, real sizes, random weights
#   bash scripts/device_check.sh --tiny       # CPU, tiny sizes (or DEVICE_CHECK_TINY=1)
#   bash scripts/device_check.sh --only llava # one step again (see scripts/device_check.py)
#
# Run from anywhere; it works in the repository root. Offline (HF_HUB_OFFLINE=1): nothing is
# downloaded. Installs the project (`python -m pip install -e .`) when `import reward` fails.
# The Markdown tables go to stdout and, when OUT is set, to $OUT/device_check.md (stderr of
# every step in $OUT/device_check.log). PYTHON picks the interpreter (default: python, else
# python3). Exit status 0 when every step finished.
set -euo pipefail

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
elif [[ "$PY" == */* ]]; then  # a path: made absolute before the cd below
  PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# Checked outside the checkout: `python -c` would import the tree's own folders from here.
if ! (cd / && "$PY" -c "import reward") >/dev/null 2>&1; then
  echo "device_check: installing the project with $PY -m pip install -e ." >&2
  "$PY" -m pip install -q -e . || "$PY" -m pip install -q --no-build-isolation -e .
fi
exec "$PY" scripts/device_check.py "$@"
