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
#   bash scripts/bench_gpu.sh speed    # issue 13's levers (2 GPUs, both at once; < 9 min): GPU 0 runs whole OFT
#                                      # iterations on the LIBERO stand-in with each lever on its own and together
#                                      # ($OUT/levers.json); GPU 1 checks CUDA-graph decoding against the eager paths
#                                      # and times OpenVLA's decode vs the plain-transformers ceiling ($OUT/decode.json)
#   bash scripts/bench_gpu.sh update_levers  # issue 13 (2-GPU host, < 10 min): OpenVLA / OFT updates eager vs
#                                      # model.compile_blocks with the LoRA ceiling, then FSDP2 / ZeRO-3, each with
#                                      # one profiled step ($OUT/update.json, update_oft.json)
#   bash scripts/bench_gpu.sh zero3    # ZeRO-3's update over 6 steps, default JSON and small parameters kept whole,
#                                      # each with one profiled step ($OUT/zero3.json)
#   bash scripts/bench_gpu.sh scaling  # issue 13 items 3-4 (2-GPU host, < 9 min): update samples/s on 1 GPU with the
#                                      # LoRA ceiling, then DDP, FSDP2, FSDP2 without reshard, ZeRO-3 on 2 GPUs; each
#                                      # step of 3 reported (ranges) and the scaling vs 1 GPU ($OUT/scaling.json)
# Real LIBERO (carry .libero_kit and .gl, made by scripts/prepare_gpu_carry.sh; .osmesa too for libero_costs):
#   bash scripts/bench_gpu.sh libero_costs  # per-step costs (build, reset, physics, EGL and OSMesa rendering) and
#                                           # pools of 8/16/24 workers on 16 cores; EGL per rank shown on 2 GPUs,
#                                           # EGL vs OSMesa frames (writes libero_costs.json, egl_demo.json)
#   bash scripts/bench_gpu.sh egl_demo      # the EGL part of libero_costs alone (each rank's workers on its GPU, frames)
#   bash scripts/bench_gpu.sh libero_e2e    # 2-GPU host: OFT on GPU 0 and OpenVLA (7 tokens) on GPU 1 at the same
#                                           # time, each pinned to 16 of the 32 cores (= one 1-GPU host each);
#                                           # PYSPY_AT=175: py-spy samples the OFT run (carry its wheel; summary:
#                                           # scripts/stack_shares.py $OUT/pyspy_oft.txt)
#   bash scripts/bench_gpu.sh libero_ab     # A/B of one lever: the 1-GPU run with A_ARGS and with B_ARGS (A_CONFIG /
#                                           # B_CONFIG, default OFT); both at once on 2 GPUs, in turn on one
#   bash scripts/bench_gpu.sh libero_one    # one 1-GPU run on GPU 0, all cores: RUN_CONFIG, RUN_ARGS, RUN_NAME
#   bash scripts/bench_gpu.sh libero_e2e2   # OFT with FSDP2 on 2 GPUs, twice the groups (the same load per GPU)
#   bash scripts/bench_gpu.sh multinode     # two one-GPU "nodes" (launch_multinode.sh), kill node 1 after an iteration
# Several stages may follow each other in one call: bash scripts/bench_gpu.sh libero_e2e2 multinode
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # scripts/*.py import the trainer package from the checkout
report="$OUT/report.json"
run() { echo "=== $*"; local start=$SECONDS; "$@" 2>&1 | grep -v -E "Warning|warn\(|kernels-community|USDT|gpuGetDeviceCount" | tail -${TAIL:-40}; echo "=== took $((SECONDS - start)) s"; }
launch() { local config=$1; shift; run ${LAUNCH_TIMEOUT:+timeout $LAUNCH_TIMEOUT} $PY -m accelerate.commands.launch --config_file "$config" --num_processes 2 "$@"; }
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
          f"{g('time/rollout_seconds'):.1f} s (policy {g('time/policy_seconds'):.1f}, env {g('time/env_seconds'):.1f}, "
          f"prepare {g('time/prepare_seconds'):.2f}, draw {g('time/draw_seconds'):.2f}, send {g('time/send_seconds'):.2f}, "
          f"record {g('time/record_seconds'):.2f}; in the workers {g('time/worker_chunk_seconds'):.3f} s per chunk) "
          f"+ update {g('time/update_seconds'):.1f} s + the rest "
          f"{g('time/iteration_seconds') - g('time/rollout_seconds') - g('time/update_seconds'):.1f} s; env errors "
          f"{g('rollout/env_errors'):.0f}; peak {g('memory/peak_gb_per_gpu'):.1f} GB")
PYEOF
}
egl_demo() {  # each rank's workers on its own GPU, EGL frames against OSMesa frames of the same states
  TAIL=30 run timeout ${DEMO_TIMEOUT:-210} $PY scripts/egl_demo.py --out "$OUT/egl_demo.json" \
    --reference .libero_kit/osmesa_reference_${LIBERO_SUITE}.npz
}
sample_stacks() {  # PYSPY_AT=<s>: py-spy samples the run whose command line starts with "$1" (and its env workers)
  # for PYSPY_SECONDS from PYSPY_AT seconds on, waits included (--idle), into $OUT/$2 (collapsed stacks)
  [[ -n "${PYSPY_AT:-}" ]] && command -v py-spy > /dev/null || return 0
  sleep "$PYSPY_AT"
  local pid; pid=$(pgrep -f -o "^$1") || { echo "=== py-spy: no process matches $1"; return 0; }
  timeout $(( ${PYSPY_SECONDS:-30} + 30 )) py-spy record --pid "$pid" --subprocesses --idle --nonblocking --rate 50 \
    --duration "${PYSPY_SECONDS:-30}" --format raw --output "$OUT/$2" 2>&1 | tail -3
  echo "=== py-spy on pid $pid: $(wc -l < "$OUT/$2" 2>/dev/null || echo 0) distinct stacks"
}
pinned_e2e() {  # name gpu cores config [trainer args...]: one 1-GPU run pinned to those cores, its log in $OUT
  local name=$1 gpu=$2 cores=$3 config=$4; shift 4
  (CUDA_VISIBLE_DEVICES=$gpu e2e $name pinned $cores timeout ${E2E_TIMEOUT:-520} $PY -m trainer train \
    --config $config "$@") > "$OUT/e2e_$name.log" 2>&1
}
pinned() {  # run "$@" on the given CPU cores when taskset exists (its children, the env workers, inherit it)
  local cores=$1; shift
  if command -v taskset > /dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}
ITERATIONS=${ITERATIONS:-3}
E2E_ARGS=${E2E_ARGS:-}  # more trainer arguments for the LIBERO e2e / multinode stages (e.g. a tiny model for a CPU check)
# libero_e2e only: OFT_ARGS / OPENVLA_ARGS go to that run alone (e.g. OPENVLA_ARGS="--rollout.pipeline false")

TWO_GPU_STAGES=" multi followup speed scaling update_levers zero3 e2e2 libero_e2e libero_e2e2 multinode "
gpus=$(nvidia-smi -L 2> /dev/null | grep -c "^GPU")

for stage in "${@:-single}"; do
if [[ $TWO_GPU_STAGES == *" $stage "* ]] && (( gpus < 2 )); then
  echo "SUMMARY $stage: SKIPPED: it needs 2 GPUs, this host has $gpus (one GPU: libero_one, libero_ab, single, e2e)"
  continue
fi
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
  speed)
    budget=${SPEED_BUDGET:-520}  # seconds for the whole stage (a device call: < 9 min)
    decode_stage() {
      timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_decoding.py -k "graph" 2>&1
      timeout 330 $PY scripts/check_gpu_paths.py "$OUT" --batches 16 64 --repeats ${REPEATS:-3} 2>&1
      # then, in the time left, standard OpenVLA end to end through the trainer (static cache + CUDA graphs, all
      # levers at their defaults) on the stand-in env
      local left=$((budget - (SECONDS - start) - 10))
      if (( left > 150 )); then
        timeout $left $PY -m trainer train --config configs/bench_standin_openvla.yaml --train.iterations 3 \
          --train.output_dir /tmp/e2e_openvla 2>&1 | grep -v -E "Warning|warn\("
        cp /tmp/e2e_openvla/metrics.jsonl "$OUT/e2e_openvla.jsonl"
      else
        echo "=== no time left for the OpenVLA end-to-end run ($left s)"
      fi
    }
    levers_stage() {
      timeout $((budget - 10)) $PY -m trainer bench --parts levers --repeats ${REPEATS:-3} \
        --e2e-episodes ${E2E_EPISODES:-16} --e2e-max-steps ${E2E_MAX_STEPS:-40} --out "$OUT/levers.json" 2>&1
    }
    start=$SECONDS
    if (( gpus >= 2 )); then  # the two halves at once, one GPU each
      (export CUDA_VISIBLE_DEVICES=1; decode_stage > "$OUT/decode.log" 2>&1) &
      (export CUDA_VISIBLE_DEVICES=0; levers_stage > "$OUT/levers.log" 2>&1)
      wait
    else  # one GPU: one after the other (about twice as long: give each its own call, SPEED_STAGE=decode / levers)
      [[ ${SPEED_STAGE:-decode} == decode ]] && decode_stage > "$OUT/decode.log" 2>&1
      [[ ${SPEED_STAGE:-levers} == levers ]] && levers_stage > "$OUT/levers.log" 2>&1
    fi
    echo "=== speed stage took $((SECONDS - start)) s"
    grep -v -E "Warning|warn\(|kernels-community" "$OUT/decode.log" | tail -n ${TAIL:-45}
    grep -v -E "Warning|warn\(|kernels-community" "$OUT/levers.log" | tail -n ${TAIL:-45}
    ;;
  scaling)
    steps=${STEPS:-3}
    LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-100}  # per 2-GPU set-up (building the random 7B model included)
    CUDA_VISIBLE_DEVICES=0 run timeout ${SCALING_SINGLE_TIMEOUT:-110} $PY -m trainer bench --parts lora_ceiling,update \
      --update-batch 16 --steps $steps --label single --out "$OUT/scaling.json"
    for setup in ${SCALING_SETUPS:-ddp_2gpu fsdp_1node fsdp_1node_no_reshard deepspeed_zero3}; do
      launch accelerate_configs/$setup.yaml -m trainer bench --parts update --update-batch 16 --steps $steps \
        --label $setup --out "$OUT/scaling.json"
    done
    $PY -c "import json, sys; r = json.load(open(sys.argv[1])); [print('SUMMARY', k, {n: round(x, 3) for n, x in v.items()}) for k, v in r.get('ratios', {}).items()]" "$OUT/scaling.json"
    ;;
  update_levers)
    # issue 13's update levers, profiled (2-GPU host, < 10 min). First two 1-GPU halves at once: GPU 0 the OpenVLA
    # update as the LoRA ceiling runs (284 tokens, recompute) with that ceiling, eager then model.compile_blocks;
    # GPU 1 the OFT update as the end-to-end runs train (591 tokens, no recompute), eager then compiled. Then the
    # 2-GPU update with FSDP2 and DeepSpeed ZeRO-3 (the overlap variant unless ZERO3_SETUPS says otherwise). Every
    # update adds one step under torch.profiler (GPU idle share, kernels, collective calls): $OUT/update*.json.
    steps=${STEPS:-3}
    one_gpu() {
      local gpu=$1 file=$2; shift 2
      CUDA_VISIBLE_DEVICES=$gpu timeout ${UPDATE_TIMEOUT:-150} $PY -m trainer bench --update-batch 16 --steps $steps \
        --profile-step --label single --out "$OUT/$file" "$@" 2>&1 | grep -v -E "Warning|warn\(|kernels-community"
    }
    start=$SECONDS
    (one_gpu 0 update.json --parts lora_ceiling,update; one_gpu 0 update.json --parts update --compile-blocks) \
      > "$OUT/update_openvla.log" 2>&1 &
    (one_gpu 1 update_oft.json --parts update --models openvla-7b-oft --no-recompute
     one_gpu 1 update_oft.json --parts update --models openvla-7b-oft --no-recompute --compile-blocks) \
      > "$OUT/update_oft.log" 2>&1 &
    wait
    echo "=== 1-GPU halves took $((SECONDS - start)) s"
    tail -n 8 "$OUT/update_openvla.log" "$OUT/update_oft.log"
    for setup in fsdp_1node ${ZERO3_SETUPS:-deepspeed_zero3_overlap}; do
      LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-150} launch accelerate_configs/$setup.yaml -m trainer bench --parts update \
        --update-batch 16 --steps $steps --profile-step --label $setup --out "$OUT/update.json"
    done
    $PY - "$OUT" <<'PYEOF'
import json, sys
for name in ("update.json", "update_oft.json"):
    try:
        report = json.load(open(f"{sys.argv[1]}/{name}"))
    except OSError:
        continue
    for u in report.get("update", []):
        p = u.get("profiled_step", {})
        print("SUMMARY", name, u["label"], u["model"], u["variant"], "w", u["world_size"], "samples/s",
              round(u["samples_per_s"], 2), u["samples_per_s_repeats"]["values"], "peak", round(u["peak_gb_per_gpu"], 1),
              "idle", round(p.get("gpu_idle_share", -1), 3), "kernels", p.get("gpu_kernels"),
              "comm s", round(p.get("kernel_seconds_by_kind", {}).get("communication (nccl)", 0), 3),
              "collectives", p.get("collective_calls"))
    for k, v in report.get("ratios", {}).items():
        print("SUMMARY", name, k, {n: round(x, 3) for n, x in v.items()})
PYEOF
    ;;
  zero3)
    # ZeRO-3's update over 6 steps (its first 2-3 steps are slow), each set-up with one profiled step: the default
    # JSON, then the same with parameters up to 1M elements (the LoRA adapters) kept whole ($OUT/zero3.json)
    steps=${STEPS:-6}
    $PY -c "
import json; c = json.load(open('ds_configs/zero3.json')); c['zero_optimization']['stage3_param_persistence_threshold'] = 10**6
json.dump(c, open('/tmp/zero3_persistent.json', 'w'))
s = open('accelerate_configs/deepspeed_zero3.yaml').read().replace('ds_configs/zero3.json', '/tmp/zero3_persistent.json')
open('/tmp/deepspeed_zero3_persistent.yaml', 'w').write(s)"
    for config in accelerate_configs/deepspeed_zero3.yaml /tmp/deepspeed_zero3_persistent.yaml; do
      LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-150} launch $config -m trainer bench --parts update --update-batch 16 \
        --steps $steps --profile-step --label "$(basename $config .yaml)" --out "$OUT/zero3.json"
    done
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
    egl_demo
    ;;
  egl_demo)
    libero_setup || continue
    egl_demo
    ;;
  libero_e2e)
    libero_setup || continue
    half=$(( $(nproc) / 2 ))
    pinned_e2e libero_oft_1gpu 0 0-$((half - 1)) configs/bench_libero_oft.yaml --train.iterations $ITERATIONS \
      $E2E_ARGS ${OFT_ARGS:-} &
    sample_stacks "$PY -m trainer train --config configs/bench_libero_oft.yaml" pyspy_oft.txt &
    pinned_e2e libero_openvla_1gpu 1 $half-$(( 2 * half - 1 )) configs/bench_libero_openvla.yaml $E2E_ARGS \
      ${OPENVLA_ARGS:-} &
    wait
    for name in libero_oft_1gpu libero_openvla_1gpu; do tail -15 "$OUT/e2e_$name.log"; e2e_summary $name; done
    ;;
  libero_ab)
    # one lever against the defaults: the same 1-GPU run with A_ARGS and with B_ARGS (config A_CONFIG / B_CONFIG,
    # default OFT). Two GPUs: both at once, GPU 0 and GPU 1, each pinned to half the cores; one GPU: one after the
    # other on all cores (E2E_TIMEOUT bounds each run)
    libero_setup || continue
    a_config=${A_CONFIG:-configs/bench_libero_oft.yaml}; b_config=${B_CONFIG:-configs/bench_libero_oft.yaml}
    if (( gpus >= 2 )); then
      half=$(( $(nproc) / 2 ))
      pinned_e2e libero_ab_a 0 0-$((half - 1)) $a_config --train.iterations $ITERATIONS $E2E_ARGS ${A_ARGS:-} &
      pinned_e2e libero_ab_b 1 $half-$(( 2 * half - 1 )) $b_config --train.iterations $ITERATIONS $E2E_ARGS \
        ${B_ARGS:-} &
      wait
    else
      pinned_e2e libero_ab_a 0 0-$(( $(nproc) - 1 )) $a_config --train.iterations $ITERATIONS $E2E_ARGS ${A_ARGS:-}
      pinned_e2e libero_ab_b 0 0-$(( $(nproc) - 1 )) $b_config --train.iterations $ITERATIONS $E2E_ARGS ${B_ARGS:-}
    fi
    for name in libero_ab_a libero_ab_b; do tail -15 "$OUT/e2e_$name.log"; e2e_summary $name; done
    ;;
  libero_one)
    # one 1-GPU run on GPU 0 and all cores: RUN_CONFIG (default OFT) with RUN_ARGS, named RUN_NAME
    libero_setup || continue
    one=${RUN_NAME:-libero_one}
    pinned_e2e $one 0 0-$(( $(nproc) - 1 )) ${RUN_CONFIG:-configs/bench_libero_oft.yaml} --train.iterations $ITERATIONS \
      $E2E_ARGS ${RUN_ARGS:-}
    tail -15 "$OUT/e2e_$one.log"; e2e_summary $one
    ;;
  libero_e2e2)
    libero_setup || continue
    setup=${E2E2_CONFIG:-fsdp_1node}; name=libero_oft_${setup%%_*}_2gpu; name=${name/fsdp_/fsdp2_}
    e2e $name timeout ${E2E_TIMEOUT:-540} $PY -m accelerate.commands.launch --config_file \
      accelerate_configs/$setup.yaml --num_processes 2 -m trainer train --config configs/bench_libero_oft.yaml \
      --env.groups_per_iteration 8 --train.iterations $ITERATIONS $E2E_ARGS
    e2e_summary $name
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
