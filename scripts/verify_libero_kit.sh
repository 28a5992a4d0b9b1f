#!/usr/bin/env bash
# Check a LIBERO kit for real on this machine: install it with no registry into a fresh venv of the target Python,
# run a LIBERO episode there (OSMesa), and compare its frames and sim states with the full installation's.
#
#   bash scripts/verify_libero_kit.sh KIT.tar.xz [SUITE]
#
#   PYTHON_TARGET   the kit's Python (default: python3.12)
#   BASE_WHEELS     folder of wheels for what the GPU image already has (numpy, numba, scipy, opencv, ...);
#                   downloaded here for PYTHON_TARGET when missing (the only registry access, before the install)
#   WORK            scratch folder (default: /tmp/libero_kit_check)
#   FULL_PYTHON     the full installation's interpreter (default: .venv/bin/python)
#
# torch: LIBERO's benchmark module imports torch (for torch.load of init states, which the trainer does not use:
# trainer/envs/libero.py reads them without torch). The GPU image has torch; this check puts a placeholder module
# named torch on the kit venv's path that raises on any use, so an unexpected use of torch fails the check loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=$(realpath "$1")
SUITE=${2:-libero_spatial}
PYTHON_TARGET=${PYTHON_TARGET:-python3.12}
WORK=${WORK:-/tmp/libero_kit_check}
BASE_WHEELS=${BASE_WHEELS:-$WORK/base_wheels}
FULL_PYTHON=${FULL_PYTHON:-.venv/bin/python}
REPO=$PWD
mkdir -p "$WORK"

target_version=$("$PYTHON_TARGET" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ ! -d "$BASE_WHEELS" ]]; then
  echo "[verify] downloading the image's base packages for Python $target_version into $BASE_WHEELS"
  python3 -m pip download -q --only-binary=:all: --python-version "$target_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BASE_WHEELS" numpy==2.4.6 numba==0.68.1 llvmlite==0.50.0 scipy==1.17.1 \
    opencv-python-headless matplotlib==3.11.2 pillow pyyaml tqdm cloudpickle typing-extensions typing-inspect \
    absl-py "etils[epath]"
fi

echo "[verify] fresh venv ($PYTHON_TARGET) with the base packages, installed with --no-index"
rm -rf "$WORK/venv" "$WORK/kit" "$WORK/placeholder"
"$PYTHON_TARGET" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$BASE_WHEELS" numpy numba scipy \
  opencv-python-headless matplotlib pillow pyyaml tqdm cloudpickle typing-extensions typing-inspect absl-py etils
mkdir -p "$WORK/placeholder/torch"
cat > "$WORK/placeholder/torch/__init__.py" <<'EOF'
"""Placeholder for the kit check only: LIBERO's benchmark module imports torch but the trainer never calls it."""
def __getattr__(name):
    raise RuntimeError(f"torch.{name} used: the kit check's torch is a placeholder (the GPU image has the real one)")
EOF

echo "[verify] installing the kit (stdlib only, no network)"
start=$SECONDS
exports=$("$WORK/venv/bin/python" scripts/libero_kit.py install "$KIT" --target "$WORK/kit")
echo "[verify] install took $((SECONDS - start)) s; $exports"
eval "$exports"
kit_pythonpath="$PYTHONPATH"

echo "[verify] the kit's packages come from the kit, not from elsewhere"
PYTHONPATH="$kit_pythonpath:$REPO:$WORK/placeholder" "$WORK/venv/bin/python" - <<EOF
import importlib, os
for name in ("mujoco", "robosuite", "libero", "bddl", "OpenGL", "draccus", "gymnasium"):
    path = importlib.import_module(name).__file__
    assert path.startswith("$WORK/kit/"), (name, path)
    print(f"  {name:10s} {path}")
EOF

record() {  # record PYTHON OUT EXTRA_PYTHONPATH ...: the same episode, OSMesa
  local python=$1 out=$2; shift 2
  MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa PYTHONPATH="$1" timeout 600 "$python" scripts/libero_frames.py dump \
    --suite "$SUITE" --backend osmesa --out "$out" 2>&1 | grep -v -E "WARNING|warn|^\[info\]" | tail -3
}
echo "[verify] episode with the kit (Python $target_version)"
start=$SECONDS
LIBERO_CONFIG_PATH=$LIBERO_CONFIG_PATH TRAINER_LIBERO_CONFIG_DIR=$TRAINER_LIBERO_CONFIG_DIR \
  record "$WORK/venv/bin/python" "$WORK/kit_${SUITE}.npz" "$kit_pythonpath:$REPO:$WORK/placeholder"
echo "[verify] took $((SECONDS - start)) s"
echo "[verify] the same episode with the full installation ($FULL_PYTHON)"
(unset LIBERO_CONFIG_PATH TRAINER_LIBERO_CONFIG_DIR; record "$FULL_PYTHON" "$WORK/full_${SUITE}.npz" "$REPO")
"$FULL_PYTHON" scripts/libero_frames.py compare "$WORK/kit_${SUITE}.npz" "$WORK/full_${SUITE}.npz" \
  --json "$WORK/compare_${SUITE}.json"
