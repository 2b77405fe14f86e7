#!/usr/bin/env bash
# Creates or updates ./.venv with everything fastkd needs (CPU machines included), then returns.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fastkd-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CUDA build of torch runs on CPU too; the CPU-only 2.13.0 wheel breaks torchvision (and timm).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dali,dev]"
  echo "$want" > "$stamp"
fi
