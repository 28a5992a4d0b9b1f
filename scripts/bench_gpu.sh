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
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # scripts/*.py import the trainer package from the checkout
report="$OUT/report.json"
run() { echo "=== $*"; local start=$SECONDS; "$@" 2>&1 | grep -v -E "Warning|warn\(|kernels-community|USDT|gpuGetDeviceCount" | tail -${TAIL:-40}; echo "=== took $((SECONDS - start)) s"; }
launch() { local config=$1; shift; run $PY -m accelerate.commands.launch --config_file "$config" --num_processes 2 "$@"; }
e2e() { local name=$1; shift; run "$@" --train.output_dir "$OUT/e2e_$name"; cp "$OUT/e2e_$name/metrics.jsonl" "$OUT/e2e_${name}.jsonl"; rm -rf "$OUT/e2e_$name"; }

case "${1:-single}" in
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
    if (( $(nvidia-smi -L | wc -l) >= 2 )); then  # the two halves at once, one GPU each
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
  e2e2)
    for backend in ${BACKENDS:-fsdp_1node ddp_2gpu deepspeed_zero3}; do
      iterations=2; [[ $backend == deepspeed_zero3 ]] && iterations=1  # its update is ~20x slower (see docs)
      e2e "${backend}_2gpu" timeout ${E2E_TIMEOUT:-200} $PY -m accelerate.commands.launch --config_file \
        accelerate_configs/$backend.yaml --num_processes 2 -m trainer train --config configs/bench_standin_oft.yaml \
        --train.iterations $iterations
    done
    ;;
esac
