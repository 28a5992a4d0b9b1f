"""GPU check and benchmark of standard OpenVLA's decoding paths in one run (CUDA graphs are GPU-only, so the CPU
tests cover them only uncaptured). Usage, from the repository root on a GPU host:

    PYTHONPATH=. python3 scripts/check_gpu_paths.py OUT_DIR [--batches 16 64] [--repeats 3]

1. tiny model, fp32 and bf16 + LoRA: CUDA graph replays vs the eager static steps vs transformers' dynamic cache, on
   batches that are padded up to a bucket (3 -> 4) and reuse the buffers; fp32 must agree exactly (tokens) and to
   1e-5 (log-probs); plus a whole rollout on the toy task, graphs vs dynamic, the same episodes;
2. full-size random OpenVLA-7B in bf16 with LoRA r=32 on all linear layers (trainer.bench.measure_decode): timings
   of dynamic / static / graphs, unmerged and merged, at each batch against the plain-transformers decode ceiling
   of the same run and the FLOP bound, with the agreement of the paths on the same noise.

Writes OUT_DIR/decode.json (and decode.md); prints a table last; exits 1 if a check failed (after writing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch


def tiny_checks(device: torch.device) -> dict:
    """On a CPU (the script's own test) the 'graph' decoder is a second eager one: the same code, nothing captured."""
    import numpy as np

    from trainer.envs.base import Observation
    from trainer.envs.inline import InlinePool
    from trainer.envs.sharding import build_work_items
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
    from trainer.models.lora import LoraSettings, apply_lora
    from trainer.rollout import collect_episodes

    out = {}
    rng = np.random.default_rng(0)
    texts = ["move to the red target", "go to the blue one, now please", "x", "move to the green target"]
    observations = [Observation(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                rng.uniform(-1, 1, 8).astype(np.float32), text) for text in texts]
    for dtype, lora in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        model, tokenizer = load_model_and_tokenizer("tiny", seed=0, dtype=dtype)
        if lora:
            model = apply_lora(model, LoraSettings(rank=4, include_lm_head=True))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
        policy = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).to(device).eval()
        eager, graphs = policy.static_decoder(4), policy.static_decoder(4, graphs=device.type == "cuda")
        token_mismatch, log_prob_difference, dynamic_mismatch, tokens = 0, 0.0, 0, 0
        for rows in (3, 1, 4, 2, 3):
            inputs = policy.prepare(observations[:rows])
            noise = policy.sampling_noise(rows, torch.Generator().manual_seed(rows))
            for greedy in (False, torch.arange(rows) % 2 == 0):
                a = policy.act(inputs, greedy=greedy, noise=noise, temperature=1.5, decoder=eager)
                b = policy.act(inputs, greedy=greedy, noise=noise, temperature=1.5, decoder=graphs)
                c = policy.act(inputs, greedy=greedy, noise=noise, temperature=1.5)
                tokens += a.token_ids.numel()
                token_mismatch += int((a.token_ids != b.token_ids).sum())
                dynamic_mismatch += int((c.token_ids != b.token_ids).sum())
                log_prob_difference = max(log_prob_difference, float((a.log_probs - b.log_probs).abs().max()))
        name = f"tiny_{str(dtype).split('.')[-1]}{'_lora' if lora else ''}"
        if dtype == torch.float32:  # fp32: exactly the eager step's and the dynamic cache's tokens
            ok = token_mismatch == 0 and dynamic_mismatch == 0 and log_prob_difference < 1e-5
        else:  # bf16: the same kernels replayed; allow a rare rounding near-tie
            ok = token_mismatch <= 0.01 * tokens
        out[name] = {"tokens": tokens, "graph_vs_eager_token_mismatches": token_mismatch,
                     "graph_vs_dynamic_token_mismatches": dynamic_mismatch,
                     "graph_vs_eager_max_abs_log_prob_difference": log_prob_difference,
                     "graphs_captured": sorted(graphs._graphs), "ok": ok}
        out[name]["capture_error"] = graphs.capture_error
        out[name]["ok"] = ok and graphs.capture_error is None
        assert device.type != "cuda" or graphs.capture_error or sorted(graphs._graphs) == [1, 2, 4], \
            "one graph per bucket used"
    # a whole rollout: graphs (with the pipelined loop's half batches) vs the dynamic cache
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    policy = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).to(device).eval()
    items = build_work_items([(0, 1), (1, 2), (2, 3)], samples_per_group=2)
    fast = "graphs" if device.type == "cuda" else "static"
    runs = [collect_episodes(policy, InlinePool("toy", 4, {"max_steps": 10}), items, run_seed=3, temperature=1.3,
                             decode=decode)[0] for decode in ("dynamic", fast)]
    same = all(torch.equal(torch.stack(a.token_ids), torch.stack(b.token_ids)) and a.length == b.length
               for a, b in zip(*runs))
    out["tiny_rollout_graphs_vs_dynamic"] = {"same_episodes": same, "ok": same}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="openvla-7b", help="the full-size model (tiny: the CPU test of this script)")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU without capturing (tests this script)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("check_gpu_paths.py needs a CUDA GPU (or --cpu, which captures nothing)", file=sys.stderr)
        return 2
    from trainer import bench

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    device_name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    report = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    failures = []
    # A failure is recorded with its traceback and the run goes on: one GPU call should bring back everything.
    if not args.skip_tiny:
        start = time.perf_counter()
        try:
            report["tiny_checks"] = tiny_checks(device)
            failures += [name for name, check in report["tiny_checks"].items() if not check["ok"]]
        except Exception:  # noqa: BLE001
            report["tiny_checks_error"] = traceback.format_exc()
            failures.append("tiny checks raised (tiny_checks_error)")
            print(report["tiny_checks_error"], file=sys.stderr)
        print(f"tiny checks ({time.perf_counter() - start:.0f} s):", json.dumps(report.get("tiny_checks"), indent=1))
    start = time.perf_counter()

    latest = {"variants": {}, "agreement": {}}

    def save(decode: dict) -> None:  # what is measured so far, in case the run is cut short
        latest.update(decode)
        (out_dir / "decode.json").write_text(json.dumps({**report, "decode": decode}, indent=1, default=str))

    save(latest)
    try:
        report["decode"] = bench.measure_decode(device, batches=tuple(args.batches), preset=args.preset,
                                                repeats=args.repeats, progress=save)
    except Exception:  # noqa: BLE001
        report["decode_error"] = traceback.format_exc()
        failures.append("the decode benchmark raised (decode_error)")
        print(report["decode_error"], file=sys.stderr)
        report["decode"] = latest
    report["decode_seconds"] = time.perf_counter() - start
    for name, agreement in report["decode"]["agreement"].items():
        # graphs replay the eager static step's kernels; the dynamic cache attends over fewer (unmasked) keys; in
        # bf16 a rare near-tie may round either way
        required = 0.99 if "graphs" in name else 0.98
        if agreement["token_agreement"] < required:
            failures.append(f"full-size {name}: token agreement {agreement['token_agreement']:.4f} < {required}")
    for variant, rows in report["decode"]["variants"].items():
        for batch, row in rows.items():
            if row["fallbacks"]:
                failures.append(f"{variant} b{batch}: {row['fallbacks']} calls fell back to the dynamic cache")
            if row.get("capture_error"):
                failures.append(f"{variant} b{batch}: capture failed, steps ran eagerly: {row['capture_error']}")
    failures += [f"{variant}: raised (decode.errors)" for variant in report["decode"].get("errors", {})]
    report["speed_ratios"] = bench.speed_ratios(report)
    report["failures"] = failures
    (out_dir / "decode.json").write_text(json.dumps(report, indent=1, default=str))
    table = bench.markdown({"device": report["device"], "date": report["date"], "decode": report["decode"],
                            "speed_ratios": report["speed_ratios"]}) if report["decode"]["variants"] else ""
    (out_dir / "decode.md").write_text(table)
    print(table)
    print("FAILED: " + "; ".join(failures) if failures else "all decoding checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
