#!/usr/bin/env bash
# Prepare, on a machine with the full installation and registry access, the folders a GPU host without registries
# needs for real LIBERO (the device tool carries them with `carry`; an air-gapped node gets them by any copy):
#
#   .libero_kit/  libero_<suite>_cp312.tar.xz (scripts/libero_kit.py pack) and osmesa_reference_<suite>.npz
#                 (frames of fixed states rendered here with OSMesa, to compare the GPU host's EGL frames with)
#   .gl/          the GL loader .debs the GPU image lacks (libEGL.so.1 etc.; the device README's list)
#   .osmesa/      OSMesa for the GPU host (Mesa's libosmesa6 + libglapi + libLLVM-15 and the small libraries they need),
#                 plus stub libxml2.so.2 / libz3.so.4: LLVM links them but llvmpipe never calls them, and the real
#                 ones (16 MB with ICU) would not fit the 64 MiB a call may carry. A stub aborts if ever called.
#
#   bash scripts/prepare_gpu_carry.sh [SUITE]      (default libero_spatial; ~6 minutes, most of it xz)
#   PYTHON_VERSION=3.12  the GPU image's Python
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:-libero_spatial}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PY=${PY:-.venv/bin/python}
tag=cp${PYTHON_VERSION/./}
for folder in .libero_kit .gl .osmesa; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> "$(git rev-parse --git-path info/exclude)"
done
mkdir -p .libero_kit .gl .osmesa/stubs /tmp/amd64/partial

kit=.libero_kit/${SUITE}_$tag.tar.xz
if [[ ! -f $kit ]]; then
  PYTHONPATH=$PWD "$PY" scripts/libero_kit.py pack --suite "$SUITE" --python-version "$PYTHON_VERSION" --out "$kit" \
    --discovery ".libero_kit/discovery_${SUITE}.json"
fi
reference=.libero_kit/osmesa_reference_${SUITE}.npz
if [[ ! -f $reference ]]; then
  # two points: the init state with no physics step (renderer only) and after the reset's settle steps
  MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa PYTHONPATH=$PWD "$PY" scripts/libero_frames.py dump --suite "$SUITE" \
    --backend osmesa --chunks 0 --out "$reference" > /dev/null 2>&1
fi

apt_options=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
if ! ls .gl/*.deb > /dev/null 2>&1 || ! ls .osmesa/*.deb > /dev/null 2>&1; then
  apt-get "${apt_options[@]}" update -qq
fi
ls .gl/*.deb > /dev/null 2>&1 || (cd .gl && apt-get "${apt_options[@]}" download -qq libvulkan1 libegl1 libglvnd0 \
  libopengl0 libgl1 libglx0 libgles2)
if ! ls .osmesa/*.deb > /dev/null 2>&1; then
  (cd .osmesa && apt-get "${apt_options[@]}" download -qq libosmesa6 libglapi-mesa libllvm15 libedit2 libbsd0 libmd0 \
    libffi8 libtinfo6)
fi

if [[ ! -f .osmesa/stubs/libz3.so.4 || ! -f .osmesa/stubs/libxml2.so.2 ]]; then
  scratch=$(mktemp -d)
  dpkg -x .osmesa/libllvm15_*.deb "$scratch"
  llvm=$(ls "$scratch"/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1)
  # every symbol libLLVM takes from each library: functions abort; xmlFree is a variable (a function pointer)
  objdump -T "$llvm" | awk '/\*UND\*/ && $NF ~ /^Z3_/ {print $NF}' | sort -u > "$scratch/z3.txt"
  objdump -T "$llvm" | awk '/\*UND\*/ && $NF ~ /^xml/ {print $(NF-1), $NF}' | sort -u > "$scratch/xml.txt"
  {
    echo '#include <stdio.h>'; echo '#include <stdlib.h>'
    echo 'static void stub_called(const char *name) { fprintf(stderr, "stub %s called: this library is a stand-in '\
'that only lets libLLVM load\n", name); abort(); }'
    while read -r name; do echo "void $name(void) { stub_called(\"$name\"); }"; done < "$scratch/z3.txt"
  } > "$scratch/z3.c"
  {
    echo '#include <stdio.h>'; echo '#include <stdlib.h>'
    echo 'static void stub_called(const char *name) { fprintf(stderr, "stub %s called: this library is a stand-in '\
'that only lets libLLVM load\n", name); abort(); }'
    echo 'static void stub_free(void *p) { (void)p; stub_called("xmlFree"); }'
    echo 'void (*xmlFree)(void *) = stub_free;'
    awk '$2 != "xmlFree" {print "void " $2 "(void) { stub_called(\"" $2 "\"); }"}' "$scratch/xml.txt"
  } > "$scratch/xml.c"
  {  # the version nodes libLLVM asks for (LIBXML2_2.4.30, LIBXML2_2.6.0), each with its symbols
    for node in $(awk '{print $1}' "$scratch/xml.txt" | tr -d '()' | sort -u); do
      echo "$node { global: $(awk -v n="($node)" '$1 == n {printf "%s; ", $2}' "$scratch/xml.txt") };"
    done
  } > "$scratch/xml.map"
  gcc -shared -fPIC -O1 -o .osmesa/stubs/libz3.so.4 -Wl,-soname,libz3.so.4 "$scratch/z3.c"
  gcc -shared -fPIC -O1 -o .osmesa/stubs/libxml2.so.2 -Wl,-soname,libxml2.so.2 \
    -Wl,--version-script="$scratch/xml.map" "$scratch/xml.c"
  rm -rf "$scratch"
fi

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
size() { du -cb "$@" | tail -1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "carry sizes: working tree $(mib "$tree_bytes"), .libero_kit $(mib "$(size .libero_kit)"),"\
     ".gl $(mib "$(size .gl)"), .osmesa $(mib "$(size .osmesa)")"
echo "  with .libero_kit .gl:          $(mib $((tree_bytes + $(size .libero_kit .gl))))  (limit 64 MiB)"
echo "  with .libero_kit .gl .osmesa:  $(mib $((tree_bytes + $(size .libero_kit .gl .osmesa))))  (limit 64 MiB)"
