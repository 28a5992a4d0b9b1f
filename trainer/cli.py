"""Command line: `python -m trainer {train,eval,bench,inspect,act}` (also installed as the `trainer` script)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_inspect(args: argparse.Namespace) -> int:
    """Parameter names and shapes of a preset or checkpoint, built on the meta device (no weights allocated)."""
    from trainer.models import build_model, manifest, preset
    from trainer.models.config import VLAConfig

    config = preset(args.preset) if args.preset else VLAConfig.load(Path(args.checkpoint))
    data = manifest(build_model(config, on_meta=True))
    print(f"{args.preset or args.checkpoint}: {data['total_params']:,} parameters in {len(data['shapes'])} tensors")
    if args.manifest:
        Path(args.manifest).write_text(json.dumps(data, indent=1))
        print(f"manifest written to {args.manifest}")
    return 0


def cmd_act(args: argparse.Namespace) -> int:
    """Run a policy once on a sample observation of the toy task and print what it does."""
    import time

    import numpy as np

    from trainer.envs.toy import ToyReachEnv
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer

    env = ToyReachEnv()
    observation = env.reset(task_id=0, init_state_id=0, seed=args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, seed=args.seed)
    policy = VLAPolicy(model, tokenizer, EnvSettings(image_pipeline="none", binarize_gripper=False, unnorm_key="toy"))
    policy.eval()
    inputs = policy.prepare([observation])
    start = time.perf_counter()
    result = policy.act(inputs, greedy=True)
    elapsed = time.perf_counter() - start
    np.set_printoptions(precision=3, suppress=True)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, random init, seed {args.seed})")
    print(f"instruction: {observation.instruction!r}")
    print(f"action tokens: {result.token_ids[0].tolist()}")
    print(f"log-probs: {result.log_probs[0].numpy()}")
    print(f"env actions (chunk of {policy.chunk_size}):\n{result.env_actions[0]}")
    print(f"greedy inference took {elapsed * 1000:.1f} ms on the CPU")
    env.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="parameter manifest of a preset or checkpoint (meta device)")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=["openvla-7b", "openvla-7b-oft", "tiny", "tiny-oft"])
    source.add_argument("--checkpoint", help="a local checkpoint directory (its config.json is read)")
    inspect.add_argument("--manifest", help="write {total_params, shapes} JSON here")
    inspect.set_defaults(func=cmd_inspect)

    act = sub.add_parser("act", help="run the policy once on a toy observation")
    act.add_argument("--model", default="tiny", help="tiny, tiny-oft, or a local checkpoint directory")
    act.add_argument("--seed", type=int, default=0)
    act.set_defaults(func=cmd_act)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
