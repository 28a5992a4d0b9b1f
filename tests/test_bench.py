"""The benchmark's bookkeeping on the CPU with the tiny presets: phase split, profiler summary, ratios, report.

Speeds are not asserted (they belong to GPU runs); what is asserted is that the numbers are consistent with each
other and that each part measures what it says (the right variants, the right phases, the right ratios)."""

from types import SimpleNamespace

import pytest
import torch

from trainer import bench
from trainer.cli import benchmark_advantages, benchmark_objective


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
        event("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", cuda, 2000),
        event("aten::mm", cpu, 99999),
    ])
    assert bench.kernel_time_by_kind(prof) == pytest.approx({
        "communication (nccl)": 0.002, "matmul": 0.004, "attention": 0.0005, "int8 quantise/dequantise": 0.00025, "optimizer (foreach)": 0.000125,
        "elementwise / other": 0.0001})


def test_rollout_measures_plain_adapted_and_merged_policies():
    report = bench.measure_rollout("cpu", batches=(2,), presets=("tiny",))
    assert list(report) == ["tiny", "tiny+lora", "tiny+lora merged"]
    for rows in report.values():
        assert rows[2]["actions_per_s"] == pytest.approx(2 / rows[2]["seconds"])
        assert len(rows[2]["seconds_each"]) == 3 and rows[2]["seconds"] == pytest.approx(sum(rows[2]["seconds_each"]) / 3)


def test_rollout_times_oft_acting_through_compiled_blocks():
    """--compile-blocks on the rollout part: OFT once more, merged and acting through the compiled blocks; standard
    OpenVLA has no such variant (its decode runs the eager blocks)."""
    from torch._dynamo.utils import counters

    counters.clear()
    report = bench.measure_rollout("cpu", batches=(2,), presets=("tiny", "tiny-oft"), variants=("+lora merged",),
                                   compiled=True)
    assert list(report) == ["tiny+lora merged", "tiny-oft+lora merged", "tiny-oft+lora merged compiled"]
    assert counters["stats"]["unique_graphs"] > 0  # the compiled variant really compiled
    row = report["tiny-oft+lora merged compiled"][2]
    assert row["actions_per_s"] == pytest.approx(2 * 8 / row["seconds"])  # chunks of 8 actions


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


# --- issue 13's speed levers and the decoding paths ------------------------------------------------------------------


def test_levers_run_whole_iterations_with_each_lever():
    fast_standin = {"step_seconds": 0.0, "render_seconds": 0.0}
    report = bench.measure_levers("cpu", preset="tiny-oft", configs=("baseline", "pipeline", "all"), repeats=2,
                                  episodes=4, num_workers=2, max_steps=16, micro_batch=4, env_kwargs=fast_standin,
                                  objective=benchmark_objective(), advantages=benchmark_advantages())
    assert list(report["configs"]) == ["baseline", "pipeline", "all"]
    assert report["configs"]["all"]["levers"] == {"pipeline": True, "workers_preprocess": True, "merge_lora": True,
                                                  "recompute": False}
    for result in report["configs"].values():
        assert len(result["iterations"]) == 2
        for run in result["iterations"]:
            assert run["env_errors"] == 0 and run["samples"] > 0
            assert 4 <= run["env_steps"] <= 4 * 16  # 4 episodes of at most 16 steps
            assert run["env_steps_per_s"] == pytest.approx(run["env_steps"] / run["seconds"])
            assert run["rollout_seconds"] + run["update_seconds"] == pytest.approx(run["seconds"])
        rates = [run["env_steps_per_s"] for run in result["iterations"]]
        assert result["env_steps_per_s"] == {"median": pytest.approx(sum(rates) / 2), "min": min(rates),
                                             "max": max(rates), "values": sorted(rates)}
    # the pipelined configurations act for one half of the workers at a time: one call per worker and step here
    per_step = {name: [run["policy_calls"] for run in result["iterations"]] for name, result in report["configs"].items()}
    assert all(calls >= 2 * 2 for calls in per_step["pipeline"] + per_step["all"])  # >= 2 steps of 2 workers
    # OFT-length plain-transformers ceilings of the same run, and the FLOP bound (issue 13's accounting)
    assert {"prefill_chunks_per_s", "lora_train_recompute", "lora_train_no_recompute"} <= set(report["ceiling"])
    bound = report["flop_bound_env_steps_per_s"]
    assert bound["no_recompute"] / bound["recompute"] == pytest.approx((1 + 3) / (1 + 2))
    ratios = bench.speed_ratios({"levers": report})
    assert ratios["e2e_baseline"]["vs_baseline"] == 1.0
    assert set(ratios["e2e_all"]) == {"env_steps_per_s", "vs_flop_bound", "vs_baseline", "vs_model_only_ceiling"}


def test_flop_bound_is_the_issue_accounting():
    """Issue 13: a 591-token OFT forward is ~9 TFLOP (2 per parameter and token), rollout + one update epoch ~4.5
    TFLOP per env step -> ~175 env steps/s at 790 TFLOP/s with recompute, ~235 without."""
    from trainer.models.config import preset
    from trainer.models.loading import build_model

    policy = SimpleNamespace(base_model=build_model(preset("openvla-7b-oft"), on_meta=True), chunk_size=8)
    assert bench.forward_flops(policy, text_tokens=20) / 1e12 == pytest.approx(9.0, rel=0.02)
    assert bench.flop_bound_env_steps_per_s(policy, 20, recompute=True) == pytest.approx(175, rel=0.02)
    assert bench.flop_bound_env_steps_per_s(policy, 20, recompute=False) == pytest.approx(235, rel=0.02)
    openvla = SimpleNamespace(base_model=build_model(preset("openvla-7b"), on_meta=True), chunk_size=1)
    assert bench.forward_flops(openvla, text_tokens=20) / 1e12 == pytest.approx(4.3, rel=0.02)  # "~4 TFLOP"


def test_speed_ratios_are_taken_against_the_same_report():
    def rate(median):
        return {"median": median, "min": median, "max": median, "values": [median]}

    report = {
        "levers": {"configs": {"baseline": {"env_steps_per_s": rate(40.0), "levers": {"recompute": True}},
                               "all": {"env_steps_per_s": rate(90.0), "levers": {"recompute": False}}},
                   "flop_bound_env_steps_per_s": {"recompute": 175.0, "no_recompute": 225.0},
                   "ceiling": {"prefill_chunks_per_s": 60.0, "lora_train_recompute": {"samples_per_s": 12.0},
                               "lora_train_no_recompute": {"samples_per_s": 20.0}}},
        "decode": {"flop_bound_actions_per_s": 200.0,
                   "ceiling": {16: {"decode7_actions_per_s": rate(64.0),
                                    "decode7_plus_vision_actions_per_s": rate(50.0)}},
                   "variants": {"lora/dynamic": {16: {"actions_per_s": rate(25.0)}},
                                "lora/graphs": {16: {"actions_per_s": rate(100.0)}}}},
    }
    ratios = bench.speed_ratios(report)
    assert ratios["e2e_all"] == pytest.approx({"env_steps_per_s": 90.0, "vs_flop_bound": 0.4, "vs_baseline": 2.25,
                                               "vs_model_only_ceiling": 90.0 / (1 / (1 / 480 + 1 / 160))})
    assert ratios["e2e_baseline"]["vs_model_only_ceiling"] == pytest.approx(40.0 / (1 / (1 / 480 + 1 / 96)))
    assert ratios["decode_lora/graphs_b16"] == pytest.approx({"actions_per_s": 100.0, "vs_flop_bound": 0.5,
                                                              "vs_dynamic_cache": 4.0, "vs_lm_decode_ceiling": 1.5625,
                                                              "vs_lm_decode_plus_vision": 2.0})


def test_gpu_check_script_runs_its_code_on_the_cpu(tmp_path):
    """scripts/check_gpu_paths.py with --cpu: every check and the decode benchmark, with nothing captured (the
    'graph' decoder is a second eager one), on the tiny preset."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_gpu_paths.py"
    spec = importlib.util.spec_from_file_location("check_gpu_paths", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path), "--cpu", "--preset", "tiny", "--batches", "2", "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    assert report["failures"] == []
    assert all(check["ok"] for check in report["tiny_checks"].values())
    assert report["tiny_checks"]["tiny_float32"]["graph_vs_eager_token_mismatches"] == 0
    variants = report["decode"]["variants"]
    assert set(variants) == {"lora/dynamic", "lora/static", "lora merged/dynamic", "lora merged/static"}
    for weights in ("lora", "lora merged"):  # the prefill alone takes less than the whole act (where time goes)
        prefill = report["decode"]["prefill_seconds"][weights]["2"]["median"]
        assert 0 < prefill < 2 / variants[f"{weights}/dynamic"]["2"]["actions_per_s"]["median"]
    assert report["decode"]["agreement"]["lora/dynamic_vs_static_b2"]["token_agreement"] == 1.0
    assert "decode_lora/static_b2" in report["speed_ratios"]
    assert (tmp_path / "decode.md").read_text().count("| lora") == 4
def test_the_update_part_runs_the_training_update_set_up_as_training_does():
    """measure_update builds with build.py, sets up with engine.setup_engine and runs Learner.update with the
    recipe's objective: one optimizer step per call, none skipped, on the launch's (here: single) backend."""
    result = bench.measure_update(2, preset="tiny", steps=1, lora_targets="llm-linear", objective=benchmark_objective())
    assert result["backend"] == "single" and result["world_size"] == 1 and result["skipped_steps"] == 0
    assert result["samples_per_s"] == pytest.approx(2 / result["seconds_per_step"])


def test_the_update_part_reports_each_step_and_the_scaling_against_one_gpu():
    result = bench.measure_update(2, preset="tiny", steps=3, lora_targets="llm-linear", label="cpu_single",
                                  objective=benchmark_objective())
    repeats = result["samples_per_s_repeats"]
    assert result["label"] == "cpu_single" and len(repeats["values"]) == 3
    assert repeats["min"] <= repeats["median"] <= repeats["max"]
    # the mean step time and the per-step rates describe the same three steps
    assert result["seconds_per_step"] == pytest.approx(sum(2 / rate for rate in repeats["values"]) / 3)

    def update(label, world, rate, low, high):
        return {"backend": label.split("_")[0], "label": label, "world_size": world, "model": "openvla-7b",
                "lora_targets": "all-linear", "per_gpu_batch": 16, "samples_per_s": rate,
                "samples_per_s_repeats": {"median": rate, "min": low, "max": high, "values": [low, rate, high]}}

    updates = [update("single", 1, 20.0, 19.0, 21.0), update("fsdp_no_reshard", 2, 38.0, 37.0, 39.0),
               update("deepspeed_zero3", 2, 30.0, 29.0, 31.0)]
    assert bench.scaling(updates) == {
        "scaling_fsdp_no_reshard_w2_b16": {"vs_one_gpu": pytest.approx(1.9), "vs_one_gpu_min": pytest.approx(37 / 21),
                                           "vs_one_gpu_max": pytest.approx(39 / 19)},
        "scaling_deepspeed_zero3_w2_b16": {"vs_one_gpu": pytest.approx(1.5), "vs_one_gpu_min": pytest.approx(29 / 21),
                                           "vs_one_gpu_max": pytest.approx(31 / 19)}}


def test_the_update_part_profiles_a_step_and_names_its_variant():
    """--profile-step: one more step under torch.profiler with its kernel count and the collectives called (none in
    one process); --no-recompute names the variant, which keys the ratios and the scaling apart from the default."""
    variant = bench.UpdateVariant(recompute=False)
    result = bench.measure_update(2, preset="tiny", steps=1, lora_targets="llm-linear", objective=benchmark_objective(),
                                  variant=variant, profile_step=True)
    assert result["variant"] == "no_recompute" and bench.UpdateVariant().name == "recompute"
    assert bench.UpdateVariant(compile_blocks=True).name == "recompute_compiled"
    profiled = result["profiled_step"]
    assert profiled["wall_seconds"] > 0 and profiled["collective_calls"] == {}
    assert set(profiled["kernel_seconds_by_kind"]) >= {"matmul", "communication (nccl)", "elementwise / other"}
    assert result["profiled_step_gpu_busy_share_all_ranks"] == [1 - profiled["gpu_idle_share"]]
    # a one-GPU update of another variant is not the reference of the default variant's multi-GPU figure
    single = dict(result, model="openvla-7b", per_gpu_batch=16)
    multi = dict(single, backend="fsdp", label="fsdp", world_size=2, variant="recompute")
    assert bench.scaling([single, multi]) == {}
    assert list(bench.scaling([single, dict(multi, variant="no_recompute")])) == ["scaling_fsdp_w2_b16_no_recompute"]


def test_stack_shares_counts_each_sample_once_per_function(tmp_path):
    """scripts/stack_shares.py: inclusive shares per thread kind from py-spy's collapsed stacks (gzipped too)."""
    import gzip
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "stack_shares.py"
    spec = importlib.util.spec_from_file_location("stack_shares", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = 'process 1:"python -m trainer train";_run_module_as_main (<frozen runpy>:198);train (trainer/train.py:1)'
    worker = 'process 1:"python";process 2:"spawn";spawn_main (multiprocessing/spawn.py:1);_worker_main (pool.py:2)'
    lines = [f"{main};Learner.update (trainer/learner.py:3) 6",
             f"{main};collect_episodes (r.py:1);_Rollout.draws (r.py:2);sampling_noise (d.py:3);sampling_noise (d.py:4) 3",
             f"{main};collect_episodes (r.py:1);EnvPool.step_end (p.py:5) 1",
             'process 1:"python";Thread._bootstrap (threading.py:1) 50',  # another thread: in neither part
             f"{worker};_ConnectionBase.recv (c.py:1) 9",
             f"{worker};TransformedEnv.step (t.py:1);MujocoEnv.step (m.py:1) 1"]
    stacks_file = tmp_path / "stacks.txt.gz"
    with gzip.open(stacks_file, "wt") as out:
        out.write("\n".join(lines) + "\n")
    stacks = script.read_stacks(str(stacks_file))
    main_thread = [(f, n) for f, n in stacks if f[1].startswith("_run_module_as_main")]
    total, shares = script.inclusive_shares(main_thread, script.MAIN_FRAMES)
    assert total == 10
    assert shares["Learner.update"] == 0.6 and shares["collect_episodes"] == 0.4
    assert shares["sampling_noise"] == 0.3 and shares["Rollout.draws"] == 0.3  # two frames of one function: once
    assert shares["EnvPool.step_end"] == 0.1 and shares["VLAPolicy.act"] == 0.0
    workers = [(f, n) for f, n in stacks if any(frame.startswith("_worker_main ") for frame in f)]
    total, shares = script.inclusive_shares(workers, script.WORKER_FRAMES)
    assert total == 10 and shares["_ConnectionBase.recv"] == 0.9 and shares["MujocoEnv.step"] == 0.1
