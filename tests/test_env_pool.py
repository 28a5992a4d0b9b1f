"""The env worker pool: batched calls equal direct env calls, failures stay local, nothing is left running."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.envs.pool import EnvPool, ResetRequest
from trainer.envs.toy import ToyReachEnv

REPO_ROOT = Path(__file__).resolve().parents[1]
STAY = np.zeros((1, 7))


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited child that nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until_gone(pids, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if is_running(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def assert_same_observation(a, b):
    np.testing.assert_array_equal(a.primary_image, b.primary_image)
    np.testing.assert_array_equal(a.wrist_image, b.wrist_image)
    np.testing.assert_array_equal(a.proprio, b.proprio)
    assert a.instruction == b.instruction


def assert_same_step(a, b):
    assert_same_observation(a.observation, b.observation)
    assert (a.reward, a.success, a.done, a.steps_executed, a.info) == (
        b.reward,
        b.success,
        b.done,
        b.steps_executed,
        b.info,
    )


def test_batched_reset_and_step_equal_stepping_the_envs_directly():
    requests = {0: ResetRequest(0, 3, seed=10), 1: ResetRequest(1, 17, seed=11), 2: ResetRequest(2, 49, seed=12)}
    direct = {i: ToyReachEnv() for i in requests}
    rng = np.random.default_rng(0)
    with EnvPool("toy", num_workers=3, step_timeout_s=10) as pool:
        assert pool.info.num_tasks == 3 and pool.info.max_steps == 8 and pool.info.image_pipeline == "none"
        assert not pool.info.simulator_per_task  # the toy env's tasks share one env: no rebuild on a task change
        assert pool.info.num_init_states == (50, 50, 50) and pool.info.instructions[2] == "move to the blue target"
        replies = pool.reset(requests)
        assert list(replies) == [0, 1, 2] and all(reply.ok for reply in replies.values())
        for i, request in requests.items():
            assert_same_observation(replies[i].observation, direct[i].reset(*vars(request).values()))
        live, step_calls, actions_run = set(requests), 0, 0
        while live:
            chunks = {i: rng.uniform(-1, 1, size=(3, 7)).astype(np.float32) for i in sorted(live)}
            replies = pool.step(chunks)
            step_calls += 1
            assert set(replies) == live
            for i, reply in replies.items():
                assert reply.ok and reply.env_seconds > 0
                assert_same_step(reply.result, direct[i].step(chunks[i]))
                actions_run += reply.result.steps_executed
                if reply.result.done:
                    live.discard(i)
        stats = pool.stats
        assert sum(w.actions for w in stats.workers) == actions_run
        assert stats.step_calls == step_calls and all(w.env_errors == 0 for w in stats.workers)
        assert 0 < stats.summary()["env_step_seconds_mean"] < stats.summary()["pool_step_call_seconds_mean"]
        pids = pool.started_pids
    assert pids == pool.worker_pids  # no replacements happened
    assert wait_until_gone(pids) == []


def test_dead_and_hung_workers_lose_only_their_episode_and_are_replaced():
    # Worker 1 exits abruptly and worker 2 hangs when their episode on init state 1 / 2 is about to run its 3rd
    # action; worker 3 is SIGKILLed from outside after its first action; worker 0 is healthy.
    faults = {1: {"crash_at_step": 2, "fault_init_state_id": 1}, 2: {"hang_at_step": 2, "fault_init_state_id": 2}}
    requests = {i: ResetRequest(task_id=i % 3, init_state_id=i, seed=100 + i) for i in range(4)}
    direct = {i: ToyReachEnv() for i in requests}  # what each episode does when nothing fails
    with EnvPool("toy", num_workers=4, per_worker_env_kwargs=faults, step_timeout_s=1.5) as pool:
        first_pids = pool.worker_pids
        assert all(reply.ok for reply in pool.reset(requests).values())
        for i, request in requests.items():
            direct[i].reset(*vars(request).values())

        errors, live = {}, {0, 1, 2, 3}
        for step_index in range(8):
            if step_index == 1:
                os.kill(first_pids[3], signal.SIGKILL)
            replies = pool.step({i: STAY for i in sorted(live)})
            for i, reply in replies.items():
                if not reply.ok:
                    errors[i] = (step_index, reply.env_error)
                    assert reply.result is None
                    live.discard(i)
                else:  # every reply that arrives is exactly what the env gives when run directly
                    assert_same_step(reply.result, direct[i].step(STAY))
                    if reply.result.done:
                        live.discard(i)
        assert live == set()
        assert sorted(errors) == [1, 2, 3]  # worker 0 ran its whole 8-step episode
        assert errors[1][0] == 2 and "died during step (exit code 17)" in errors[1][1]
        assert errors[2][0] == 2 and "no reply to step within 1.5 s (hung)" in errors[2][1]
        assert errors[3][0] == 1 and "SIGKILL" in errors[3][1]
        assert [w.env_errors for w in pool.stats.workers] == [0, 1, 1, 1]

        # The failed workers were killed and replaced; the healthy one was not touched.
        assert pool.worker_pids[0] == first_pids[0]
        assert all(pool.worker_pids[i] != first_pids[i] for i in (1, 2, 3))
        assert wait_until_gone(first_pids[1:]) == []

        # The replacements serve the next episodes (other init states, so the injected faults stay quiet).
        requests = {i: ResetRequest(task_id=i % 3, init_state_id=10 + i, seed=200 + i) for i in range(4)}
        replies = pool.reset(requests)
        assert all(reply.ok for reply in replies.values())
        live, successes = {0, 1, 2, 3}, {}
        experts = {i: ToyReachEnv() for i in requests}
        for i, request in requests.items():
            assert_same_observation(replies[i].observation, experts[i].reset(*vars(request).values()))
        while live:
            replies = pool.step({i: experts[i].expert_action()[None] for i in sorted(live)})
            for i, reply in replies.items():
                assert reply.ok
                assert_same_step(reply.result, experts[i].step(experts[i].expert_action()[None]))
                if reply.result.done:
                    successes[i] = reply.result.success
                    live.discard(i)
        assert successes == {0: True, 1: True, 2: True, 3: True}
        all_pids = pool.started_pids
    assert len(all_pids) == 7
    assert wait_until_gone(all_pids) == []


def test_workers_build_their_envs_in_parallel():
    start = time.perf_counter()
    with EnvPool("toy", num_workers=4, env_kwargs={"init_delay_s": 1.0}) as pool:
        elapsed = time.perf_counter() - start
        pids = pool.started_pids
    assert elapsed < 3.0, f"4 envs that take 1 s each to build took {elapsed:.1f} s: built one after another?"
    assert wait_until_gone(pids) == []


def test_caller_mistakes_raise_and_are_not_counted_as_env_errors():
    with EnvPool("toy", num_workers=2, step_timeout_s=10) as pool:
        with pytest.raises(RuntimeError, match="worker 0 has no episode in progress"):
            pool.step({0: STAY})
        with pytest.raises(ValueError, match="task_id 3 is out of range 0..2"):
            pool.reset({0: ResetRequest(3, 0, seed=0)})
        with pytest.raises(ValueError, match="init_state_id 50 is out of range 0..49"):
            pool.reset({0: ResetRequest(0, 50, seed=0)})
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            pool.reset({0: ResetRequest(0, 0, seed=-1)})
        with pytest.raises(ValueError, match="worker index 2 is out of range"):
            pool.reset({2: ResetRequest(0, 0, seed=0)})
        assert pool.reset({0: ResetRequest(0, 0, seed=0)})[0].ok
        with pytest.raises(ValueError, match=r"worker 0: actions must have shape \[k, 7\].*\(7,\)"):
            pool.step({0: np.zeros(7)})
        with pytest.raises(ValueError, match="NaN"):
            pool.step({0: np.full((1, 7), np.nan)})
        assert pool.step({0: STAY})[0].ok
        assert all(w.env_errors == 0 and w.restarts == 0 for w in pool.stats.workers)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step({0: STAY})
    with pytest.raises(ValueError, match="unknown env suite 'nope'; valid suites: toy, libero_spatial"):
        EnvPool("nope", num_workers=1)


def test_an_env_that_cannot_be_built_fails_the_pool_with_its_error():
    with pytest.raises(RuntimeError, match=r"2 of 2 'toy' env workers failed to start(.|\n)*max_steps must be >= 1"):
        EnvPool("toy", num_workers=2, env_kwargs={"max_steps": 0})


def test_an_exception_inside_the_with_block_leaves_no_worker_behind():
    pids = []
    with pytest.raises(KeyError), EnvPool("toy", num_workers=2) as pool:
        pids = pool.started_pids
        raise KeyError("boom")
    assert len(pids) == 2 and wait_until_gone(pids) == []


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys
    import numpy as np
    from trainer.envs.pool import EnvPool, ResetRequest

    if __name__ == "__main__":
        # Ctrl-C's default, also when this test runs in a background job (a non-interactive shell starts those with
        # SIGINT ignored, and the ignore is inherited: the signal would then never reach the parent)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Worker 1 hangs in its first step, so the parent is blocked inside step() when the signal comes.
        with EnvPool("toy", 2, per_worker_env_kwargs={1: {"hang_at_step": 0}}, step_timeout_s=60) as pool:
            pool.reset({i: ResetRequest(0, i, seed=i) for i in range(2)})
            print(json.dumps(pool.worker_pids), flush=True)
            pool.step({i: np.zeros((1, 7)) for i in range(2)})
    """
)


@pytest.mark.parametrize("signal_to_parent", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_no_worker_outlives_a_parent_that_is_interrupted_or_killed(tmp_path, signal_to_parent):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        worker_pids = json.loads(parent.stdout.readline())
        assert len(worker_pids) == 2 and all(is_running(pid) for pid in worker_pids)
        time.sleep(0.3)  # let the parent enter step() and worker 1 its hang
        parent.send_signal(signal_to_parent)
        parent.wait(timeout=10)
        assert wait_until_gone(worker_pids) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# --- hangs: inside rendering, and in the very first reset (RLinf#892: an EGL deadlock there) -------------------------
# The stand-in env "renders" each observation it returns by sleeping render_seconds: a render call that blocks.


def test_a_worker_hung_inside_rendering_is_killed_and_replaced():
    # Worker 1's renders take 10 s: its reset (deadline 60 s) passes, its step's render outlasts the 3 s step deadline.
    # (Generous margins: a loaded CI machine may take a second to schedule a healthy worker.)
    with EnvPool("libero_standin", 2, {"render_seconds": 0.0, "step_seconds": 0.0, "success_per_step": 0.0},
                 per_worker_env_kwargs={1: {"render_seconds": 10.0}}, reset_timeout_s=60, step_timeout_s=3.0) as pool:
        first_pids = pool.worker_pids
        assert all(reply.ok for reply in pool.reset({i: ResetRequest(0, i, seed=i) for i in range(2)}).values())
        replies = pool.step({0: STAY, 1: STAY})
        assert replies[0].ok and replies[0].result.steps_executed == 1
        assert replies[1].result is None and "no reply to step within 3 s (hung)" in replies[1].env_error
        assert wait_until_gone([first_pids[1]]) == []  # killed, not left rendering
        assert pool.worker_pids[0] == first_pids[0] and pool.worker_pids[1] != first_pids[1]
        assert [w.env_errors for w in pool.stats.workers] == [0, 1] and [w.restarts for w in pool.stats.workers] == [0, 1]
        # the replacement serves the next episode; worker 0's episode went on untouched
        assert pool.reset({1: ResetRequest(0, 7, seed=7)})[1].ok
        assert pool.step({0: STAY})[0].ok
        all_pids = pool.started_pids
    assert len(all_pids) == 3 and wait_until_gone(all_pids) == []


def test_a_hang_in_every_first_reset_ends_with_the_systematic_error():
    # Worker 1 hangs in the first render of every process (its first reset): each hang is killed after the reset
    # deadline and the worker replaced; the episode on it fails, the other worker's does not; a hang that comes back
    # in every replacement stops the run with a clear error instead of retrying forever.
    with EnvPool("libero_standin", 2, {"render_seconds": 0.0, "step_seconds": 0.0},
                 per_worker_env_kwargs={1: {"render_seconds": 3600.0}}, reset_timeout_s=3.0,
                 max_consecutive_failures=2) as pool:
        replies = pool.reset({i: ResetRequest(0, i, seed=i) for i in range(2)})
        assert replies[0].ok and replies[0].observation.primary_image.shape == (256, 256, 3)
        assert "no reply to reset within 3 s (hung)" in replies[1].env_error
        assert pool.step({0: STAY})[0].ok  # worker 0 goes on
        with pytest.raises(RuntimeError, match=r"env workers \[1\] failed 2 times in a row"):
            pool.reset({1: ResetRequest(0, 1, seed=1)})
        pids = pool.started_pids
    assert len(pids) == 4 and wait_until_gone(pids) == []  # 2 + a replacement after each of the 2 hangs


def test_a_worker_that_hangs_while_building_its_env_gets_one_more_try(caplog):
    with caplog.at_level("WARNING", logger="trainer.envs.pool"), pytest.raises(
        RuntimeError, match=r"1 of 2 'toy' env workers failed to start(.|\n)*worker 1: did not build its env within 10 s"
    ):
        EnvPool("toy", 2, per_worker_env_kwargs={1: {"init_delay_s": 3600.0}}, start_timeout_s=10.0)
    retries = [r.getMessage() for r in caplog.records if "failed and is being replaced" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith("env worker 1 ") and "did not build its env" in retries[0]


def test_render_fallback_is_reported_once_per_pool(caplog):
    with EnvPool("libero_standin", 2, {"render_seconds": 0.0}) as pool:
        assert pool.render_notes[0] == {"MUJOCO_GL": os.environ.get("MUJOCO_GL"),
                                        "MUJOCO_EGL_DEVICE_ID": os.environ.get("MUJOCO_EGL_DEVICE_ID"),
                                        "fallback_reason": None}
        for worker in pool._workers:  # as two workers that fell back would report it
            worker.render = {"MUJOCO_GL": "osmesa", "MUJOCO_EGL_DEVICE_ID": None, "fallback_reason": "no libEGL"}
        with caplog.at_level("WARNING", logger="trainer.envs.pool"):
            for worker in pool._workers:
                pool._report_render_fallback(worker)
    warnings_logged = [r for r in caplog.records if "render with OSMesa instead of EGL" in r.getMessage()]
    assert len(warnings_logged) == 1 and "no libEGL" in warnings_logged[0].getMessage()


def test_gpu_runs_leave_the_cores_to_the_env_workers(monkeypatch):
    """make_env_pool on a GPU run caps the trainer's torch threads at the cores its subprocess workers leave free
    (a parallel op next to busy workers waits for descheduled threads); CPU runs keep their threads."""
    from types import SimpleNamespace

    import torch

    from trainer.build import EnvConfig, leave_cores_to_env_workers, make_env_pool

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    try:
        torch.set_num_threads(16)
        assert leave_cores_to_env_workers(16) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(16)
        assert leave_cores_to_env_workers(12) == 4 and torch.get_num_threads() == 4
        torch.set_num_threads(2)
        assert leave_cores_to_env_workers(4) == 2 and torch.get_num_threads() == 2  # never raised
        env = EnvConfig(suite="libero_standin", num_workers=15, max_steps=4)
        for device, expected in (("cpu", 2), ("cuda", 1)):
            torch.set_num_threads(2)
            dist = SimpleNamespace(device=torch.device(device), local_rank=0)
            with make_env_pool(env, dist, num_workers=15) as pool:
                assert isinstance(pool, EnvPool) and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
