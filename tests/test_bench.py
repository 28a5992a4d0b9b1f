"""The benchmark's bookkeeping on the CPU with the tiny presets: phase split, profiler summary, ratios, report.

Speeds are not asserted (they belong to GPU runs); what is asserted is that the numbers are consistent with each
other and that each part measures what it says (the right variants, the right phases, the right ratios)."""

from types import SimpleNamespace

import pytest
import torch

from trainer import bench
from trainer.cli import benchmark_objective


def test_update_phases_add_up_to_the_step_and_follow_the_lora_targets():
    all_linear = bench.measure_update_phases(4, preset="tiny", steps=1, lora_targets="all-linear",
                                             objective=benchmark_objective())
    phases = all_linear["phases_seconds"]
    assert list(phases) == ["towers_forward", "projector_forward", "language_model_forward",
                            "language_model_backward (with recompute)", "projector_backward (with recompute)",
                            "towers_backward (with recompute)", "optimizer_step"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert all_linear["seconds_per_step"] == pytest.approx(sum(phases.values()))
    assert all_linear["samples_per_s"] == pytest.approx(4 / all_linear["seconds_per_step"])
    assert all_linear["backend"] == "single" and all_linear["world_size"] == 1
    assert "aten::mm" in all_linear["top_cpu_ops"]  # the profiled step is the update (its matmuls), on the CPU here

    # LoRA on the language model only: nothing before it needs a gradient, so its backward is the whole backward
    llm_only = bench.measure_update_phases(4, preset="tiny", steps=1, lora_targets="llm-linear",
                                           objective=benchmark_objective())
    assert list(llm_only["phases_seconds"]) == ["towers_forward", "projector_forward", "language_model_forward",
                                                "language_model_backward (with recompute)", "optimizer_step"]


def test_kernel_time_is_split_by_kind_and_ignores_cpu_events():
    def event(name, device, microseconds):
        return SimpleNamespace(name=name, device_type=device, device_time_total=microseconds)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    prof = SimpleNamespace(events=lambda: [
        event("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_TNT", cuda, 3000),
        event("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n", cuda, 1000),
        event("flash_fwd_kernel<Flash_fwd_kernel_traits>", cuda, 500),
        event("kInt8VectorQuant<__half, 1024, 1>", cuda, 250),
        event("multi_tensor_apply_kernel<AdamFunctor>", cuda, 125),
        event("void at::native::vectorized_elementwise_kernel<8>", cuda, 100),
        event("aten::mm", cpu, 99999),
    ])
    assert bench.kernel_time_by_kind(prof) == pytest.approx({
        "matmul": 0.004, "attention": 0.0005, "int8 quantise/dequantise": 0.00025, "optimizer (foreach)": 0.000125,
        "elementwise / other": 0.0001})


def test_rollout_measures_plain_adapted_and_merged_policies():
    report = bench.measure_rollout("cpu", batches=(2,), presets=("tiny",))
    assert list(report) == ["tiny", "tiny+lora", "tiny+lora merged"]
    for rows in report.values():
        assert rows[2]["actions_per_s"] == pytest.approx(2 / rows[2]["seconds"])


def test_ratios_are_taken_against_the_ceiling_of_the_same_report():
    report = {
        "ceiling": {"decode7": {16: {"seconds": 0.25}}, "prefill_oft": {16: {"seconds": 0.2}},
                    "vision": {16: {"seconds": 0.05}}, "lora_train": {16: {"samples_per_s": 32.0}}},
        "rollout": {"openvla-7b": {16: {"seconds": 0.5}}, "openvla-7b+lora merged": {16: {"seconds": 1.0}},
                    "openvla-7b-oft": {16: {"seconds": 0.4}}},
        "update": [{"backend": "ddp", "world_size": 2, "per_gpu_batch": 16, "samples_per_s": 48.0,
                    "model": "openvla-7b", "lora_targets": "llm-linear"}],
        "phases": [{"model": "openvla-7b", "lora_targets": "all-linear", "int8": False, "per_gpu_batch": 16,
                    "samples_per_s": 16.0}],
    }
    ratios = bench.ratios(report)
    assert ratios["openvla_rollout_b16"] == pytest.approx({"vs_lm_decode": 0.5, "vs_lm_decode_plus_vision": 0.6})
    assert ratios["openvla+lora merged_rollout_b16"] == pytest.approx({"vs_lm_decode": 0.25,
                                                                        "vs_lm_decode_plus_vision": 0.3})
    assert ratios["oft_rollout_b16"] == pytest.approx({"vs_lm_prefill": 0.5, "vs_lm_prefill_plus_vision": 0.75})
    assert ratios["update_ddp_w2_b16_llm-linear"] == pytest.approx({"per_gpu_vs_lm_lora": 0.75})
    assert ratios["phases_all-linear_b16"] == pytest.approx({"vs_lm_lora": 0.5})
    # a report with only the LoRA ceiling (the profile stage) has no rollout ratios and does not fail
    assert bench.ratios({"ceiling": {"lora_train": {16: {"samples_per_s": 32.0}}},
                         "rollout": report["rollout"]}) == {}


def test_the_update_part_runs_the_training_update_set_up_as_training_does():
    """measure_update builds with build.py, sets up with engine.setup_engine and runs Learner.update with the
    recipe's objective: one optimizer step per call, none skipped, on the launch's (here: single) backend."""
    result = bench.measure_update(2, preset="tiny", steps=1, lora_targets="llm-linear", objective=benchmark_objective())
    assert result["backend"] == "single" and result["world_size"] == 1 and result["skipped_steps"] == 0
    assert result["samples_per_s"] == pytest.approx(2 / result["seconds_per_step"])
