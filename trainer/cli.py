"""Command line: `python -m trainer {train,eval,export,bench,inspect,act}` (also installed as the `trainer` script).

`train` and `eval` read the run config (draccus: `--config FILE`, then `--section.key value`); the others take a few
flags of their own.

    python -m trainer train --config configs/tiny_toy_cpu.yaml --train.iterations 10
    python -m trainer eval --model.source /ckpts/openvla-7b-finetuned-libero-spatial --env.suite libero_spatial \\
        --eval.trials 50 --eval.output results.json
    python -m trainer eval --eval.run_dir runs/libero_spatial_grpo      # a run's config and latest checkpoint
    python -m trainer export --run-dir runs/libero_spatial_grpo --out merged/
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer import bench, train
from trainer.build import QuantMode, init_states_per_task, make_env_pool
from trainer.checkpoint import MissingCheckpointError, latest_checkpoint, load_weights, save_merged_model
from trainer.config import Choice, ConfigError, check, load
from trainer.dist import Dist, stop_watching_peers, wait_for_lost_peer
from trainer.envs.toy import ToyReachEnv
from trainer.evaluate import evaluate, protocol_items
from trainer.models import TINY_PRESETS, EnvSettings, VLAPolicy, build_model, load_model_and_tokenizer, manifest, preset
from trainer.models.config import VLAConfig

# --- train -------------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    train.train(train.load_config(rest))
    return 0


# --- eval --------------------------------------------------------------------------------------------------------


class EvalMode(Choice):
    GREEDY = "greedy"
    SAMPLED = "sampled"
    BOTH = "both"


@dataclass
class EvalOptions:
    """The `eval` command's own options; the model, env and sampling come from the run config's sections."""

    run_dir: str | None = None
    """A training run's output_dir: its config.yaml is read first (model, LoRA, env; the options given here override
    it) and its latest checkpoint is loaded."""
    trials: int = 50
    """Trials per task, on the task's initial states 0..N-1 (the LIBERO protocol: 50)."""
    mode: EvalMode = EvalMode.GREEDY
    """"greedy", "sampled" (at rollout.temperature) or "both"."""
    seed: int = 7
    """Seed of the env and sampling streams."""
    videos: int = 0
    """Record this many episodes (rank 0's first ones) as mp4."""
    videos_dir: str = "videos"
    """Where the videos go."""
    output: str | None = None
    """Write the results as JSON here."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, self.trials >= 1, "trials", self.trials, ">= 1")
        check(found, self.videos >= 0, "videos", self.videos, ">= 0")
        return found


@dataclass
class EvalConfig(train.RunConfig):
    """The `eval` command: the run config (model, LoRA, env, rollout.temperature) and the command's own options."""

    eval: EvalOptions = field(default_factory=EvalOptions)
    """Trials, mode, outputs, and the run directory to evaluate."""


# Without a run directory: a released checkpoint on the LIBERO protocol (no adapters), 4 env workers per rank.
EVAL_DEFAULTS = {"lora": {"enabled": False}, "env": {"suite": "libero_spatial", "num_workers": 4}}


def load_eval_config(args: list[str]) -> EvalConfig:
    run_dir = _option_value(args, "--eval.run_dir")
    if run_dir is not None and _option_value(args, "--config") is None:  # the run's config, then the overrides
        return load(EvalConfig, ["--config", str(Path(run_dir) / "config.yaml"), *args])
    return load(EvalConfig, args, defaults=EVAL_DEFAULTS)


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    """The LIBERO protocol on a checkpoint (or a tiny preset on the toy task)."""
    config = load_eval_config(rest)
    options = config.eval
    checkpoint = None
    if options.run_dir is not None:
        checkpoint = latest_checkpoint(options.run_dir)
        if checkpoint is None:
            raise MissingCheckpointError(f"no checkpoint in {options.run_dir}/checkpoints (no `latest` there): give "
                                         "--eval.run_dir a run's train.output_dir that has saved one")
    dist = Dist.create(config.dist)
    policy = train.build_run_policy(config, dist)
    if checkpoint is not None:
        load_weights(checkpoint, policy)
    with make_env_pool(config.env, dist) as pool:
        try:
            selected = init_states_per_task(config.env, pool)  # checks env.task_ids against the suite
        except ValueError as error:
            raise ConfigError(f"invalid eval options:\n  - {error}") from error
        items = protocol_items([t for t, n in enumerate(selected) if n], options.trials,
                               list(pool.info.num_init_states))
        results = {}
        for greedy in {EvalMode.GREEDY: [True], EvalMode.SAMPLED: [False], EvalMode.BOTH: [True, False]}[options.mode]:
            report = evaluate(policy, pool, items, dist, greedy=greedy, temperature=config.rollout.temperature,
                              seed=options.seed, use_l1_head=config.model.use_l1_head_for_eval,
                              video_dir=Path(options.videos_dir) if options.videos else None, videos=options.videos)
            if dist.is_main:
                print(report.table())
            results[report.mode] = report.to_json()
    if dist.is_main and options.output:
        Path(options.output).write_text(json.dumps({
            "model": config.model.source, "run_dir": options.run_dir,
            "checkpoint": str(checkpoint) if checkpoint is not None else None, "suite": str(config.env.suite),
            "trials_per_task": options.trials, "results": results}, indent=2))
        print(f"results written to {options.output}")
    dist.close()
    return 0


def _option_value(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# --- export ------------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """Merge a run's LoRA checkpoint into the base model and save it in the OpenVLA layout."""
    run_dir = Path(args.run_dir)
    config = train.load_config(["--config", str(run_dir / "config.yaml")])
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise MissingCheckpointError(f"no checkpoint in {run_dir}/checkpoints (no `latest` there): give --run-dir a "
                                     "run's train.output_dir that has saved one, or --checkpoint a checkpoint folder")
    config.quant.mode = QuantMode.NONE  # merging needs full-precision base weights
    policy = train.build_run_policy(config, Dist.create())
    load_weights(checkpoint, policy)
    out = save_merged_model(policy, Path(args.out))
    print(f"merged model of {checkpoint} written to {out}")
    return 0


# --- bench, inspect, act -------------------------------------------------------------------------------------------


def benchmark_objective():
    """The recipe's objective with the default algorithm options (GRPO's clipped loss at temperature 1): what the
    benchmark's update measures. Called as objective(policy, model, batch, counts)."""
    return functools.partial(train.objective, train.AlgoConfig(), temperature=1.0, bc_phase=False)


def benchmark_advantages():
    """The recipe's GRPO advantages with the default options, but every group kept (no dynamic sampling: a benchmark's
    update should see all its samples). Called as advantages(episodes, dist) -> (Samples, metrics)."""
    algo = train.AlgoConfig()
    algo.grpo.dynamic_sampling = False
    return functools.partial(train.episode_advantages, algo, bc_phase=False)


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.main(args, objective=benchmark_objective(), advantages=benchmark_advantages())


def cmd_inspect(args: argparse.Namespace) -> int:
    """Parameter names and shapes of a preset or checkpoint, built on the meta device (no weights allocated)."""
    config = preset(args.preset) if args.preset else VLAConfig.load(Path(args.checkpoint))
    data = manifest(build_model(config, on_meta=True))
    print(f"{args.preset or args.checkpoint}: {data['total_params']:,} parameters in {len(data['shapes'])} tensors")
    if args.manifest:
        Path(args.manifest).write_text(json.dumps(data, indent=1))
        print(f"manifest written to {args.manifest}")
    return 0


def cmd_act(args: argparse.Namespace) -> int:
    """Run a policy once on a sample observation of the toy task and print what it does."""
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
    origin = f"random init, seed {args.seed}" if args.model in TINY_PRESETS else f"loaded from {args.model}"
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, {origin})")
    print(f"instruction: {observation.instruction!r}")
    print(f"action tokens: {result.token_ids[0].tolist()}")
    print(f"log-probs: {result.log_probs[0].numpy()}")
    print(f"env actions (chunk of {policy.chunk_size}):\n{result.env_actions[0]}")
    print(f"greedy inference took {elapsed * 1000:.1f} ms on the CPU")
    env.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a config or checkpoint error too (before the command name)")
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

    train_cmd = sub.add_parser("train", help="RL fine-tuning; options: --config FILE and --section.key value overrides",
                               add_help=False)
    train_cmd.set_defaults(func=cmd_train, takes_rest=True)

    ev = sub.add_parser("eval", add_help=False,
                        help="LIBERO protocol evaluation (per-task table, JSON, videos); options: the run config's "
                             "--section.key value (e.g. --model.source, --env.suite, --env.task_ids) and --eval.* "
                             "(run_dir, trials, mode, seed, videos, videos_dir, output)")
    ev.set_defaults(func=cmd_eval, takes_rest=True)

    bench_cmd = sub.add_parser("bench", help="GPU throughput/memory of the full-size model vs a ceiling (random weights)")
    bench_cmd.add_argument("--parts", default="ceiling,rollout,update",
                           help="comma list of ceiling, rollout, update, lora_ceiling, phases (one GPU), levers (issue "
                                "13's speed levers end to end), decode (OpenVLA decoding: dynamic / static / CUDA "
                                "graphs)")
    bench_cmd.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    bench_cmd.add_argument("--update-batch", type=int, default=16, help="samples per GPU per update step")
    bench_cmd.add_argument("--steps", type=int, default=3)
    bench_cmd.add_argument("--int8", action="store_true", help="LLM.int8 base + 8-bit AdamW for the update part")
    bench_cmd.add_argument("--preset", default="openvla-7b", help="openvla-7b (full size) or tiny (a CPU smoke run)")
    bench_cmd.add_argument("--models", nargs="*", help="presets for the update / phases parts (default: --preset)")
    bench_cmd.add_argument("--lora-targets", nargs="*", default=["all-linear"], choices=["all-linear", "llm-linear"],
                           help="LoRA targets for the update / phases parts (each one measured)")
    bench_cmd.add_argument("--compile-blocks", action="store_true",
                           help="update / phases parts: model.compile_blocks (torch.compile'd blocks in the update); "
                                "rollout part: OFT also merged and acting through compiled blocks")
    bench_cmd.add_argument("--rollout-variants", nargs="*", default=["plain", "lora", "lora-merged"],
                           choices=["plain", "lora", "lora-merged"], help="rollout part: which variants to time")
    bench_cmd.add_argument("--no-recompute", action="store_true",
                           help="update / phases parts: no gradient recompute (the LoRA ceiling recomputes)")
    bench_cmd.add_argument("--profile-step", action="store_true",
                           help="update part: one more step under torch.profiler on every rank (GPU idle share, "
                                "kernel time by kind, collective calls)")
    bench_cmd.add_argument("--trace-dir", help="phases part: also write a chrome trace of the profiled step here")
    bench_cmd.add_argument("--label", help="update part: the set-up's name in the report (default: the backend), "
                                           "e.g. the accelerate config")
    bench_cmd.add_argument("--repeats", type=int, default=3, help="levers / decode parts: repeats, reported as a range")
    bench_cmd.add_argument("--levers", nargs="*", default=["baseline", "pipeline", "workers_preprocess", "merge_lora",
                                                           "no_recompute", "all"],
                           help="levers part: which configurations (trainer.bench.LEVER_CONFIGS)")
    bench_cmd.add_argument("--e2e-episodes", type=int, default=16, help="levers part: episodes per iteration")
    bench_cmd.add_argument("--e2e-workers", type=int, default=16, help="levers part: env workers")
    bench_cmd.add_argument("--e2e-max-steps", type=int, default=40, help="levers part: env steps per episode at most")
    bench_cmd.add_argument("--standin-step-seconds", type=float,
                           help="levers part: the stand-in's physics cost per action")
    bench_cmd.add_argument("--standin-render-seconds", type=float,
                           help="levers part: the stand-in's cost per observation")
    bench_cmd.add_argument("--out", default="bench/report.json", help="JSON report (merged with an existing one)")
    bench_cmd.set_defaults(func=cmd_bench, takes_rest=False)

    export = sub.add_parser("export", help="merge a run's LoRA into the base model (OpenVLA layout)")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export, takes_rest=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code = args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
    except ConfigError as error:  # a config or checkpoint problem is the user's to fix: the message, not a traceback
        if args.debug:
            traceback.print_exc()
        print(f"trainer {args.command}: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        wait_for_lost_peer()  # a multi-rank run whose peer died: name it (and exit) rather than a collective's error
        raise
    stop_watching_peers()  # done: the other ranks may take longer to finish without taking this one for lost
    sys.exit(code)
