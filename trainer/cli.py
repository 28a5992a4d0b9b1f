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


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from trainer.config import load_config
    from trainer.train import train

    train(load_config(rest))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge a run's LoRA checkpoint into the base model and save it in the OpenVLA layout."""
    from trainer.checkpoint import export_merged_model, latest_checkpoint
    from trainer.config import load_config

    run_dir = Path(args.run_dir)
    config = load_config(["--config", str(run_dir / "config.yaml")])
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    out = export_merged_model(checkpoint, config, Path(args.out))
    print(f"merged model of {checkpoint} written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="parameter manifest of a preset or checkpoint (meta device)")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=["openvla-7b", "openvla-7b-oft", "tiny", "tiny-oft"])
    source.add_argument("--checkpoint", help="a local checkpoint directory (its config.json is read)")
    inspect.add_argument("--manifest", help="write {total_params, shapes} JSON here")
    inspect.set_defaults(func=cmd_inspect, takes_rest=False)

    act = sub.add_parser("act", help="run the policy once on a toy observation")
    act.add_argument("--model", default="tiny", help="tiny, tiny-oft, or a local checkpoint directory")
    act.add_argument("--seed", type=int, default=0)
    act.set_defaults(func=cmd_act, takes_rest=False)

    train = sub.add_parser("train", help="RL fine-tuning; options: --config FILE and --section.key value overrides",
                           add_help=False)
    train.set_defaults(func=cmd_train, takes_rest=True)

    ev = sub.add_parser("eval", help="LIBERO protocol evaluation: N trials per task, per-task table, JSON, videos")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="tiny, tiny-oft, or a local checkpoint directory")
    source.add_argument("--run-dir", help="a training run's output_dir: its config and latest checkpoint")
    ev.add_argument("--family", choices=["openvla", "oft"], help="force OFT for released OFT checkpoints")
    ev.add_argument("--suite", help="default: the run's suite with --run-dir, else libero_spatial")
    ev.add_argument("--task-ids", type=int, nargs="*")
    ev.add_argument("--trials", type=int, default=50, help="trials per task (the protocol: 50)")
    ev.add_argument("--mode", choices=["greedy", "sampled", "both"], default="greedy")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--num-workers", type=int, default=4, help="env worker processes per rank")
    ev.add_argument("--max-steps", type=int, help="override the suite's step limit")
    ev.add_argument("--unnorm-key", help="norm_stats key (default: the suite, then <suite>_no_noops)")
    ev.add_argument("--l1-head", action="store_true", help="OFT: greedy actions from the L1 regression head")
    ev.add_argument("--seed", type=int, default=7)
    ev.add_argument("--videos", type=int, default=0, help="record this many episodes as mp4")
    ev.add_argument("--videos-dir", default="videos")
    ev.add_argument("--output", help="write the results as JSON here")
    ev.set_defaults(func=lambda args: __import__("trainer.evaluate", fromlist=["main"]).main(args), takes_rest=False)

    bench = sub.add_parser("bench", help="GPU throughput/memory of the full-size model vs a ceiling (random weights)")
    bench.add_argument("--parts", default="ceiling,rollout,update", help="comma list of ceiling, rollout, update, lora_ceiling, phases (one GPU), levers (issue 13's speed "
                            "levers end to end), decode (OpenVLA decoding: dynamic / static / CUDA graphs)")
    bench.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    bench.add_argument("--update-batch", type=int, default=16, help="samples per GPU per update step")
    bench.add_argument("--steps", type=int, default=3)
    bench.add_argument("--int8", action="store_true", help="LLM.int8 base + 8-bit AdamW for the update part")
    bench.add_argument("--preset", default="openvla-7b", help="openvla-7b (full size) or tiny (a CPU smoke run)")
    bench.add_argument("--models", nargs="*", help="presets for the update / phases parts (default: --preset)")
    bench.add_argument("--lora-targets", nargs="*", default=["all-linear"], choices=["all-linear", "llm-linear"],
                       help="LoRA targets for the update / phases parts (each one measured)")
    bench.add_argument("--trace-dir", help="phases part: also write a chrome trace of the profiled step here")
    bench.add_argument("--repeats", type=int, default=3, help="levers / decode parts: repeats, reported as a range")
    bench.add_argument("--levers", nargs="*", default=["baseline", "pipeline", "workers_preprocess", "merge_lora",
                                                       "no_recompute", "all"],
                       help="levers part: which configurations (trainer.bench.LEVER_CONFIGS)")
    bench.add_argument("--e2e-episodes", type=int, default=16, help="levers part: episodes per iteration")
    bench.add_argument("--e2e-workers", type=int, default=16, help="levers part: env workers")
    bench.add_argument("--e2e-max-steps", type=int, default=40, help="levers part: env steps per episode at most")
    bench.add_argument("--standin-step-seconds", type=float, help="levers part: the stand-in's physics cost per action")
    bench.add_argument("--standin-render-seconds", type=float, help="levers part: the stand-in's cost per observation")
    bench.add_argument("--out", default="bench/report.json", help="JSON report (merged with an existing one)")
    bench.set_defaults(func=lambda args: __import__("trainer.bench", fromlist=["main"]).main(args), takes_rest=False)

    export = sub.add_parser("export", help="merge a run's LoRA into the base model (OpenVLA layout)")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export, takes_rest=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    from trainer.config import ConfigError

    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code = args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
    except ConfigError as error:  # a config problem is the user's to fix: the message, not a traceback
        print(f"trainer {args.command}: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
