"""One update of the tiny policy with an int8 (LLM.int8) language model and gradient checkpointing (reentrant, the
form an int8 model gets), under DDP on 2 processes or as one plain process; each rank writes its trainable weights
after the step. Launched by tests/test_distributed.py.

    python tests/dist_scripts/int8_ddp_check.py --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import GLOBAL_SAMPLES, fixed_samples, rank_slice, run_update, tiny_config, tiny_engine, write_json
from safetensors.torch import save_file

from trainer.dist import Dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dist = Dist.create(mixed_precision="no")
    config = tiny_config(quant__mode="int8", model__gradient_checkpointing=True, lora__target_modules="llm-linear")
    engine, _ = tiny_engine(config, dist)
    policy = engine.policy
    split = [GLOBAL_SAMPLES // dist.world_size] * dist.world_size
    samples = rank_slice(fixed_samples(policy), split, dist.rank)
    policy.train()
    metrics = run_update(config, engine, samples, 0).metrics
    trainable = {n: p.detach().clone().contiguous() for n, p in policy.named_parameters() if p.requires_grad}
    save_file(trainable, str(out / f"rank{dist.rank}.safetensors"))
    write_json(out / f"rank{dist.rank}.json", {
        "backend": dist.backend, "world_size": dist.world_size,
        "reentrant_checkpointing": policy.base_model.reentrant_checkpointing,
        "int8_layers": sum(type(m).__name__ == "Linear8bitLt" for m in policy.modules()),
        "grad_norm": metrics["train/grad_norm"], "loss": metrics["train/loss"]})


if __name__ == "__main__":
    main()
