#!/usr/bin/env bash
# The follow-up measurements of 2026-11-22 (one 2-GPU call): rollout with merged LoRA against the ceiling, FSDP2's
# update phases, FSDP2 with only the decoder layers as shard units, and 1-GPU end to end with merged-LoRA rollouts.
set -uo pipefail
OUT=${OUT:-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
quiet() { grep -v -E "Warning|warn\(|kernels-community|USDT|gpuGetDeviceCount|MatMul8bitLt|^\| kernels: (attention|int8)"; }
echo "=== rollout"; CUDA_VISIBLE_DEVICES=0 timeout 190 $PY -m trainer bench --parts ceiling,rollout --batches 16 64 \
  --out "$OUT/rollout_merged.json" 2>&1 | quiet | grep -E "rollout_b|^\| openvla" | head -40
echo "=== fsdp2 phases"; timeout 100 $PY -m accelerate.commands.launch --config_file accelerate_configs/fsdp_1node.yaml \
  --num_processes 2 -m trainer bench --parts phases --out "$OUT/fsdp2_phases.json" 2>&1 | quiet | tail -16
echo "=== fsdp2, decoder layers only as shard units"; timeout 80 $PY -m accelerate.commands.launch --config_file \
  accelerate_configs/fsdp_1node.yaml --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --num_processes 2 \
  -m trainer bench --parts update --out "$OUT/fsdp2_llm_units.json" 2>&1 | quiet | grep -E "^\| fsdp|^\| update_"
echo "=== e2e 1 GPU, merged-LoRA rollouts"; CUDA_VISIBLE_DEVICES=0 timeout 150 $PY -m trainer train \
  --config configs/bench_standin_oft.yaml --rollout.merge_lora true --train.output_dir "$OUT/e2e_merged" 2>&1 | quiet | tail -4
cp "$OUT/e2e_merged/metrics.jsonl" "$OUT/e2e_oft_1gpu_merged.jsonl" 2>/dev/null; rm -rf "$OUT/e2e_merged"
