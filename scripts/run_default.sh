#!/usr/bin/env bash
# Set up .venv if needed, then run the concept job on the built-in default
# (SmolLM2-135M over 300 movie reviews, local Ray). Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m jobs.concepts --config configs/default.yaml "$@"
