"""Everything that knows about ranks: the Accelerator for however the run was launched, rank information,
collectives, decisions every rank takes identically, and the watch on peer ranks.

The rest of the code calls these helpers and never torch.distributed directly, so the invariants of DESIGN.md hold in
one place: every rank makes the same collective calls, group statistics and guard decisions come from globally
reduced values, and only rank 0 writes logs. What a backend does with the model and optimizer (wrapping, backward,
the step, gathered weights, full state for checkpoints) is its engine's business (engine.py).

Backends (chosen by the launcher, reported by `Dist.backend`):

    single            python -m trainer ...                       one process
    ddp               accelerate launch (multi_gpu / cpu_2proc) or plain torchrun
    fsdp              FSDP2 through accelerate's plugin (fsdp_version: 2, one shard unit per transformer / ViT block)
    deepspeed_zero2   DeepSpeed ZeRO-2 (optimizer state and gradients partitioned)
    deepspeed_zero3   DeepSpeed ZeRO-3 (parameters partitioned too)

Processes started by torchrun or srun (not by `accelerate launch`) pick a backend with
TRAINER_ACCELERATE_CONFIG=accelerate_configs/<file>.yaml: the file's backend settings are put into the environment
exactly where `accelerate launch --config_file <file>` would put them (values already set win).

A rank that dies (a crash, an OOM kill, a lost node) would leave the others waiting inside their next collective
until the collective timeout, with an error that names no rank. So every rank of a multi-process run sends a heartbeat
through the launcher's key-value store from a daemon thread (no collective, nothing on the training path); when a
peer's heartbeat stops for `dist.peer_timeout_s`, the others print which rank (and host) was lost and exit.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from trainer.config import Choice, check

ACCELERATE_CONFIG_ENV = "TRAINER_ACCELERATE_CONFIG"
PEER_LOST_EXIT_CODE = 3  # the exit status of a rank that stopped because a peer was lost


class BackendName(Choice):
    AUTO = "auto"
    SINGLE = "single"
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED_ZERO2 = "deepspeed_zero2"
    DEEPSPEED_ZERO3 = "deepspeed_zero3"


@dataclass
class DistConfig:
    """How the ranks of a multi-process run wait for each other (the launcher decides how many there are)."""

    timeout_minutes: float = 30.0
    """How long one collective (all-reduce, gather, barrier) waits for the slowest rank before the run fails with an
    error naming the collective. Long enough for the largest wait of a healthy run: ranks finishing unequal shares of
    a rollout or an evaluation, rank 0 writing a checkpoint. A rank that has died is caught by `peer_timeout_s`
    instead, much sooner; this bounds hangs of live ranks (a deadlocked process, a stuck GPU)."""
    peer_timeout_s: float = 60.0
    """A rank whose heartbeat (sent every few seconds from a daemon thread, through the launcher's store) stops for
    this long is declared lost: every other rank prints which rank and host it was and exits with status 3, instead
    of waiting in a collective until `timeout_minutes`. 0 switches the heartbeat off."""
    backend: BackendName = BackendName.AUTO
    """The backend the launch will set up, when known in advance ("fsdp", "deepspeed_zero3", ...), so that options it
    cannot take (an int8 base under FSDP / ZeRO-3) are refused when the config is read rather than after the model
    is built. "auto": checked once the launcher's backend is known. The launcher (accelerate config) decides the
    backend in every case."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, self.timeout_minutes > 0, "timeout_minutes", self.timeout_minutes, "> 0")
        check(found, self.peer_timeout_s >= 0, "peer_timeout_s", self.peer_timeout_s, ">= 0 (0 = no heartbeat)")
        return found
# accelerate config keys that describe the launch (processes, machines, rendezvous): torchrun / srun own those.
_LAUNCH_ONLY_KEYS = {
    "compute_environment", "debug", "distributed_type", "downcast_bf16", "machine_rank", "main_training_function",
    "num_machines", "num_processes", "rdzv_backend", "same_network", "tpu_env", "tpu_use_cluster", "tpu_use_sudo",
    "use_cpu", "gpu_ids", "main_process_ip", "main_process_port", "enable_cpu_affinity", "dynamo_config",
}
_DEEPSPEED_ENV = {
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
}


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _requested(kind: str) -> bool:
    """Whether the launcher asked for FSDP or DEEPSPEED (accelerate launch's environment, or our YAML translation)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate only turns FSDP on for accelerator devices; on a CPU host (tests, CI) its state says MULTI_CPU.
    FSDP2 itself runs on CPU with gloo, so the state is switched to FSDP with the plugin built from the environment."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does


def _env_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def accelerate_config_env(path) -> dict[str, str]:
    """The backend part of the environment that `accelerate launch --config_file PATH` gives its processes.

    Only the backend (FSDP / DeepSpeed settings, mixed precision) is translated; the launch topology (process count,
    machine rank, rendezvous) is left to torchrun or srun. A relative `deepspeed_config_file` is resolved against the
    working directory, then against the folder above the YAML's (the repository root for accelerate_configs/).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{ACCELERATE_CONFIG_ENV}={path}: no such accelerate config file")
    settings = yaml.safe_load(path.read_text()) or {}
    kind = str(settings.get("distributed_type", "NO")).upper()
    env: dict[str, str] = {}
    if settings.get("mixed_precision") is not None:
        env["ACCELERATE_MIXED_PRECISION"] = _env_value(settings["mixed_precision"])
    if kind == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
        for key, value in (settings.get("fsdp_config") or {}).items():
            name = key.upper() if key.startswith("fsdp_") else f"FSDP_{key.upper()}"
            env[name.replace("TRANSFORMER_LAYER_CLS_TO_WRAP", "TRANSFORMER_CLS_TO_WRAP")] = _env_value(value)
    elif kind == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        for key, value in (settings.get("deepspeed_config") or {}).items():
            if key == "deepspeed_multinode_launcher":
                continue
            if key not in _DEEPSPEED_ENV:
                raise ValueError(f"{path}: deepspeed_config.{key} is not supported for torchrun / srun launches; "
                                 f"put it in the DeepSpeed JSON or launch with accelerate launch --config_file {path}")
            if key == "deepspeed_config_file":
                value = _resolve_next_to(Path(value), path)
            env[_DEEPSPEED_ENV[key]] = _env_value(value)
    elif kind not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        raise ValueError(f"{path}: distributed_type {kind} is not one of NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED")
    unknown = set(settings) - _LAUNCH_ONLY_KEYS - {"mixed_precision", "fsdp_config", "deepspeed_config"}
    if unknown:
        raise ValueError(f"{path}: keys {sorted(unknown)} are not translated for torchrun / srun launches")
    return env


def _resolve_next_to(value: Path, config_path: Path) -> str:
    if value.is_absolute() or value.exists():
        return str(value)
    candidate = config_path.resolve().parent.parent / value
    return str(candidate if candidate.exists() else value)



# --- the ranks of a run ------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Rank information, collectives and agreed decisions of a run (one process or many)."""

    accelerator: Accelerator

    @classmethod
    def create(cls, settings: DistConfig | None = None, mixed_precision: str | None = None) -> Dist:
        """The Accelerator for however the run was launched (python, accelerate launch, torchrun, srun).

        mixed_precision None takes the launcher's choice (the YAML's `mixed_precision`), else "no".
        On a host without GPUs (tests, CI) accelerate picks no backend for a multi-process launch, so every rank
        believes it is rank 0, and it never turns FSDP on (PLATFORM_NOTES): the process state is created with gloo
        first and FSDP is switched on explicitly. A requested backend that accelerate did not set up is an error,
        never a silent fall-back to unsharded training.
        """
        settings = settings or DistConfig()
        config_file = os.environ.get(ACCELERATE_CONFIG_ENV)
        if config_file:
            for key, value in accelerate_config_env(config_file).items():
                os.environ.setdefault(key, value)
        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=settings.timeout_minutes))
        cpu_host = not torch.cuda.is_available()
        if _launched_distributed() and cpu_host:
            # DeepSpeed: naming the backend lets accelerate initialise deepspeed.comm on gloo. Others: cpu=True makes
            # it MULTI_CPU (DDP on gloo); without it accelerate says NO and prepare() would not even wrap DDP.
            PartialState(cpu=not _requested("DEEPSPEED"), backend="gloo", timeout=timeout.timeout)
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[timeout])
        if cpu_host and _requested("FSDP") and _launched_distributed():
            _fsdp_on_cpu(accelerator)
        dist = cls(accelerator)
        dist._check_requested_backend()
        global _watchdog
        if dist.world_size > 1 and settings.peer_timeout_s > 0 and _watchdog is None:  # one per process
            _watchdog = PeerWatchdog.start_for(dist.rank, dist.world_size, settings.peer_timeout_s,
                                               settings.timeout_minutes)
        return dist

    def _check_requested_backend(self) -> None:
        requested = "FSDP" if _requested("FSDP") else "DEEPSPEED" if _requested("DEEPSPEED") else None
        kind = self._distributed_type
        if requested is not None and self.world_size > 1 and kind != requested:
            raise RuntimeError(
                f"the launch asked for {requested} but accelerate set up {kind} on {self.world_size} processes: "
                "training would silently run without sharding. Launch with accelerate launch --config_file "
                f"accelerate_configs/... or torchrun with {ACCELERATE_CONFIG_ENV} set, and check the backend's "
                "packages (deepspeed) are installed.")
        if kind == "FSDP" and int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)) != 2:
            raise ValueError("only FSDP2 is supported: set fsdp_version: 2 in the accelerate config "
                             "(accelerate_configs/fsdp_1node.yaml)")

    def close(self) -> None:
        """This rank is done: its peers stop watching its heartbeat (call at the end of a command)."""
        stop_watching_peers()

    # --- who am I -------------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def _distributed_type(self) -> str:
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def backend(self) -> str:
        """"fsdp", "deepspeed_zero2", "deepspeed_zero3", "ddp" or "single"."""
        kind = self._distributed_type
        if kind == "FSDP":
            return "fsdp"
        if kind == "DEEPSPEED":
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            return f"deepspeed_zero{stage}"
        if kind.startswith("MULTI") or self.world_size > 1:
            return "ddp"
        return "single"

    # --- collectives ------------------------------------------------------------------------------------------------

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self.device)
        torch_dist.all_reduce(tensor, op=op)
        return tensor

    def sum(self, value: float) -> float:
        return float(self._reduce(torch.tensor([float(value)], dtype=torch.float64), torch_dist.ReduceOp.SUM))

    def max(self, value: float) -> float:
        return float(self._reduce(torch.tensor([float(value)], dtype=torch.float64), torch_dist.ReduceOp.MAX))

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0.0

    def gather_objects(self, items: list) -> list:
        """Concatenation of every rank's list, in rank order (small metadata only: ids, rewards, counts)."""
        if self.world_size == 1:
            return list(items)
        gathered: list = [None] * self.world_size
        torch_dist.all_gather_object(gathered, list(items))
        return [x for part in gathered for x in part]

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Element-wise sums over ranks of a dict with the same keys on every rank (sorted for a fixed order)."""
        if self.world_size == 1:
            return dict(metrics)
        keys = sorted(metrics)
        values = self._reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64),
                              torch_dist.ReduceOp.SUM)
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # --- agreed decisions -------------------------------------------------------------------------------------------

    def agreed_micro_batches(self, local_samples: int, micro_batch_size: int) -> int:
        """Micro-batches every rank runs: the most any rank needs. Ranks with fewer samples pad with zero-weight
        micro-batches, so all ranks make the same number of forward/backward (and collective) calls."""
        return int(self.max(math.ceil(local_samples / micro_batch_size)))

    def skip_decision(self, grad_norm: float, max_grad_norm: float, skip_factor: float) -> str | None:
        """The reason to skip this optimizer step, identical on every rank, or None to take it.

        Decided from globally reduced values: any rank seeing a non-finite norm, or the largest norm over ranks
        above skip_factor × max_grad_norm, skips the step everywhere.
        """
        if self.any(not math.isfinite(grad_norm)):
            return "nonfinite_grad_norm"
        if self.max(grad_norm) > skip_factor * max_grad_norm:
            return "grad_norm_above_threshold"
        return None


# --- the watch on peer ranks ---------------------------------------------------------------------------------------

_watchdog: PeerWatchdog | None = None  # this process's, while a multi-rank Dist is open


def stop_watching_peers() -> None:
    """This process is done with its run: tell the peers (they stop watching it) and end the watch."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.finish()
        _watchdog = None


def wait_for_lost_peer() -> None:
    """For a command that failed in a multi-rank run: if a peer rank was lost, the watch names it and ends the process
    (within dist.peer_timeout_s); otherwise this returns and the command's own error is raised. One process: nothing
    to wait for."""
    if _watchdog is not None:
        _watchdog.wait_for_verdict()


def _default_store_address() -> tuple[str, int] | None:
    """Host and port of the TCP store the process group was set up with (torchrun's / accelerate's rendezvous)."""
    try:
        store = torch_dist.distributed_c10d._get_default_store()  # no public accessor; present since torch 1.x
    except (RuntimeError, ValueError, AttributeError):
        return None
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    if isinstance(store, torch_dist.TCPStore):
        return store.host, store.port
    return None


class PeerWatchdog:
    """Heartbeats of every rank through the launcher's TCP store, watched from a daemon thread.

    Each rank writes an increasing counter under its own key every `interval_s` and reads everyone's counters in one
    request. A peer whose counter has not moved for `timeout_s` (by this rank's clock: counters, not timestamps, so
    node clocks need not agree) is reported by rank and host, and this process exits with PEER_LOST_EXIT_CODE: the
    main thread may be blocked inside a collective that would otherwise wait until the collective timeout. A rank
    that finishes normally writes "done" and is not watched any more. Losing the store itself means the node that
    hosts it (rank 0's, where the launcher runs the store) is gone, and is reported as such.

    It uses a connection of its own to the store, so that a main thread blocked in a store request (NCCL's set-up
    waiting for a dead rank) cannot hold it up.
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, address: str,
                 collective_timeout_minutes: float):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.collective_timeout_minutes = collective_timeout_minutes
        self.interval_s = max(0.5, min(5.0, timeout_s / 6))
        self.address = address
        self.prefix = f"trainer/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._beats = 0
        self._thread = threading.Thread(target=self._run, name="trainer-peer-watchdog", daemon=True)

    @classmethod
    def start_for(cls, rank: int, world_size: int, timeout_s: float, collective_timeout_minutes: float):
        address = _default_store_address()
        if address is None:
            print("trainer: the process group has no TCP store; peer heartbeats are off (a lost rank shows as a "
                  "collective timeout)", file=sys.stderr)
            return None
        host, port = address
        store = torch_dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(30.0, timeout_s)))
        watchdog = cls(store, rank, world_size, timeout_s, f"{host}:{port}", collective_timeout_minutes)
        node = os.environ.get("GROUP_RANK", "?")
        store.set(f"{watchdog.prefix}host/{rank}", f"host {socket.gethostname()}, node {node}")
        watchdog._beat()
        watchdog._thread.start()
        return watchdog

    def _key(self, rank: int) -> str:
        return f"{self.prefix}beat/{rank}"

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(self._key(self.rank), str(self._beats))

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 5)
        with contextlib.suppress(Exception):  # the store's host may have finished already: nobody left to tell
            self.store.set(self._key(self.rank), "done")

    def wait_for_verdict(self) -> None:
        """Called when the main thread failed in a multi-rank run: give the watch time to name a lost peer (it then
        ends the process itself); returns if none is lost, so that the original error is raised."""
        if self._thread.is_alive():
            self._lost.wait(self.timeout_s + 3 * self.interval_s)

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        keys = [self._key(r) for r in peers]
        last = {r: (None, time.monotonic()) for r in peers}
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                if self.store.check(keys):
                    values = self.store.multi_get(keys)
                else:  # starting up: a rank that has not sent its first heartbeat yet has no key to read
                    values = [self.store.get(key) if self.store.check([key]) else b"" for key in keys]
            except Exception as error:  # noqa: BLE001 -- any failure to reach the store
                if not self._stop.is_set():
                    self._report(f"the launch's key-value store at {self.address} (run by the launcher on rank 0's "
                                 f"node) cannot be reached ({error}): the node of rank 0 is down or unreachable")
                return
            now = time.monotonic()
            lost = []
            for rank, value in zip(peers, values):
                if value == b"done":
                    continue
                if value != last[rank][0]:
                    last[rank] = (value, now)
                elif now - last[rank][1] > self.timeout_s:
                    lost.append(rank)
            if lost:
                self._report(self._describe(lost, now - min(last[r][1] for r in lost)))
                return

    def _describe(self, lost: list[int], silent_s: float) -> str:
        where = []
        for rank in lost:
            try:
                where.append(f"rank {rank} ({self.store.get(f'{self.prefix}host/{rank}').decode()})")
            except Exception:  # noqa: BLE001
                where.append(f"rank {rank}")
        return (f"{', '.join(where)} sent no heartbeat for {silent_s:.0f} s (dist.peer_timeout_s = "
                f"{self.timeout_s:g}): its process died or its node is unreachable")

    def _report(self, reason: str) -> None:
        self._lost.set()
        print(f"trainer: rank {self.rank} stops: {reason}. Not waiting in a collective until the "
              f"{self.collective_timeout_minutes:g}-minute timeout (dist.timeout_minutes); start the run again to "
              "resume from its last checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PEER_LOST_EXIT_CODE)


__all__ = [
    "ACCELERATE_CONFIG_ENV",
    "PEER_LOST_EXIT_CODE",
    "BackendName",
    "Dist",
    "DistConfig",
    "PeerWatchdog",
    "accelerate_config_env",
    "stop_watching_peers",
    "wait_for_lost_peer",
]
