"""A pool of env worker processes: one env per process, batched reset/step, and recovery from dead or hung workers.

Why not gymnasium.vector.AsyncVectorEnv: a batched call there is all-or-nothing. A worker that dies makes the whole
call raise (EOFError), an exception in one worker closes that worker's pipe for good and raises in the caller, and a
timeout raises for the whole batch with no way to kill and replace the one slow worker. A LIBERO rollout must instead
lose only the episode whose simulator failed (DESIGN invariant 6). So this pool is small and does exactly that:

- Each worker builds its env from a picklable spec (suite name + kwargs, through trainer.envs.make_env) in a "spawn"
  (or "forkserver") process, which is safe with torch and CUDA loaded in the parent. All workers start at once:
  creating a LIBERO env takes ~5 s, so starting them one after another would cost minutes.
- reset() and step() send to every addressed worker first, then collect replies until a per-call deadline.
  step_begin() / step_end() are the two halves of step(): a pipelined rollout runs the policy for some workers while
  others step.
- A worker that dies, hangs past the deadline, or raises inside the env is killed (with its process group) and
  replaced by a fresh process at once; its reply carries `env_error` (a description) so the caller drops that episode
  from training and success statistics. The other workers' replies are untouched.
- No orphans: close() (also via `with`, atexit, and __del__) asks workers to exit and kills the stragglers' process
  groups; each worker also watches its parent and exits when it is gone (parent SIGKILLed, SIGTERMed, crashed), and it
  ignores SIGINT and lives in its own process group, so a Ctrl-C reaches only the parent, which then closes the pool.
- Time spent inside env.reset/env.step is measured in the worker and accumulated per worker (`stats`).
- A hang counts like a crash wherever it happens, rendering included (an EGL driver deadlock at the first reset,
  RLinf#892): the worker is killed at the call's deadline and replaced. A worker that hangs while building its env
  gets one more try before the pool gives up. How each worker renders is in `render_notes`; a fallback from EGL to
  OSMesa is logged once per pool.

Caveat of "spawn": each worker re-imports the parent's main script (not when it runs as `python -m package`, which
is how the trainer is launched), so a script that starts a pool needs an `if __name__ == "__main__":` guard, and
heavy top-level imports there (torch) cost each worker their import time.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.envs import SUITES, make_env
from trainer.envs.base import ACTION_DIM, Observation, StepResult
from trainer.envs.preprocess import TransformedEnv
from trainer.envs.render import RenderFallbackWarning, fallback_reason

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.25  # how often a worker checks that its parent is still alive


@dataclass(frozen=True)
class ResetRequest:
    task_id: int
    init_state_id: int
    seed: int
    record_frames: bool = False  # a video of this episode: a frame per action in StepResult.frames


@dataclass(frozen=True)
class EnvInfo:
    """What the rollout needs to know about the pool's envs (read from worker 0 once it has started)."""

    suite: str
    max_steps: int
    image_pipeline: str
    num_init_states: tuple[int, ...]  # per task
    instructions: tuple[str, ...]  # per task
    simulator_per_task: bool = False  # a reset to another task builds a new simulator (LIBERO: seconds)

    @property
    def num_tasks(self) -> int:
        return len(self.instructions)


@dataclass
class ResetReply:
    observation: Observation | None  # None when env_error is set
    env_error: str | None  # why this episode failed (worker died, hung, raised); None when it did not
    env_seconds: float  # time spent inside env.reset in the worker

    @property
    def ok(self) -> bool:
        return self.env_error is None


@dataclass
class StepReply:
    result: StepResult | None  # None when env_error is set
    env_error: str | None
    env_seconds: float  # time spent inside env.step in the worker

    @property
    def ok(self) -> bool:
        return self.env_error is None


@dataclass
class _InFlight:
    """A command sent to some workers whose replies are not collected yet (EnvPool._send / _receive)."""

    command: str
    pending: dict  # connection -> worker index
    failures: dict[int, str]  # workers that could not be sent to
    deadline: float  # time.monotonic() by which the replies must have come
    timeout_s: float


@dataclass
class PendingStep:
    """A step sent with `step_begin`, to be collected with `step_end`."""

    flight: Any  # _InFlight for EnvPool; the replies themselves for InlinePool
    started: float  # time.perf_counter() at the send


@dataclass
class WorkerStats:
    resets: int = 0
    reset_seconds: float = 0.0  # inside env.reset
    # Counters of successful calls only; failures are counted in env_errors.
    steps: int = 0  # step calls (one per action chunk)
    actions: int = 0  # actions actually executed (sum of steps_executed)
    step_seconds: float = 0.0  # inside env.step
    env_errors: int = 0
    restarts: int = 0


@dataclass
class PoolStats:
    workers: list[WorkerStats]
    step_calls: int = 0  # batched step() calls
    step_call_seconds: float = 0.0  # wall time of those calls in the parent: env time + transport + waiting
    reset_calls: int = 0
    reset_call_seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """Totals for logs: mean seconds per env step (per chunk) and per batched step round trip."""
        steps = sum(w.steps for w in self.workers)
        return {
            "env_step_seconds_mean": sum(w.step_seconds for w in self.workers) / max(steps, 1),
            "env_reset_seconds_mean": sum(w.reset_seconds for w in self.workers)
            / max(sum(w.resets for w in self.workers), 1),
            "pool_step_call_seconds_mean": self.step_call_seconds / max(self.step_calls, 1),
            "env_errors": float(sum(w.env_errors for w in self.workers)),
            "worker_restarts": float(sum(w.restarts for w in self.workers)),
        }


# --- the worker process ----------------------------------------------------------------------------------------------


def _exit_when_parent_dies(original_parent_pid: int) -> None:
    # When the parent dies the worker is re-parented (to init or a subreaper), so its parent pid changes. A thread is
    # needed because the main thread may be busy (or hung) inside the env when that happens.
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != original_parent_pid:
            os._exit(1)


def describe_env(env) -> EnvInfo:
    """The EnvInfo of an env instance (what a pool reports about its workers' envs)."""
    num_tasks = env.num_tasks()
    return EnvInfo(
        suite=env.suite,
        max_steps=env.max_steps,
        image_pipeline=env.image_pipeline,
        num_init_states=tuple(env.num_init_states(t) for t in range(num_tasks)),
        instructions=tuple(env.instruction(t) for t in range(num_tasks)),
        simulator_per_task=bool(getattr(env, "simulator_per_task", False)),
    )


_describe = describe_env  # the name trainer/envs/inline.py imports


def render_notes() -> dict:
    """How this worker renders (MuJoCo backend, EGL device, why it fell back to OSMesa), for the pool to report."""
    return {"MUJOCO_GL": os.environ.get("MUJOCO_GL"), "MUJOCO_EGL_DEVICE_ID": os.environ.get("MUJOCO_EGL_DEVICE_ID"),
            "fallback_reason": fallback_reason()}


def _worker_main(conn, suite: str, env_kwargs: dict, env_vars: dict, observation_transform=None) -> None:
    """Serve ("reset", ResetRequest) / ("step", actions) / ("close", None); reply (status, value, env_seconds).
    Observations go through `observation_transform` (if any) before they are sent (trainer.envs.preprocess)."""
    os.setpgrp()  # own process group: the pool can kill the env and anything it started in one call
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it closes the pool
    threading.Thread(target=_exit_when_parent_dies, args=(os.getppid(),), daemon=True).start()
    os.environ.update(env_vars)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RenderFallbackWarning)
            env = make_env(suite, **env_kwargs)
        for warning in caught:  # the pool reports a rendering fallback once for all its workers; others as usual
            if not issubclass(warning.category, RenderFallbackWarning):
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        if observation_transform is not None:
            env = TransformedEnv(env, observation_transform)
        conn.send(("ready", (describe_env(env), render_notes()), 0.0))
    except BaseException:  # noqa: BLE001 -- whatever went wrong, the parent gets the traceback instead of a silent EOF
        conn.send(("error", traceback.format_exc(), 0.0))
        return
    try:
        while True:
            try:
                command, payload = conn.recv()
            except EOFError:  # the parent closed its end: nobody is listening any more
                return
            if command == "close":
                return
            start = time.perf_counter()
            try:
                if command == "reset":
                    value = env.reset(payload.task_id, payload.init_state_id, payload.seed, record_frames=payload.record_frames)
                elif command == "step":
                    value = env.step(payload)
                else:
                    raise ValueError(f"unknown command {command!r}")
                conn.send(("ok", value, time.perf_counter() - start))
            except Exception:  # noqa: BLE001 -- any env failure becomes an env_error reply, never a training signal
                conn.send(("error", traceback.format_exc(), time.perf_counter() - start))
    finally:
        env.close()


# --- the pool (parent side) ------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing.Process of the chosen context
    conn: multiprocessing.connection.Connection
    ready: bool = False  # the env has been built and announced itself
    busy: bool = False  # a command was sent and its reply not yet read (true after an interrupted call)
    episode_active: bool = False
    consecutive_failures: int = 0
    info: EnvInfo | None = None
    render: dict | None = None  # render_notes() of the worker's process


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class EnvPool:
    """num_workers env processes of one suite, reset and stepped in batches addressed by worker index.

    Not thread-safe: one thread drives a pool. Typical use:

        with EnvPool("toy", num_workers=4, step_timeout_s=10) as pool:
            replies = pool.reset({i: ResetRequest(task_id, init_state_id, seed) for i, ... in ...})
            replies = pool.step({i: chunk for i, chunk in ...})  # skip workers whose episode ended or failed
    """

    def __init__(
        self,
        suite: str,
        num_workers: int,
        env_kwargs: Mapping[str, Any] | None = None,
        *,
        per_worker_env_kwargs: Mapping[int, Mapping[str, Any]] | None = None,
        env_vars: Mapping[str, str] | None = None,
        start_timeout_s: float = 300.0,
        reset_timeout_s: float = 120.0,
        step_timeout_s: float = 120.0,
        close_timeout_s: float = 5.0,
        max_consecutive_failures: int = 3,
        start_method: str = "spawn",
        observation_transform=None,
    ):
        """
        Args:
            suite, env_kwargs: the env every worker builds, as trainer.envs.make_env(suite, **env_kwargs).
            per_worker_env_kwargs: {worker index: kwargs} merged over env_kwargs for that worker (e.g. fault injection
                in tests). Replacements of a worker get the same kwargs.
            env_vars: set in each worker before its env is built (e.g. MUJOCO_GL, MUJOCO_EGL_DEVICE_ID).
            start_timeout_s: how long a worker may take to build its env (LIBERO: ~5 s, more under load).
            reset_timeout_s, step_timeout_s: per-call deadlines; a worker that misses one is killed and replaced.
                LIBERO's first step compiles numba code (~9 s on CPU), so keep these generous there.
            max_consecutive_failures: a worker failing this many times in a row, with no success in between, means
                something systematic (bad config, broken install): the pool raises instead of retrying forever.
            start_method: "spawn" or "forkserver"; "fork" is refused because forking a process that holds torch
                threads or a CUDA context can deadlock the child.
            observation_transform: a picklable callable every worker applies to the observations it returns, e.g.
                the policy's image pipeline (trainer.envs.preprocess.PrepareViews), so that it runs in parallel in
                the workers instead of in the trainer process.
        """
        if suite not in SUITES:
            raise ValueError(f"unknown env suite {suite!r}; valid suites: {', '.join(SUITES)}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver' (fork is unsafe with torch), got {start_method!r}"
            )
        per_worker_env_kwargs = dict(per_worker_env_kwargs or {})
        unknown = sorted(i for i in per_worker_env_kwargs if not 0 <= i < num_workers)
        if unknown:
            raise ValueError(f"per_worker_env_kwargs names workers {unknown}, but workers are 0..{num_workers - 1}")

        self.suite = suite
        self.num_workers = num_workers
        self.start_timeout_s = start_timeout_s
        self.reset_timeout_s = reset_timeout_s
        self.step_timeout_s = step_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self._env_kwargs = [{**(env_kwargs or {}), **per_worker_env_kwargs.get(i, {})} for i in range(num_workers)]
        self._env_vars = dict(env_vars or {})
        self._observation_transform = observation_transform
        self._context = multiprocessing.get_context(start_method)
        self._closed = False
        self.started_pids: list[int] = []  # every worker process ever started, replacements included
        self.stats = PoolStats(workers=[WorkerStats() for _ in range(num_workers)])

        # Launch all, then wait for all: the envs are built concurrently.
        self._workers: list[_Worker] = []
        _LIVE_POOLS.add(self)
        self._render_fallback_reported = False
        try:
            self._workers = [self._launch(i) for i in range(num_workers)]
            errors = self._await_ready(range(num_workers), start_timeout_s)
            hung = [i for i, error in errors.items() if error.startswith("did not build its env")]
            if hung:  # a hang while building (e.g. an EGL driver deadlock, RLinf#892) is given one more try
                for index in hung:
                    self._replace(index, errors.pop(index))
                errors.update(self._await_ready(hung, start_timeout_s))
            if errors:
                details = "\n".join(f"--- worker {i}: {error}" for i, error in sorted(errors.items()))
                raise RuntimeError(f"{len(errors)} of {num_workers} {suite!r} env workers failed to start:\n{details}")
        except BaseException:
            self.close()
            raise
        self.info: EnvInfo = self._workers[0].info

    # --- public API ---------------------------------------------------------------------------------------------
    def reset(self, requests: Mapping[int, ResetRequest], timeout_s: float | None = None) -> dict[int, ResetReply]:
        """Reset the addressed workers ({worker index: request}) to new episodes; other workers are left alone."""
        return self.reset_end(self.reset_begin(requests, timeout_s))

    def reset_begin(self, requests: Mapping[int, ResetRequest], timeout_s: float | None = None) -> PendingStep:
        """The first half of `reset`: send the requests and return at once (as `step_begin` does for steps), so that
        a rollout can act for other envs while these build their simulators. Collect the replies with `reset_end`."""
        self._check_open()
        for index, request in requests.items():
            self._check_idle(index)
            self._check_reset_request(index, request)
        started = time.perf_counter()
        return PendingStep(self._send("reset", requests, timeout_s or self.reset_timeout_s), started)

    def reset_end(self, pending: PendingStep) -> dict[int, ResetReply]:
        """Wait for the replies of a `reset_begin` (up to its deadline); as `reset` returns them."""
        replies = {}
        for index, (value, error, seconds) in self._receive(pending.flight).items():
            worker, stats = self._workers[index], self.stats.workers[index]
            worker.episode_active = error is None
            if error is None:
                stats.resets += 1
                stats.reset_seconds += seconds
            replies[index] = ResetReply(observation=value, env_error=error, env_seconds=seconds)
        self.stats.reset_calls += 1
        self.stats.reset_call_seconds += time.perf_counter() - pending.started
        return replies

    def step(self, actions: Mapping[int, np.ndarray], timeout_s: float | None = None) -> dict[int, StepReply]:
        """Run one action chunk ([k, 7]) on each addressed worker; each must have an episode in progress."""
        return self.step_end(self.step_begin(actions, timeout_s))

    def step_begin(self, actions: Mapping[int, np.ndarray], timeout_s: float | None = None) -> PendingStep:
        """The first half of `step`: send the chunks and return at once, while the workers step. Collect the replies
        with `step_end`; until then those workers take no other call (other workers do). The deadline runs from now.
        This is what lets a rollout run the policy on some envs while others step (rollout.pipeline)."""
        self._check_open()
        checked = {}
        for index, chunk in actions.items():
            self._check_idle(index)
            if not self._workers[index].episode_active:
                raise RuntimeError(
                    f"worker {index} has no episode in progress (it ended, failed, or was never reset): reset it first"
                )
            checked[index] = self._check_actions(index, chunk)
        started = time.perf_counter()
        return PendingStep(self._send("step", checked, timeout_s or self.step_timeout_s), started)

    def step_end(self, pending: PendingStep) -> dict[int, StepReply]:
        """Wait for the replies of a `step_begin` (up to its deadline); as `step` returns them."""
        replies = {}
        for index, (value, error, seconds) in self._receive(pending.flight).items():
            worker, stats = self._workers[index], self.stats.workers[index]
            worker.episode_active = error is None and not value.done
            if error is None:
                stats.steps += 1
                stats.step_seconds += seconds
                stats.actions += value.steps_executed
            replies[index] = StepReply(result=value, env_error=error, env_seconds=seconds)
        self.stats.step_calls += 1
        self.stats.step_call_seconds += time.perf_counter() - pending.started
        return replies

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        """Stop every worker: ask politely, wait up to close_timeout_s, then kill the stragglers' process groups."""
        if self._closed:
            return
        self._closed = True
        _LIVE_POOLS.discard(self)
        for worker in self._workers:
            if worker.busy:  # interrupted mid-call (Ctrl-C): it may be stuck in the env, so do not wait for it
                self._kill(worker)
                continue
            try:
                worker.conn.send(("close", None))
            except (OSError, ValueError):  # already dead, or its connection already closed
                pass
        deadline = time.monotonic() + self.close_timeout_s
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0.0))
        for worker in self._workers:
            self._kill(worker)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            # During interpreter shutdown parts of the runtime may already be gone; atexit has closed us by then anyway.
            with contextlib.suppress(Exception):
                self.close()

    # --- workers ------------------------------------------------------------------------------------------------
    def _launch(self, index: int) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.suite, self._env_kwargs[index], self._env_vars, self._observation_transform),
            name=f"{self.suite}-env-worker-{index}",
        )
        process.start()
        child_conn.close()  # keep only the worker's copy, so its death shows up as EOF on ours
        self.started_pids.append(process.pid)
        return _Worker(index=index, process=process, conn=parent_conn)

    def _kill(self, worker: _Worker) -> None:
        if worker.process.exitcode is None:  # not yet exited (and not reaped, so its pid cannot have been reused)
            try:
                os.killpg(worker.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # the worker had not yet made its own group
                pass
            worker.process.kill()
        worker.process.join(5.0)
        worker.conn.close()

    def _replace(self, index: int, reason: str) -> None:
        """Kill worker `index` and start a new one in the background; the next call to it waits until it is ready."""
        old = self._workers[index]
        logger.warning("env worker %d (pid %s) failed and is being replaced: %s", index, old.process.pid, reason)
        self._kill(old)
        self.stats.workers[index].env_errors += 1
        self.stats.workers[index].restarts += 1
        new = self._launch(index)
        new.consecutive_failures = old.consecutive_failures + 1
        self._workers[index] = new

    def _await_ready(self, indices: Iterable[int], timeout_s: float) -> dict[int, str]:
        """Wait (all at once) for the given workers to finish building their envs; returns {index: error}."""
        waiting = {self._workers[i].conn: i for i in indices if not self._workers[i].ready}
        errors = {}
        deadline = time.monotonic() + timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in multiprocessing.connection.wait(list(waiting), timeout=remaining):
                index = waiting.pop(conn)
                worker = self._workers[index]
                try:
                    status, value, _ = conn.recv()
                except (EOFError, OSError):
                    errors[index] = (
                        f"died while building its env ({self._exit_description(worker)}); its stderr may say why. "
                        f"A script that starts a pool needs an `if __name__ == '__main__':` guard (spawn re-imports it)"
                    )
                    continue
                if status == "ready":
                    worker.ready, (worker.info, worker.render) = True, value
                    self._report_render_fallback(worker)
                else:
                    errors[index] = f"raised while building its env:\n{value}"
        for index in waiting.values():
            errors[index] = f"did not build its env within {timeout_s:.0f} s"
        return errors

    def _call(
        self, command: str, payloads: Mapping[int, Any], timeout_s: float
    ) -> dict[int, tuple[Any, str | None, float]]:
        """Send command to each addressed worker, then collect (value, env_error, env_seconds) per worker."""
        return self._receive(self._send(command, payloads, timeout_s))

    def _send(self, command: str, payloads: Mapping[int, Any], timeout_s: float) -> _InFlight:
        """Send command to each addressed worker (replacements are awaited first); the reply deadline starts now."""
        failures: dict[int, str] = {}
        # Replacements started after an earlier failure must be ready before they can serve.
        for index, error in self._await_ready(payloads, self.start_timeout_s).items():
            failures[index] = f"replacement worker could not start: {error}"

        pending: dict[multiprocessing.connection.Connection, int] = {}
        for index, payload in payloads.items():
            if index in failures:
                continue
            worker = self._workers[index]
            try:
                worker.conn.send((command, payload))
                worker.busy = True
                pending[worker.conn] = index
            except OSError:  # BrokenPipeError and friends: the worker is already gone
                failures[index] = f"worker died before {command} ({self._exit_description(worker)})"
        return _InFlight(command, pending, failures, time.monotonic() + timeout_s, timeout_s)

    def _receive(self, flight: _InFlight) -> dict[int, tuple[Any, str | None, float]]:
        """Collect the replies of a `_send` until its deadline; workers that failed or missed it are replaced."""
        command, pending, failures = flight.command, dict(flight.pending), dict(flight.failures)
        results: dict[int, tuple[Any, str | None, float]] = {}
        while pending:
            remaining = flight.deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in multiprocessing.connection.wait(list(pending), timeout=remaining):
                index = pending.pop(conn)
                worker = self._workers[index]
                worker.busy = False
                try:
                    status, value, seconds = conn.recv()
                except (EOFError, OSError):
                    failures[index] = f"worker died during {command} ({self._exit_description(worker)})"
                    continue
                if status == "ok":
                    results[index] = (value, None, seconds)
                    worker.consecutive_failures = 0
                else:
                    failures[index] = f"env raised during {command}:\n{value}"
        for index in pending.values():
            failures[index] = f"no reply to {command} within {flight.timeout_s:g} s (hung)"

        for index, reason in failures.items():
            self._replace(index, reason)
            results[index] = (None, reason, 0.0)
        self._raise_if_failing_repeatedly()
        return dict(sorted(results.items()))

    def _raise_if_failing_repeatedly(self) -> None:
        broken = [w.index for w in self._workers if w.consecutive_failures >= self.max_consecutive_failures]
        if broken:
            raise RuntimeError(
                f"env workers {broken} failed {self.max_consecutive_failures} times in a row with no success in "
                f"between; this looks systematic (env config or installation), see the warnings above for the errors"
            )

    @property
    def render_notes(self) -> list[dict | None]:
        """Per worker, as it reported when its env was built: MUJOCO_GL, MUJOCO_EGL_DEVICE_ID and why it fell back
        from EGL to OSMesa (fallback_reason None if it did not). Envs that do not render with MuJoCo report whatever
        their process's environment holds."""
        return [worker.render for worker in self._workers]

    def _report_render_fallback(self, worker: _Worker) -> None:
        reason = (worker.render or {}).get("fallback_reason")
        if reason and not self._render_fallback_reported:
            self._render_fallback_reported = True  # one warning per pool, not one per worker
            logger.warning("env workers of this pool render with OSMesa instead of EGL (much slower): %s", reason)

    @staticmethod
    def _exit_description(worker: _Worker) -> str:
        worker.process.join(1.0)  # the connection closes a moment before the process is reaped
        code = worker.process.exitcode
        if code is None:
            return "closed its connection but is still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    # --- input checks -------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this EnvPool is closed")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_workers:
            raise ValueError(f"worker index {index} is out of range: the pool has workers 0..{self.num_workers - 1}")

    def _check_idle(self, index: int) -> None:
        """A valid worker index with no call in flight (a step_begin / reset_begin not yet collected)."""
        self._check_index(index)
        if self._workers[index].busy:
            raise RuntimeError(f"worker {index} has a call in flight: collect it first")

    def _check_reset_request(self, index: int, request: ResetRequest) -> None:
        if not isinstance(request.seed, (int, np.integer)) or request.seed < 0:
            raise ValueError(f"worker {index}: seed must be a non-negative integer, got {request.seed!r}")
        if not 0 <= request.task_id < self.info.num_tasks:
            raise ValueError(f"worker {index}: task_id {request.task_id} is out of range 0..{self.info.num_tasks - 1}")
        count = self.info.num_init_states[request.task_id]
        if not 0 <= request.init_state_id < count:
            raise ValueError(
                f"worker {index}: init_state_id {request.init_state_id} is out of range 0..{count - 1} "
                f"for task {request.task_id}"
            )

    @staticmethod
    def _check_actions(index: int, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float64)  # lossless for float32 input; envs compute in float64
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != ACTION_DIM:
            raise ValueError(
                f"worker {index}: actions must have shape [k, {ACTION_DIM}] with k >= 1, got {chunk.shape}"
            )
        if not np.all(np.isfinite(chunk)):
            raise ValueError(f"worker {index}: actions contain NaN or inf")
        return chunk
