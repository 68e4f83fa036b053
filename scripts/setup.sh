#!/usr/bin/env bash
# Create (or update) the project virtualenv in .venv with everything raylens needs.
# Idempotent: a second run is a no-op apart from pip's checks.
# CPU machines: torch is pinned to 2.13.0 so pip takes the local CPU wheel when one is
# offered, and torchvision (pulled by overcomplete, CUDA-only on PyPI) is removed:
# raylens/_compat.py stands in for the part overcomplete imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.raylens-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing raylens and its dependencies into .venv (about 2 minutes the first time)"
  pip install -q --disable-pip-version-check "torch==2.13.0"
  pip install -q --disable-pip-version-check -e ".[ray,test]"
  pip uninstall -y -q torchvision 2>/dev/null || true
  echo "$want" > "$stamp"
fi
# Headless Chromium for the HTML attribution view's browser test: Debian's chromium and
# chromium-driver, installed only when missing, as root, where apt-get exists. Elsewhere
# nothing happens and that test skips, saying why.
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium and chromium-driver (apt-get)"
  apt_log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
       >"$apt_log" 2>&1; then
    echo "[setup] warning: could not install chromium; the browser test will skip. apt-get said:" >&2
    tail -n 5 "$apt_log" >&2
  fi
  rm -f "$apt_log"
fi
python -c "import raylens, ray, transformers, nnsight; from raylens._compat import import_overcomplete; import_overcomplete()" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "[setup] ok: .venv ready"
