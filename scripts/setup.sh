#!/usr/bin/env bash
# Set up a fresh machine for this project: apt packages (OSMesa for headless MuJoCo rendering), a virtual
# environment with pinned torch/torchvision, the package with all extras (LIBERO + its assets, DeepSpeed,
# bitsandbytes, wandb, test tools). Idempotent: a second run only checks.
#   VENV=path   where the virtual environment lives (default: .venv in the repository)
#   SKIP_APT=1  do not touch system packages
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [[ -z "${SKIP_APT:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  echo "[setup] installing OSMesa (headless MuJoCo rendering for LIBERO)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Re-install only when the dependency pins changed.
stamp="$VENV/.trainer-setup-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing torch/torchvision (pinned in constraints.txt) and the project with all extras"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q -c constraints.txt torch torchvision
  # deepspeed builds from an sdist that imports torch: build it against the venv's pinned torch.
  "$PY" -m pip install -q -c constraints.txt --no-build-isolation deepspeed
  "$PY" -m pip install -q -c constraints.txt -e ".[all]"
  echo "$want" > "$stamp"
fi

"$PY" -m trainer.envs.libero_setup --quiet || echo "[setup] LIBERO is not usable here; the toy env still works"
echo "[setup] done: $VENV"
