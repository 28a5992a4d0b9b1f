"""The collectives of one training update on the tiny policy (LoRA on every linear layer, gradient recompute on, as
the 7B benchmark runs it), through the backend's engine as training sets it up. Launched by tests/test_update_comms.py
under torchrun (2 processes, gloo; the backend from TRAINER_ACCELERATE_CONFIG) or as one plain process.

    python tests/dist_scripts/update_collectives.py --out DIR [--micro-batch 2] [--source tiny-oft --act]

Every rank writes DIR/rank<r>.json: the collectives of the second update (the first warms up: DeepSpeed traces the
module order in it) by kind, the number of micro-batches, the loss, and the ZeRO-3 leaf modules; rank 0 writes
DIR/after.safetensors, the trainable weights after both updates (gathered), for comparisons between set-ups.
--act: then acts on fixed observations inside the engine's rollout weights, eagerly, through the compiled blocks
(VLAPolicy.compiled_acting, as rollout.compile_blocks does) and with LoRA merged, and reports each (tokens, log-probs,
graphs compiled, merged layers, whether the weights came back bit for bit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import count_collectives, fixed_observations, fixed_samples, rank_slice, run_update, tiny_config, tiny_engine, write_json
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from trainer.dist import Dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--no-recompute", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--compile-blocks", action="store_true", help="model.compile_blocks true")
    parser.add_argument("--source", default="tiny", help="model.source: tiny or tiny-oft")
    parser.add_argument("--act", action="store_true", help="act after the updates, eager and compiled")
    args = parser.parse_args()
    out = Path(args.out)
    config = tiny_config(algo__micro_batch_size=args.micro_batch, model__gradient_checkpointing=not args.no_recompute,
                         lora__include_lm_head=False, model__compile_blocks=args.compile_blocks,
                         model__source=args.source)
    dist = Dist.create(config.dist)
    engine, _ = tiny_engine(config, dist)
    everything = fixed_samples(engine.policy)
    per_rank = len(everything.inputs) // dist.world_size
    samples = rank_slice(everything, [per_rank] * dist.world_size, dist.rank)
    engine.policy.train()
    first = run_update(config, engine, samples, iteration=0)
    result = {}
    counts = count_collectives(lambda: result.update(update=run_update(config, engine, samples, iteration=1)))
    leaves = [type(m).__name__ for m in engine.policy.modules() if getattr(m, "_z3_leaf", False)]
    report = {"rank": dist.rank, "world_size": dist.world_size, "backend": dist.backend, "collectives": counts,
              "micro_batches": -(-per_rank // args.micro_batch),
              "metrics": [first.metrics, result["update"].metrics],
              "z3_leaf_modules": sorted(set(leaves)), "z3_leaf_module_count": len(leaves),
              "compiled_graphs": int(counters["stats"]["unique_graphs"])}
    if args.act:
        report["acting"] = act_eager_and_compiled(engine)
    state = engine.trainable_state()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / "after.safetensors"))
    write_json(out / f"rank{dist.rank}.json", report)
    dist.close()


def act_eager_and_compiled(engine) -> dict:
    """The same sampled act (fixed observations and noise) inside the engine's rollout weights: eager, through the
    compiled blocks (VLAPolicy.compiled_acting, as rollout.compile_blocks does), and with the LoRA adapters merged
    (rollout.merge_lora true) and compiled, as training rollouts run on a GPU. Also whether every weight is the same
    after as before (bit for bit)."""
    policy = engine.policy
    policy.eval()
    observations = fixed_observations(3)
    inputs = policy.prepare(observations)
    noise = policy.sampling_noise(len(observations), torch.Generator().manual_seed(5))
    before = full_weights(policy)
    with engine.rollout_weights():
        eager = policy.act(inputs, greedy=False, noise=noise, model=engine.model)
        graphs_before = int(counters["stats"]["unique_graphs"])
        with policy.compiled_acting() as used:
            compiled = policy.act(inputs, greedy=False, noise=noise, model=engine.model)
        graphs = int(counters["stats"]["unique_graphs"]) - graphs_before
    engine.merge_lora = True
    with engine.rollout_weights(), policy.compiled_acting():
        merged_layers = sum(isinstance(m, LoraLayer) and m.merged for m in policy.modules())
        merged = policy.act(inputs, greedy=False, noise=noise, model=engine.model)
    engine.merge_lora = False
    after = full_weights(policy)
    return {"used": bool(used), "graphs_compiled": graphs, "merged_layers": merged_layers,
            "eager_tokens": eager.token_ids.tolist(), "compiled_tokens": compiled.token_ids.tolist(),
            "merged_tokens": merged.token_ids.tolist(),
            "max_log_prob_diff": float((eager.log_probs - compiled.log_probs).abs().max()),
            "merged_max_log_prob_diff": float((eager.log_probs - merged.log_probs).abs().max()),
            "weights_unchanged": all(torch.equal(before[name], after[name]) for name in before)}


def full_weights(policy) -> dict[str, torch.Tensor]:
    """name -> a full copy of every parameter (a collective under FSDP2: every rank calls)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in policy.named_parameters()}


if __name__ == "__main__":
    main()
