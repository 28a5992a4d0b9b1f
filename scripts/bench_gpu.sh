#!/usr/bin/env bash
# The GPU benchmark, stage by stage (each stage fits one device call). Writes $OUT (default bench/) report.json,
# logs and the e2e metrics. Run from the repository root on a GPU host:
#   bash scripts/bench_gpu.sh single   # ceiling, rollout (OpenVLA + OFT, plain and with LoRA, batch 1/16/64), update
#                                      # (+ phases) bf16 with LoRA on all / LLM linear layers, OFT phases, int8 update
#   bash scripts/bench_gpu.sh multi    # update on 2 GPUs: DDP, FSDP2, ZeRO-3
#   bash scripts/bench_gpu.sh e2e      # whole RL iterations (rollout + update) with the LIBERO stand-in env, 1 GPU
#   bash scripts/bench_gpu.sh e2e2     # the same on 2 GPUs with FSDP2, ZeRO-3 and DDP
#   bash scripts/bench_gpu.sh profile  # where the update's time and memory go: LoRA ceiling, then the update's
#                                      # phases + profiler summary for OpenVLA / OFT, LoRA on all / LLM linear layers,
#                                      # bf16 and int8 (writes $OUT/profile.json)
#   bash scripts/bench_gpu.sh followup # 2-GPU host: rollout with merged LoRA vs the ceiling, FSDP2's update phases,
#                                      # FSDP2 with decoder-layer shard units only, 1-GPU e2e with merged-LoRA rollouts
# Real LIBERO (carry .libero_kit and .gl, made by scripts/prepare_gpu_carry.sh; .osmesa too for libero_costs):
#   bash scripts/bench_gpu.sh libero_costs  # per-step costs (build, reset, physics, EGL and OSMesa rendering) and
#                                           # pools of 8/16/24 workers on 16 cores; EGL per rank shown on 2 GPUs,
#                                           # EGL vs OSMesa frames (writes libero_costs.json, egl_demo.json)
#   bash scripts/bench_gpu.sh libero_e2e    # 2-GPU host: OFT on GPU 0 and OpenVLA (7 tokens) on GPU 1 at the same
#                                           # time, each pinned to 16 of the 32 cores (= one 1-GPU host each)
#   bash scripts/bench_gpu.sh libero_e2e2   # OFT with FSDP2 on 2 GPUs, twice the groups (the same load per GPU)
#   bash scripts/bench_gpu.sh multinode     # two one-GPU "nodes" (launch_multinode.sh), kill node 1 after an iteration
# Several stages may follow each other in one call: bash scripts/bench_gpu.sh libero_e2e2 multinode
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
report="$OUT/report.json"
run() { echo "=== $*"; local start=$SECONDS; "$@" 2>&1 | grep -v -E "Warning|warn\(|kernels-community|USDT|gpuGetDeviceCount" | tail -${TAIL:-40}; echo "=== took $((SECONDS - start)) s"; }
launch() { local config=$1; shift; run $PY -m accelerate.commands.launch --config_file "$config" --num_processes 2 "$@"; }
e2e() { local name=$1; shift; run "$@" --train.output_dir "$OUT/e2e_$name"; cp "$OUT/e2e_$name/metrics.jsonl" "$OUT/e2e_${name}.jsonl"; rm -rf "$OUT/e2e_$name"; }

# --- real LIBERO -------------------------------------------------------------------------------------------------------
LIBERO_SUITE=${LIBERO_SUITE:-libero_spatial}
LIBERO_KIT=${LIBERO_KIT:-.libero_kit/${LIBERO_SUITE}_cp312.tar.xz}
libero_setup() {  # GL loaders, the LIBERO kit, and OSMesa when carried; idempotent within one machine
  [[ -n "${LIBERO_READY:-}" ]] && return 0
  local start=$SECONDS
  if ls .gl/*.deb > /dev/null 2>&1; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
  if [[ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ]] && \
     ! ls /usr/share/glvnd/egl_vendor.d/*nvidia* /etc/glvnd/egl_vendor.d/*nvidia* > /dev/null 2>&1; then
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  fi
  [[ -f "$LIBERO_KIT" ]] || { echo "SUMMARY libero_setup: FAILED: no kit at $LIBERO_KIT (carry .libero_kit)"; return 1; }
  local exports
  exports=$($PY scripts/libero_kit.py install "$LIBERO_KIT" --target /tmp/libero_kit --quiet) || {
    echo "SUMMARY libero_setup: FAILED: the kit $LIBERO_KIT did not install (see above)"; return 1; }
  eval "$exports"
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  local osmesa="absent"
  if ls .osmesa/*.deb > /dev/null 2>&1; then
    rm -rf /tmp/osmesa && mkdir -p /tmp/osmesa/root /tmp/osmesa/lib
    for f in .osmesa/*.deb; do dpkg -x "$f" /tmp/osmesa/root; done
    for lib in /tmp/osmesa/root/usr/lib/x86_64-linux-gnu/{libOSMesa,libglapi,libLLVM-15}.so*; do ln -sf "$lib" /tmp/osmesa/lib/; done
    # the libraries OSMesa's LLVM needs: the host's own where it has them, else the carried ones, else a stub
    for soname in libedit.so.2 libbsd.so.0 libmd.so.0 libffi.so.8 libtinfo.so.6 libxml2.so.2 libz3.so.4; do
      ldconfig -p | grep -q "^\s*$soname " && continue
      local carried=$(ls /tmp/osmesa/root/{usr/,}lib/x86_64-linux-gnu/$soname .osmesa/stubs/$soname 2>/dev/null | head -1)
      [[ -n "$carried" ]] && ln -sf "$(realpath "$carried")" /tmp/osmesa/lib/$soname
    done
    export OSMESA_LIBRARY_PATH=/tmp/osmesa/lib
    osmesa=$(LD_LIBRARY_PATH=$OSMESA_LIBRARY_PATH $PY -c "import ctypes; ctypes.CDLL('libOSMesa.so.8'); print('loads')" 2>&1 | tail -1)
  fi
  local egl=$($PY -c "from trainer.envs.render import probe_egl; print(probe_egl())" 2>&1 | tail -1)
  echo "SUMMARY libero_setup: kit $LIBERO_KIT installed in $((SECONDS - start)) s; EGL: $egl; OSMesa: $osmesa"
  LIBERO_READY=1
}
e2e_summary() {  # one line per e2e run from its metrics.jsonl (iterations after the first are the steady state)
  $PY - "$OUT/e2e_$1.jsonl" "$1" <<'PYEOF'
import json, sys
path, name = sys.argv[1], sys.argv[2]
try:
    rows = [json.loads(line) for line in open(path) if line.strip()]
except OSError:
    rows = []
if not rows:
    print(f"SUMMARY e2e {name}: FAILED (no metrics; see its log)")
for r in rows:
    g = lambda key: r.get(key) or 0.0
    print(f"SUMMARY e2e {name}: iteration {r['iteration']}: {g('time/env_steps_per_second'):.1f} env steps/s, "
          f"{g('rollout/env_steps'):.0f} env steps, iteration {g('time/iteration_seconds'):.1f} s = rollout "
          f"{g('time/rollout_seconds'):.1f} s (policy {g('time/policy_seconds'):.1f}, env {g('time/env_seconds'):.1f}) "
          f"+ update and the rest {g('time/iteration_seconds') - g('time/rollout_seconds'):.1f} s; env errors "
          f"{g('rollout/env_errors'):.0f}; peak {g('memory/peak_gb_per_gpu'):.1f} GB")
PYEOF
}
pinned() {  # run "$@" on the given CPU cores when taskset exists (its children, the env workers, inherit it)
  local cores=$1; shift
  if command -v taskset > /dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}
ITERATIONS=${ITERATIONS:-3}
E2E_ARGS=${E2E_ARGS:-}  # more trainer arguments for the LIBERO e2e / multinode stages (e.g. a tiny model for a CPU check)

for stage in "${@:-single}"; do
case "$stage" in
  single)
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    run timeout 280 $PY -m trainer bench --parts ceiling,rollout --out "$report"
    run timeout 150 $PY -m trainer bench --parts phases,update --lora-targets all-linear llm-linear --update-batch 16 \
      --out "$report"
    run timeout 80 $PY -m trainer bench --parts phases --models openvla-7b-oft --update-batch 16 --out "$report"
    run timeout 120 $PY -m trainer bench --parts update --update-batch 16 --int8 --out "$report"
    ;;
  multi)
    # the 1-GPU reference for the scaling factor, on the same host
    CUDA_VISIBLE_DEVICES=0 run timeout 120 $PY -m trainer bench --parts update --update-batch 16 --out "$report"
    launch accelerate_configs/ddp_2gpu.yaml -m trainer bench --parts update --update-batch 16 --out "$report"
    launch accelerate_configs/fsdp_1node.yaml -m trainer bench --parts update --update-batch 16 --out "$report"
    launch accelerate_configs/deepspeed_zero3.yaml -m trainer bench --parts update --update-batch 16 --out "$report"
    ;;
  e2e)
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    e2e oft_1gpu timeout ${E2E_TIMEOUT:-200} $PY -m trainer train --config configs/bench_standin_oft.yaml
    e2e int8_1gpu timeout ${E2E_TIMEOUT:-200} $PY -m trainer train --config configs/bench_standin_oft.yaml \
      --quant.mode int8 --quant.optimizer_8bit true
    ;;
  profile)
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    run timeout ${PROFILE_TIMEOUT:-330} $PY -m trainer bench --parts lora_ceiling,phases --models openvla-7b \
      openvla-7b-oft --lora-targets all-linear llm-linear --update-batch 16 --out "$OUT/profile.json"
    run timeout ${PROFILE_TIMEOUT:-330} $PY -m trainer bench --parts phases,update --int8 --lora-targets all-linear \
      llm-linear --update-batch 16 --out "$OUT/profile.json"
    ;;
  followup)
    CUDA_VISIBLE_DEVICES=0 run timeout 190 $PY -m trainer bench --parts ceiling,rollout --batches 16 64 \
      --out "$OUT/rollout_merged.json"
    run timeout 100 $PY -m accelerate.commands.launch --config_file accelerate_configs/fsdp_1node.yaml \
      --num_processes 2 -m trainer bench --parts phases --out "$OUT/fsdp2_phases.json"
    run timeout 80 $PY -m accelerate.commands.launch --config_file accelerate_configs/fsdp_1node.yaml \
      --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --num_processes 2 -m trainer bench --parts update \
      --out "$OUT/fsdp2_llm_units.json"
    CUDA_VISIBLE_DEVICES=0 e2e oft_1gpu_merged timeout 150 $PY -m trainer train --config configs/bench_standin_oft.yaml \
      --rollout.merge_lora true
    ;;
  e2e2)
    for backend in ${BACKENDS:-fsdp_1node ddp_2gpu deepspeed_zero3}; do
      iterations=2; [[ $backend == deepspeed_zero3 ]] && iterations=1  # its update is ~20x slower (see docs)
      e2e "${backend}_2gpu" timeout ${E2E_TIMEOUT:-200} $PY -m accelerate.commands.launch --config_file \
        accelerate_configs/$backend.yaml --num_processes 2 -m trainer train --config configs/bench_standin_oft.yaml \
        --train.iterations $iterations
    done
    ;;
  libero_costs)
    libero_setup || continue
    # pools on 16 cores, as on the 1-GPU host; the single-simulator figures in a process of their own per backend
    TAIL=60 run pinned 0-15 timeout ${COSTS_TIMEOUT:-330} $PY scripts/measure_libero_costs.py --suite $LIBERO_SUITE \
      --backends egl,osmesa --pool-workers ${POOL_SIZES:-8,16,24} --repeats ${COSTS_REPEATS:-20} \
      --json "$OUT/libero_costs.json"
    TAIL=30 run timeout ${DEMO_TIMEOUT:-210} $PY scripts/egl_demo.py --out "$OUT/egl_demo.json" \
      --reference .libero_kit/osmesa_reference_${LIBERO_SUITE}.npz
    ;;
  libero_e2e)
    libero_setup || continue
    half=$(( $(nproc) / 2 ))
    (CUDA_VISIBLE_DEVICES=0 e2e libero_oft_1gpu pinned 0-$((half - 1)) timeout ${E2E_TIMEOUT:-520} $PY -m trainer train \
       --config configs/bench_libero_oft.yaml --train.iterations $ITERATIONS $E2E_ARGS) > "$OUT/e2e_libero_oft_1gpu.log" 2>&1 &
    (CUDA_VISIBLE_DEVICES=1 e2e libero_openvla_1gpu pinned $half-$(( 2 * half - 1 )) timeout ${E2E_TIMEOUT:-520} $PY -m \
       trainer train --config configs/bench_libero_openvla.yaml $E2E_ARGS) > "$OUT/e2e_libero_openvla_1gpu.log" 2>&1 &
    wait
    for name in libero_oft_1gpu libero_openvla_1gpu; do tail -15 "$OUT/e2e_$name.log"; e2e_summary $name; done
    ;;
  libero_e2e2)
    libero_setup || continue
    e2e libero_oft_fsdp2_2gpu timeout ${E2E_TIMEOUT:-540} $PY -m accelerate.commands.launch --config_file \
      accelerate_configs/fsdp_1node.yaml --num_processes 2 -m trainer train --config configs/bench_libero_oft.yaml \
      --env.groups_per_iteration 8 --train.iterations $ITERATIONS $E2E_ARGS
    e2e_summary libero_oft_fsdp2_2gpu
    ;;
  multinode)
    libero_setup || continue
    # whole iterations of full-size OFT with real LIBERO workers, FSDP2 over two one-GPU "nodes" on NCCL
    TAIL=25 run timeout ${MULTINODE_TIMEOUT:-520} $PY scripts/multinode_emulation.py --out-dir /tmp/multinode \
      --gpus 0,1 --accelerate-config accelerate_configs/fsdp_multinode.yaml --python $PY --start-wait-s 330 \
      --exit-wait-s 150 -- --train.iterations 50 --env.num_workers 8 --env.groups_per_iteration 2 --env.max_steps 16 \
      $E2E_ARGS
    for f in multinode.json node0.log node1.log; do cp /tmp/multinode/$f "$OUT/multinode_$f" 2>/dev/null; done
    ;;
  *) echo "unknown stage $stage" ;;
esac
done
