"""Distributed execution on CPU with gloo: every backend with 2 processes, against one process with the same batch.

Each backend runs tests/dist_scripts/backend_check.py once (launched lazily, cached for the module): a fixed global
batch of 8 policy steps through `Learner.update` with the recipe's objective on the backend's engine, a NaN injected
into ONE rank's gradients, a checkpoint round trip, and rollouts under `Engine.rollout_weights`; every rank reports
JSON, which the tests below assert on.

    ddp               accelerate launch --config_file accelerate_configs/cpu_2proc.yaml   samples per rank 5 / 3
    fsdp              torchrun + TRAINER_ACCELERATE_CONFIG=accelerate_configs/fsdp_1node.yaml        8 / 0
    deepspeed_zero2   torchrun + TRAINER_ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero2.yaml   5 / 3
    deepspeed_zero3   torchrun + TRAINER_ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero3.yaml   8 / 0

Tolerances: loss and gradient norm agree with the single process to 1e-5 relative (fp32; only the summation order
differs), weights after an AdamW step to 1e-6 absolute (lr 1e-3). Skipped steps, checkpoint round trips and resumes
are exact (0 difference). DeepSpeed JIT-compiles a CPU op with g++ on its first use (~35-100 s, cached in
TORCH_EXTENSIONS_DIR, by default the repository's .cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

multiproc = pytest.mark.multiproc  # the tests that launch processes; the configuration checks at the end do not

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
PYTHON = sys.executable
LAUNCH_TIMEOUT_S = 300
RTOL = 1e-5
WEIGHT_ATOL = 1e-6

BACKENDS = {  # name: (how it is launched, samples per rank)
    "ddp": ("accelerate", "5,3"),
    "fsdp": ("accelerate_configs/fsdp_1node.yaml", "8,0"),
    "deepspeed_zero2": ("accelerate_configs/deepspeed_zero2.yaml", "5,3"),
    "deepspeed_zero3": ("accelerate_configs/deepspeed_zero3.yaml", "8,0"),
}
SHARDED = ["fsdp", "deepspeed_zero2", "deepspeed_zero3"]
PARAMETER_SHARDING = ["fsdp", "deepspeed_zero3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_", "TRAINER_ACCELERATE")) and k not in ("RANK", "WORLD_SIZE",
                                                                                         "LOCAL_RANK", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ACCELERATE_MIXED_PRECISION="no", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher we started and every process under it, by pid: torchrun puts its workers in sessions of
    their own, so killing the launcher's process group would leave them running."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(commands: list[list[str]], envs: list[dict], log_dir: Path, name: str) -> None:
    """Start the commands together (several = several torchrun 'nodes'); fail with their output if any fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"{name}-{index}.log" for index in range(len(commands))]
    with contextlib.ExitStack() as stack:
        procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=stack.enter_context(open(log, "w")),
                                  stderr=subprocess.STDOUT, start_new_session=True)
                 for command, env, log in zip(commands, envs, logs)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=LAUNCH_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                for other in procs:
                    _kill_tree(other)
                codes.append("timeout (a hang?)")
    failures = [f"{name} launcher {index} exited with {code}:\n{logs[index].read_text()[-6000:]}"
                for index, code in enumerate(codes) if code != 0]
    assert not failures, "\n\n".join(failures)


class Runs:
    """Each backend's 2-process run, launched on first use; the single-process reference first."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, tuple[Path, list[dict]]] = {}

    def single(self) -> tuple[Path, dict]:
        if "single" not in self.cache:
            out = self.root / "single"
            _run([[PYTHON, str(SCRIPTS / "backend_check.py"), "--out", str(out)]], [_env()], self.root / "logs",
                 "single")
            self.cache["single"] = (out, [json.loads((out / "rank0.json").read_text())])
        out, reports = self.cache["single"]
        return out, reports[0]

    def backend(self, name: str) -> tuple[Path, list[dict]]:
        if name not in self.cache:
            single_dir, _ = self.single()
            launcher, split = BACKENDS[name]
            out = self.root / name
            script = [str(SCRIPTS / "backend_check.py"), "--out", str(out), "--split", split, "--nan-rank", "1",
                      "--foreign-checkpoint", str(single_dir / "ckpt" / "checkpoints" / "iter-000003")]
            port = str(_free_port())
            env = _env()
            if launcher == "accelerate":
                command = [PYTHON, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", port, *script]
            else:
                env["TRAINER_ACCELERATE_CONFIG"] = str(ROOT / launcher)
                if name == "deepspeed_zero3":
                    # The tiny model's tensors are all below the JSON's persistence threshold (100k elements), which
                    # ZeRO-3 would keep whole on every rank; 0 partitions every parameter, as a 7B model's are.
                    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
                    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
                    path = self.root / "zero3_all_partitioned.json"
                    path.write_text(json.dumps(config))
                    env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(path)
                command = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
                           *script]
            _run([command], [env], self.root / "logs", name)
            self.cache[name] = (out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)])
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def _close(a: float, b: float, rtol: float = RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


# --- set-up and sharding ---------------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_is_reported_and_parameters_are_sharded_where_promised(runs, backend):
    _, reports = runs.backend(backend)
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["backend"] == backend
        sharding = report["sharding"]
        share = sharding["local_param_bytes"] / sharding["full_param_bytes"]
        if backend == "fsdp":
            assert report["model_type"].startswith("FSDP")
            assert sharding["dtensor_params"] == sharding["num_params"]  # every parameter is a DTensor ...
            assert sharding["shard_placed_params"] == sharding["num_params"]  # ... placed Shard(dim), not Replicate
            assert sharding["fsdp_units"] >= 5  # per block: 2 LLM layers + ViT blocks + root
            assert 0.45 < share < 0.55, share
        elif backend == "deepspeed_zero3":
            assert sharding["zero3_partitioned_params"] == sharding["num_params"]
            assert 0.45 < share < 0.55, share
        else:
            assert share == 1.0  # replicated parameters (ZeRO-2 partitions gradients and optimizer state only)
    if backend in PARAMETER_SHARDING:  # the two halves make up the model
        total = sum(r["sharding"]["local_param_bytes"] for r in reports)
        assert abs(total - reports[0]["sharding"]["full_param_bytes"]) <= 64 * 4 * reports[0]["sharding"]["num_params"]
    expected_model = {"ddp": "DistributedDataParallel", "deepspeed_zero2": "DeepSpeedEngine",
                      "deepspeed_zero3": "DeepSpeedEngine"}
    if backend in expected_model:
        assert reports[0]["model_type"] == expected_model[backend]


# --- one update on fixed inputs ------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_one_update_gives_the_single_process_loss_gradient_norm_and_weights(runs, backend):
    single_dir, single = runs.single()
    out, reports = runs.backend(backend)
    reference = single["update"]
    assert reference["samples"] == 8 and reference["step_skipped"] == 0
    for report in reports:
        update = report["update"]
        assert update["samples"] == 8 and update["step_skipped"] == 0
        assert _close(update["global_loss"], reference["global_loss"]), (update, reference)
        assert _close(update["grad_norm"], reference["grad_norm"]), (update, reference)
    # the replicas / shards of every rank hold the same weights, equal to the single process's after its step
    assert _close(reports[0]["after_step_checksum"], reports[1]["after_step_checksum"], 1e-12)
    assert _max_diff(load_file(str(out / "after_step.safetensors")),
                     load_file(str(single_dir / "after_step.safetensors"))) < WEIGHT_ATOL


@multiproc
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed_zero3"])
def test_a_rank_without_samples_runs_dummy_batches_and_matches_one_process(runs, backend):
    _, single = runs.single()
    _, reports = runs.backend(backend)
    assert [r["split"] for r in reports] == [[8, 0], [8, 0]]
    # rank 1 ran zero-weight padding batches only, and still logs the global loss
    assert _close(reports[1]["update"]["local_loss"], single["update"]["global_loss"])
    assert reports[0]["update"]["grad_norm"] == reports[1]["update"]["grad_norm"]
    assert _close(reports[1]["update"]["global_loss"], single["update"]["global_loss"])
    assert _close(reports[1]["update"]["grad_norm"], single["update"]["grad_norm"])


# --- the guard -------------------------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nan_in_one_ranks_gradients_skips_the_step_on_every_rank(runs, backend):
    _, reports = runs.backend(backend)
    assert [r["nan_step"]["poisoned_here"] for r in reports] == [False, True]
    for report in reports:
        nan_step = report["nan_step"]
        assert nan_step["step_skipped"] == 1.0
        assert nan_step["skipped_steps"] == 1 and nan_step["skip_reasons"] == {"nonfinite_grad_norm": 1}
        assert nan_step["weights_max_change"] == 0.0  # this rank's weights did not move
        if nan_step["optimizer_entries"]:
            assert nan_step["optimizer_max_change"] == 0.0  # nor its optimizer state (moments, step count)
        if backend.startswith("deepspeed"):
            assert nan_step["deepspeed_skipped_steps"] == 1  # DeepSpeed's own skip path, not a zero-grad step
        following = report["next_step"]  # the skip left nothing behind: the next step is an ordinary one
        assert following["step_skipped"] == 0.0 and math.isfinite(following["grad_norm"])
        assert following["weights_max_change"] > 0 and following["all_finite"]
    assert reports[0]["nan_step"]["optimizer_entries"] > 0
    if backend == "ddp":  # replicated gradients: rank 0 saw a finite norm and skipped only because rank 1 said so
        assert math.isfinite(reports[0]["nan_step"]["local_grad_norm"])
        assert not math.isfinite(reports[1]["nan_step"]["local_grad_norm"])


# --- GRPO groups across ranks ------------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_grpo_group_spanning_ranks_gets_the_single_process_advantages(runs, backend):
    _, single = runs.single()
    _, reports = runs.backend(backend)
    expected = single["grpo"]["advantages"]
    assert len(expected) == 11  # group 0 (all success) dropped; the env-error episode excluded from group 2
    assert reports[0]["grpo"]["advantages"] + reports[1]["grpo"]["advantages"] == pytest.approx(expected, abs=1e-6)
    assert reports[0]["grpo"]["advantages"] and reports[1]["grpo"]["advantages"]  # group 1 really is split
    for report in reports:
        assert report["grpo"]["metrics"] == pytest.approx(single["grpo"]["metrics"])
        assert report["grpo"]["all_advantages"] == pytest.approx(expected, abs=1e-6)


# --- checkpoints -----------------------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_checkpoint_saves_and_loads_back_exactly(runs, backend):
    single_dir, _ = runs.single()
    _, reports = runs.backend(backend)
    files = set(reports[0]["checkpoint"]["files"])
    assert {"adapter_model.safetensors", "adapter_config.json", "scheduler.pt", "trainer_state.json",
            "rng-rank0.json", "rng-rank1.json"} <= files
    # every backend: gathered, keyed by parameter name, no pickle
    assert {"optimizer.safetensors", "optimizer.json"} <= files and "optimizer.pt" not in files
    for report in reports:
        checkpoint = report["checkpoint"]
        assert checkpoint["moved_before_load"] > 0  # the step after saving changed the weights ...
        assert checkpoint["weights_max_diff_after_load"] == 0.0  # ... and loading restored them exactly
        if checkpoint["optimizer_entries"]:
            assert checkpoint["optimizer_max_diff_after_load"] == 0.0
        assert checkpoint["score_after_load"] == checkpoint["score_at_save"]  # the working weights too (ZeRO-3, FSDP)
    # the adapter a sharded run writes is the single process's after the same steps, in PEFT's naming
    path = Path(reports[0]["checkpoint"]["path"])
    reference = single_dir / "ckpt" / "checkpoints" / "iter-000003"
    assert _max_diff(load_file(str(path / "adapter_model.safetensors")),
                     load_file(str(reference / "adapter_model.safetensors"))) < WEIGHT_ATOL


@multiproc
def test_sharded_checkpoints_resume_on_one_process(runs):
    dirs = [runs.backend(name)[0] for name in SHARDED]
    result_file = runs.root / "resume.json"
    _run([[PYTHON, str(SCRIPTS / "resume_check.py"), "--out", str(result_file), *map(str, dirs)]], [_env()],
         runs.root / "logs", "resume")
    results = json.loads(result_file.read_text())
    assert results["backend"] == "single"
    for name in SHARDED:
        result = results[name]
        assert result["weights_max_diff"] == 0.0 and result["optimizer_max_diff"] == 0.0
        assert result["optimizer_entries"] > 0
        assert result["iteration"] == 3 and result["skip_reasons"] == {"nonfinite_grad_norm": 1}
        # Adam moments and step count came back: the next update is the one the 2-process run took
        assert result["next_update_max_diff"] < WEIGHT_ATOL


@multiproc
@pytest.mark.parametrize("backend", SHARDED)
def test_single_process_checkpoint_loads_into_a_sharded_backend(runs, backend):
    single_dir, single = runs.single()
    out, reports = runs.backend(backend)
    assert _max_diff(load_file(str(out / "foreign_loaded.safetensors")),
                     load_file(str(single_dir / "at_save.safetensors"))) == 0.0
    assert _max_diff(load_file(str(out / "foreign_loaded_optimizer.safetensors")),
                     load_file(str(single_dir / "at_save_optimizer.safetensors"))) == 0.0
    for report in reports:
        assert _close(report["foreign_score"], single["checkpoint"]["score_at_save"], 1e-6)


# --- rollouts --------------------------------------------------------------------------------------------------------


@multiproc
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_rollout_gathers_weights_once_per_phase_not_per_decoding_step(runs, backend):
    _, reports = runs.backend(backend)
    for report in reports:
        plain = report["gathers_without_context"]
        gathered = report["gathers_with_context"]
        short, long = gathered["2"], gathered["6"]
        assert long["policy_calls"] > short["policy_calls"]  # 3x the env steps, each 7 forwards (1 + 6 decoding)
        if backend in PARAMETER_SHARDING:
            assert plain["1"] > 0 and plain["2"] >= 2 * plain["1"]  # without the context: per forward
            units = report["sharding"]["fsdp_units"] if backend == "fsdp" else report["sharding"]["num_params"]
            for rollout in (short, long):
                assert 0 < rollout["all_gathers"] <= units  # with it: each unit / parameter at most once
            assert long["all_gathers"] <= short["all_gathers"] + 1  # not growing with decoding steps
        else:
            assert plain == {"1": 0, "2": 0} and short["all_gathers"] == long["all_gathers"] == 0
        # weights are resharded after the rollout and still the checkpoint's
        assert report["score_after_rollout"] == report["checkpoint"]["score_after_load"]
    # ranks made different numbers of policy calls inside the context (3 episodes vs 1) and did not hang
    assert reports[0]["gathers_with_context"]["6"]["policy_calls"] > reports[1]["gathers_with_context"]["6"]["policy_calls"]


# --- multi-node ------------------------------------------------------------------------------------------------------


@multiproc
def test_two_node_torchrun_on_loopback_trains_one_iteration(tmp_path):
    """scripts/launch_multinode.sh started twice (NNODES=2, NODE_RANK 0 / 1, static rendezvous on 127.0.0.1) runs the
    real `python -m trainer train` for one iteration with the tiny policy on the toy task."""
    run_dir = tmp_path / "run"
    args = ["--config", "configs/tiny_toy_cpu.yaml", "--train.output_dir", str(run_dir), "--train.iterations", "1",
            "--env.groups_per_iteration", "2", "--rollout.num_generations", "4", "--env.num_workers", "4",
            "--env.max_steps", "4", "--algo.dynamic_sampling", "false", "--algo.entropy_coef", "0.01",
            "--algo.micro_batch_size", "4", "--train.eval_every", "0", "--train.checkpoint_every", "1",
            "--log.progress", "false", "--log.plots", "false", "--log.wandb", "false"]
    port = str(_free_port())
    commands = [["bash", str(ROOT / "scripts" / "launch_multinode.sh"), *args] for _ in range(2)]
    envs = [_env(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="1",
                 PYTHON=PYTHON) for r in range(2)]
    _run(commands, envs, tmp_path / "logs", "node")
    checkpoint = run_dir / "checkpoints" / "iter-000001"
    assert (checkpoint / "rng-rank0.json").is_file() and (checkpoint / "rng-rank1.json").is_file()  # 2 ranks saved
    assert not (checkpoint / "rng-rank2.json").exists()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert last["iteration"] == 1
    assert last["rollout/episodes"] == 8 and last["train/samples"] > 0
    assert last["train/step_skipped"] == 0.0 and 0 < last["train/grad_norm"] < float("inf")
    logs = [(tmp_path / "logs" / f"node-{i}.log").read_text() for i in range(2)]
    assert "node 0/2" in logs[0] and "node 1/2" in logs[1]


def _iteration_logged(metrics: Path) -> bool:
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # the last part may be half-written
    return any(line.strip() and json.loads(line).get("iteration", 0) >= 1 for line in lines)


@multiproc
def test_when_a_node_dies_the_other_names_the_lost_rank_and_exits_without_waiting_for_the_collective_timeout(
        tmp_path):
    """Two single-process "nodes" (scripts/launch_multinode.sh on 127.0.0.1) train; after iteration 1 is logged,
    node 1 is killed with SIGKILL (launcher and worker: a lost machine). Node 0 exits with an error that names rank 1,
    from the heartbeat watch (dist.peer_timeout_s = 10 s here), not after the 30-minute collective timeout: the
    wait below would time out long before that. Node 1 starts first: the launcher must still give it rank 1 and keep
    the store on node 0 (under torchrun's c10d rendezvous the earlier process took rank 0 and, racing for the port,
    possibly the store, so killing node 1 took node 0's torchrun down before the trainer could name rank 1)."""
    import time

    run_dir = tmp_path / "run"
    args = ["--config", "configs/tiny_toy_cpu.yaml", "--train.output_dir", str(run_dir), "--train.iterations", "100",
            "--env.groups_per_iteration", "2", "--rollout.num_generations", "4", "--env.num_workers", "4",
            "--env.max_steps", "4", "--algo.micro_batch_size", "4", "--train.eval_every", "0",
            "--train.checkpoint_every", "0", "--dist.peer_timeout_s", "10", "--log.progress", "false",
            "--log.plots", "false", "--log.wandb", "false"]
    port = str(_free_port())
    logs = [tmp_path / f"node-{rank}.log" for rank in range(2)]
    nodes = []
    try:
        for rank in (1, 0):
            env = _env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       NPROC_PER_NODE="1", PYTHON=PYTHON)
            with open(logs[rank], "w") as sink:
                nodes.insert(0, subprocess.Popen(["bash", str(ROOT / "scripts" / "launch_multinode.sh"), *args],
                                                 cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                 start_new_session=True))
            if rank == 1:
                time.sleep(5)  # node 1 is the older process and reaches the port first
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not _iteration_logged(run_dir / "metrics.jsonl"):
            assert all(node.poll() is None for node in nodes), "\n".join(log.read_text()[-3000:] for log in logs)
            assert time.monotonic() < deadline, "no iteration finished in time"
            time.sleep(0.2)
        _kill_tree(nodes[1])
        code = nodes[0].wait(timeout=150)  # peer_timeout_s + the heartbeat interval, with room for a loaded machine
    finally:
        for node in nodes:
            _kill_tree(node)
    output = logs[0].read_text()
    assert code != 0, output[-3000:]
    assert "trainer: rank 0 stops: rank 1 (host " in output and "node 1) sent no heartbeat for" in output, output[-3000:]
    assert "dist.peer_timeout_s = 10" in output and "30-minute timeout" in output


# --- configuration files (one process, fast) ---------------------------------------------------------------------------


def test_accelerate_configs_translate_to_the_backend_environment():
    from trainer.dist import accelerate_config_env
    from trainer.models.lora import check_quantization

    configs = ROOT / "accelerate_configs"
    expected = {"fsdp_1node.yaml", "fsdp_multinode.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                "deepspeed_zero3_offload.yaml", "ddp_2gpu.yaml", "single_gpu.yaml", "single_gpu_8bit.yaml",
                "ddp_2gpu_8bit.yaml", "cpu_2proc.yaml", "deepspeed_zero3_overlap.yaml"}
    assert expected <= {p.name for p in configs.glob("*.yaml")}
    for name in ("fsdp_1node.yaml", "fsdp_multinode.yaml"):
        env = accelerate_config_env(configs / name)
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer,Block"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    for name, stage, offload in (("deepspeed_zero2.yaml", 2, False), ("deepspeed_zero3.yaml", 3, False),
                                 ("deepspeed_zero3_offload.yaml", 3, True),
                                 ("deepspeed_zero3_overlap.yaml", 3, False)):
        env = accelerate_config_env(configs / name)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        ds = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ("offload_optimizer" in ds["zero_optimization"]) == offload
        assert ds["gradient_clipping"] == "auto" and ds["gradient_accumulation_steps"] == 1
    for name in ("ddp_2gpu.yaml", "single_gpu.yaml", "single_gpu_8bit.yaml", "ddp_2gpu_8bit.yaml", "cpu_2proc.yaml"):
        env = accelerate_config_env(configs / name)
        assert not any(k.startswith(("ACCELERATE_USE_", "FSDP_")) for k in env), (name, env)
    # int8 (quant.mode in the run config) goes with the unsharded topologies only
    for backend in ("single", "ddp", "deepspeed_zero2"):
        check_quantization("int8", backend)
    for backend in ("fsdp", "deepspeed_zero3"):
        with pytest.raises(ValueError, match="single_gpu_8bit.yaml"):
            check_quantization("int8", backend)


def test_unknown_accelerate_config_keys_are_refused(tmp_path):
    from trainer.dist import accelerate_config_env

    path = tmp_path / "odd.yaml"
    path.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_param_nvme_path: /x\n")
    with pytest.raises(ValueError, match="offload_param_nvme_path"):
        accelerate_config_env(path)
    path.write_text("distributed_type: XLA\n")
    with pytest.raises(ValueError, match="XLA"):
        accelerate_config_env(path)


@multiproc
def test_int8_base_with_checkpointing_trains_under_ddp_like_one_process(tmp_path):
    """ddp_2gpu_8bit's path on gloo: an int8 language model with the reentrant checkpointing it gets, one update under
    DDP on 2 processes (4 samples each) against one process with all 8."""
    script = str(SCRIPTS / "int8_ddp_check.py")
    _run([[PYTHON, script, "--out", str(tmp_path / "single")]], [_env()], tmp_path / "logs", "int8 single")
    _run([[PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), script,
           "--out", str(tmp_path / "ddp")]], [_env()], tmp_path / "logs", "int8 ddp")
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["backend"] == "single" and [r["backend"] for r in ranks] == ["ddp", "ddp"]
    assert all(r["reentrant_checkpointing"] and r["int8_layers"] > 0 for r in [single, *ranks])
    assert _close(ranks[0]["grad_norm"], single["grad_norm"], rtol=1e-3)
    reference = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    for rank in range(2):
        weights = load_file(str(tmp_path / "ddp" / f"rank{rank}.safetensors"))
        assert weights.keys() == reference.keys()
        # int8 matmuls quantise each rank's activations on their own: equal within int8 rounding, not bit for bit
        assert max((weights[n] - reference[n]).abs().max().item() for n in weights) < 1e-4
    # lora_B starts at zero: non-zero after the step, so the comparison above is not between two untouched models
    assert max(p.abs().max().item() for n, p in reference.items() if "lora_B" in n) > 1e-4
