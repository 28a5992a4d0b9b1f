#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, LIBERO and multi-process tests included. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec .venv/bin/python -m pytest -ra "$@"
