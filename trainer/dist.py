"""Everything that knows about ranks: the Accelerator, global gathers, agreed decisions, balanced micro-batches.

The rest of the code calls these helpers and never torch.distributed directly, so the invariants of DESIGN.md hold in
one place: every rank makes the same collective calls, group statistics and guard decisions come from globally
reduced values, and only rank 0 writes logs.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    accelerator: object  # accelerate.Accelerator

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, mixed_precision: str = "no", timeout_minutes: float = 30.0) -> "Dist":
        """The Accelerator for however the run was launched (python, accelerate launch, torchrun, srun).

        On a host without GPUs, accelerate picks no backend for a multi-process launch and every rank believes it is
        rank 0; creating the process state with gloo first fixes that (PLATFORM_NOTES).
        """
        from accelerate import Accelerator, PartialState
        from accelerate.utils import InitProcessGroupKwargs

        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout_minutes))
        if _launched_distributed() and not torch.cuda.is_available():
            PartialState(backend="gloo", timeout=timeout.timeout)
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[timeout])
        return cls(accelerator)

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
    def backend(self) -> str:
        """"fsdp", "deepspeed_zero2", "deepspeed_zero3", "ddp" or "single"."""
        kind = str(self.accelerator.distributed_type).split(".")[-1]
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
        finite = math.isfinite(grad_norm)
        any_nonfinite = self.any(not finite)
        if any_nonfinite:
            return "nonfinite_grad_norm"
        largest = self.max(grad_norm)
        if largest > skip_factor * max_grad_norm:
            return "grad_norm_above_threshold"
        return None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()
