"""`python -m trainer bench`: throughput and memory of the full-size model against a ceiling measured in the same run.

Random weights (no checkpoint needed). Parts, each optional:
  ceiling  plain transformers Llama of OpenVLA's shape: prefill at the OpenVLA and OFT sequence lengths, greedy
           7-token decoding with a KV cache, LoRA r=32 forward+backward with gradient checkpointing; plus the two
           timm vision towers. "LM+vision" ceilings add the towers' time to the LM's.
  rollout  the policy API (`VLAPolicy.act`, the function rollouts, evaluation and this benchmark share) for
           OpenVLA (7 tokens, KV cache) and OpenVLA-OFT (one forward per 8-action chunk) at batch 1 / 16 / 64.
  update   the training update (`Learner.update` with the recipe's objective: PPO loss, backward, guard, optimizer
           step) with LoRA r=32 on all linear layers and gradient checkpointing, on synthetic samples, under whatever
           backend `accelerate launch` gives it (single GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3; `--int8` for LLM.int8),
           built and set up exactly as training does (build.py, engine.setup_engine).

The objective is the recipe's (train.objective); this library module does not import the recipe, so the command line
passes it in: `objective(policy, model, batch, counts) -> (loss, diagnostics)`.
Writes JSON (and a markdown table) to --out.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.build import Dtype, EnvConfig, ModelConfig, QuantConfig, QuantMode, Suite, build_optimizer, build_policy
from trainer.dist import Dist
from trainer.engine import Engine, OptimConfig, setup_engine
from trainer.envs.base import Observation
from trainer.learner import Counts, Learner, Samples, collate
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.config import preset as preset_config
from trainer.models.lora import LoraSettings, apply_lora

SEQ_OPENVLA = 256 + 1 + 20 + 7  # patches + BOS + prompt + action tokens
SEQ_OFT = 1 + 512 + 1 + 20 + 56 + 1  # BOS + 2 views of patches + proprio + prompt + action slots + stop


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int = 1, iters: int = 3) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - start) / iters


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- ceiling ---------------------------------------------------------------------------------------------------------


def measure_ceiling(device, batches=(1, 16, 64), train_batches=(8, 16), preset_name: str = "openvla-7b") -> dict:
    """Plain transformers / timm models of the preset's shapes (no project code in the timed paths)."""
    vla_config = preset_config(preset_name)
    out: dict = {}
    config = LlamaConfig(**{k: v for k, v in vla_config.text_config.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    vocab = vla_config.base_vocab_size
    with torch.device(device):
        lm = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, seq in (("prefill_openvla", SEQ_OPENVLA), ("prefill_oft", SEQ_OFT)):
            out[name] = {}
            for batch in batches:
                ids = torch.randint(0, vocab, (batch, seq), device=device)
                seconds = timed(lambda: lm(input_ids=ids, use_cache=False, logits_to_keep=56))
                out[name][batch] = {"seconds": seconds, "samples_per_s": batch / seconds}
        out["decode7"] = {}
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, SEQ_OPENVLA - 7), device=device)

            def decode():
                o = lm(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache, token = o.past_key_values, o.logits[:, -1:].argmax(-1)
                for _ in range(6):
                    o = lm(input_ids=token, past_key_values=cache, use_cache=True)
                    cache, token = o.past_key_values, o.logits[:, -1:].argmax(-1)

            seconds = timed(decode)
            out["decode7"][batch] = {"seconds": seconds, "actions_per_s": batch / seconds}
    towers = [timm.create_model(m, pretrained=False, num_classes=0, **{"img_size": vla_config.image_size, **kw})
              .to(device, torch.bfloat16).eval()
              for m, kw in zip(vla_config.timm_model_ids, vla_config.trainer.timm_model_kwargs)]
    size = vla_config.image_size
    out["vision"] = {}
    with torch.no_grad():
        for batch in batches:
            images = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
            seconds = timed(lambda: [t.forward_features(images) for t in towers])
            out["vision"][batch] = {"seconds": seconds, "images_per_s": batch / seconds}
    del towers
    out["lora_train"] = measure_lora_ceiling(device, train_batches, preset_name, lm=lm)
    del lm
    gc.collect()
    _reset_peak()
    return out


def measure_lora_ceiling(device, batches=(8, 16), preset_name: str = "openvla-7b", lm=None) -> dict:
    """A plain transformers Llama of the preset's shape with PEFT LoRA r=32 on all linear layers, gradient
    checkpointing: forward + backward + AdamW step at OpenVLA's training length (the update's ceiling).

    Two ways, the faster one is the ceiling: PEFT as it comes (fp32 adapters, inputs cast to fp32), and the same fp32
    adapters computing in bf16 under autocast (what `VLAPolicy` does)."""
    vla_config = preset_config(preset_name)
    vocab = vla_config.base_vocab_size
    if lm is None:
        config = LlamaConfig(**{k: v for k, v in vla_config.text_config.items() if k != "model_type"})
        config._attn_implementation = "sdpa"
        with torch.device(device):
            lm = LlamaForCausalLM(config).to(torch.bfloat16)
    lm.train()
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.enable_input_require_grads()
    peft_lm = get_peft_model(lm, LoraConfig(r=32, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft_lm.parameters() if p.requires_grad], lr=1e-5)
    out = {}
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, SEQ_OPENVLA), device=device)
        variants = {}
        for variant in ("peft_default", "bf16_autocast"):
            mixed = variant == "bf16_autocast"

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16) if mixed else nullcontext():
                    logits = peft_lm(input_ids=ids, use_cache=False, logits_to_keep=8).logits
                torch.log_softmax(logits[:, :-1, -256:].float(), -1).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            _reset_peak()
            with disable_input_dtype_casting(peft_lm, active=mixed):  # set once, outside the timed steps
                seconds = timed(step)
            variants[variant] = {"seconds": seconds, "samples_per_s": batch / seconds, "peak_gb": _peak_gb()}
        best = min(variants.values(), key=lambda v: v["seconds"])
        out[batch] = {**best, "variants": variants}
    del peft_lm, lm, optimizer
    gc.collect()
    _reset_peak()
    return out


# --- the project's own code ------------------------------------------------------------------------------------------


def _observations(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Observation(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                        rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                        rng.standard_normal(8).astype(np.float32),
                        "pick up the black bowl between the plate and the ramekin and place it on the plate")
            for _ in range(batch)]


def measure_rollout(device, batches=(1, 16, 64), presets=("openvla-7b", "openvla-7b-oft")) -> dict:
    """Each preset three ways: the plain model; with LoRA r=32 on all linear layers (the policy as RL rolls it out);
    and the same adapters folded into the weights for the rollout (`rollout.merge_lora`, `VLAPolicy.merged_adapters`)."""
    out: dict = {}
    for preset, variant in ((p, v) for p in presets for v in ("", "+lora", "+lora merged")):
        if variant == "":
            model, tokenizer = load_model_and_tokenizer(f"random:{preset}", seed=0, dtype=torch.bfloat16, device=device)
        elif variant == "+lora":
            model = apply_lora(model, LoraSettings(rank=32, alpha=16))
        policy = VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_spatial")).to(device).eval()
        name = preset + variant
        out[name] = {}
        for batch in batches:
            observations = _observations(batch)
            start = time.perf_counter()
            inputs = policy.prepare(observations)
            prepare_seconds = time.perf_counter() - start
            _reset_peak()
            with policy.merged_adapters() if variant == "+lora merged" else nullcontext():
                seconds = timed(lambda: policy.act(inputs, greedy=False, temperature=1.0))
            actions = batch * policy.chunk_size
            out[name][batch] = {"seconds": seconds, "actions_per_s": actions / seconds,
                                "policy_calls_per_s": 1 / seconds, "prepare_seconds_cpu": prepare_seconds,
                                "peak_gb": _peak_gb()}
        del policy
        if variant == "+lora merged":
            del model
        gc.collect()
        _reset_peak()
    return out


def _synthetic_samples(policy, count: int) -> Samples:
    inputs = policy.prepare(_observations(1))
    result = policy.act(inputs, greedy=False)
    samples = Samples()
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        samples.inputs.append(inputs)
        samples.token_ids.append(result.token_ids[0].cpu())
        samples.old_log_probs.append(result.log_probs[0].cpu())
        samples.token_masks.append(torch.ones_like(result.log_probs[0].cpu()))  # every action executed
        samples.advantages.append(float(torch.randn(1, generator=generator)))
        samples.returns.append(0.0)
        samples.old_values.append(0.0)
    return samples


def _update_setup(batch: int, int8: bool, preset: str, lora_targets: str) -> tuple[Engine, Samples]:
    """The policy with LoRA r=32, its optimizer and engine, built and set up as training does, and synthetic samples."""
    dist = Dist.create()
    optim = OptimConfig()
    policy = build_policy(ModelConfig(source=f"random:{preset}", dtype=Dtype.BF16, gradient_checkpointing=True),
                          LoraSettings(rank=32, alpha=16, target_modules=lora_targets),
                          QuantConfig(mode=QuantMode.INT8 if int8 else QuantMode.NONE, optimizer_8bit=int8),
                          EnvConfig(suite=Suite.LIBERO_SPATIAL), dist, value_head=False, seed=0)
    optimizer, _ = build_optimizer(optim, policy, iterations=1, optimizer_8bit=int8)
    engine = setup_engine(dist, policy, optimizer, optim)
    return engine, _synthetic_samples(policy, batch)


def measure_update(batch: int, int8: bool = False, preset: str = "openvla-7b", steps: int = 3,
                   lora_targets: str = "all-linear", *, objective) -> dict:
    """Samples/s of the real update step (one optimizer step per call) under the launch's backend."""
    engine, samples = _update_setup(batch, int8, preset, lora_targets)
    dist = engine.dist
    learner = Learner(engine, epochs=1, mini_batches=1, micro_batch_size=batch, seed=0)
    loss_fn = functools.partial(objective, engine.policy, engine.model)
    skipped = []
    _reset_peak()
    engine.policy.train()
    seconds = timed(lambda: skipped.extend(learner.update(samples, loss_fn, 0).skip_reasons), warmup=1, iters=steps)
    result = {"backend": dist.backend + ("+int8" if int8 else ""), "world_size": dist.world_size,
              "model": preset, "lora_targets": lora_targets,
              "per_gpu_batch": batch, "seconds_per_step": seconds,
              "samples_per_s": batch * dist.world_size / seconds, "peak_gb_per_gpu": _peak_gb(),
              "skipped_steps": len(skipped)}
    peaks = dist.gather_objects([_peak_gb()])
    result["peak_gb_per_gpu_all_ranks"] = peaks
    return result if dist.is_main else {}


def measure_update_phases(batch: int, int8: bool = False, preset: str = "openvla-7b", steps: int = 3,
                          lora_targets: str = "all-linear", trace_dir: str | None = None, *, objective) -> dict:
    """Where one update step's time goes (one GPU), from CUDA events around the same calls `Learner.update` makes
    (the objective, `Engine.backward`, `Engine.step`) plus hooks at the towers' and the projector's outputs; then
    one step under torch.profiler: GPU kernel time by kind, and the GPU's idle share of the step."""
    engine, samples = _update_setup(batch, int8, preset, lora_targets)
    dist, policy = engine.dist, engine.policy
    base, marks = policy.base_model, {}
    indices = list(range(len(samples)))
    counts = Counts(sequences=float(len(indices)), tokens=float(sum(samples.token_masks[i].sum() for i in indices)))

    def mark(name: str):
        marks[name] = Mark()

    def output_hooks(forward_done: str, backward_done: str):
        def hook(module, args, output):
            mark(forward_done)
            if output.requires_grad:  # the gradient reaching this output: everything after it is back-propagated
                output.register_hook(lambda grad: mark(backward_done))
        return hook

    handles = [base.vision_backbone.register_forward_hook(output_hooks("towers_forward", "projector_backward")),
               base.projector.register_forward_hook(output_hooks("projector_forward", "language_model_backward"))]

    def step():
        marks.clear()
        mark("start")
        loss, _ = objective(policy, engine.model, collate(samples, indices, policy, dist.device), counts)
        mark("language_model_forward")  # with the action log-softmax and the loss
        engine.backward(loss, last=True)
        mark("backward")
        engine.step()
        mark("optimizer_step")

    policy.train()
    step()  # warm-up
    _reset_peak()
    order = ["start", "towers_forward", "projector_forward", "language_model_forward", "language_model_backward",
             "projector_backward", "backward", "optimizer_step"]
    totals: dict[str, float] = {}
    for _ in range(steps):
        step()
        _sync()
        present = [name for name in order if name in marks]
        for before, after in zip(present, present[1:]):
            totals[after] = totals.get(after, 0.0) + marks[before].seconds_to(marks[after]) / steps
    phases = {name.replace("backward", "backward (with recompute)") if name != "backward" else
              "towers_backward (with recompute)" if "projector_backward" in totals else
              "language_model_backward (with recompute)": seconds for name, seconds in totals.items()}
    peak = _peak_gb()
    for handle in handles:
        handle.remove()

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        _sync()
        wall = time.perf_counter() - start
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / f"update_{preset}_{lora_targets}{'_int8' if int8 else ''}.json"))
    kernels = kernel_time_by_kind(prof)
    busy = sum(kernels.values())
    if not dist.is_main:
        return {}
    return {"model": preset, "lora_targets": lora_targets, "int8": int8, "per_gpu_batch": batch,
            "seconds_per_step": sum(totals.values()),
            "samples_per_s": batch / sum(totals.values()), "peak_gb": peak, "phases_seconds": phases,
            "profiled_step": {"wall_seconds": wall, "gpu_busy_seconds": busy, "gpu_idle_share": 1 - busy / wall,
                              "kernel_seconds_by_kind": kernels},
            "backend": dist.backend, "world_size": dist.world_size,
            "top_ops": prof.key_averages().table(sort_by="self_device_time_total", row_limit=25),
            "top_cpu_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)}


class Mark:
    """A point in the GPU's stream (a CUDA event), or in wall-clock time on the CPU."""

    def __init__(self):
        if torch.cuda.is_available():
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.time = time.perf_counter()

    def seconds_to(self, later: "Mark") -> float:
        if torch.cuda.is_available():
            return self.event.elapsed_time(later.event) / 1000
        return later.time - self.time


def kernel_time_by_kind(prof) -> dict[str, float]:
    """Seconds of GPU kernels of a profiled region, by kind (matrix multiplies, attention, the rest)."""

    kinds = {"matmul": re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*(?:mma|tensorop)", re.I),
             "attention": re.compile(r"flash|fmha|attention|sdpa", re.I),
             "int8 quantise/dequantise": re.compile(r"int8|quant|igemm", re.I),
             "optimizer (foreach)": re.compile(r"multi_tensor|foreach|adam", re.I)}
    out = dict.fromkeys([*kinds, "elementwise / other"], 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = next((k for k, pattern in kinds.items() if pattern.search(event.name)), "elementwise / other")
        out[kind] += event.device_time_total / 1e6
    return out


# --- report ----------------------------------------------------------------------------------------------------------


def ratios(report: dict) -> dict:
    """Our figures over the ceiling's, at matching batch sizes."""
    ceiling, out = report.get("ceiling"), {}
    if not ceiling:
        return out
    rollout = report.get("rollout", {}) if "decode7" in ceiling else {}
    for suffix in ("", "+lora", "+lora merged"):
        for batch, ours in rollout.get("openvla-7b" + suffix, {}).items():
            lm = ceiling["decode7"][batch]["seconds"]
            vision = ceiling["vision"][batch]["seconds"]
            out[f"openvla{suffix}_rollout_b{batch}"] = {"vs_lm_decode": lm / ours["seconds"],
                                                        "vs_lm_decode_plus_vision": (lm + vision) / ours["seconds"]}
        for batch, ours in rollout.get("openvla-7b-oft" + suffix, {}).items():
            lm = ceiling["prefill_oft"][batch]["seconds"]
            vision = 2 * ceiling["vision"][batch]["seconds"]  # two views per sample
            out[f"oft{suffix}_rollout_b{batch}"] = {"vs_lm_prefill": lm / ours["seconds"],
                                                    "vs_lm_prefill_plus_vision": (lm + vision) / ours["seconds"]}
    for update in report.get("update", []):
        batch = update["per_gpu_batch"]
        if batch in ceiling.get("lora_train", {}) and update.get("model", "openvla-7b") == "openvla-7b":
            ceiling_rate = ceiling["lora_train"][batch]["samples_per_s"]
            targets = "" if update.get("lora_targets", "all-linear") == "all-linear" else f"_{update['lora_targets']}"
            out[f"update_{update['backend']}_w{update['world_size']}_b{batch}{targets}"] = {
                "per_gpu_vs_lm_lora": update["samples_per_s"] / update["world_size"] / ceiling_rate}
    for phases in report.get("phases", []):
        batch = phases["per_gpu_batch"]
        if batch in ceiling.get("lora_train", {}) and phases["model"] == "openvla-7b":
            name = f"phases_{phases['lora_targets']}{'_int8' if phases['int8'] else ''}_b{batch}"
            out[name] = {"vs_lm_lora": phases["samples_per_s"] / ceiling["lora_train"][batch]["samples_per_s"]}
    return out


def markdown(report: dict) -> str:
    lines = [f"device: {report.get('device')}  ", f"date: {report.get('date')}", ""]
    if "ceiling" in report:
        c = report["ceiling"]
        lines += ["| ceiling (plain transformers / timm) | batch | figure |", "|---|---|---|"]
        for batch, v in c.get("decode7", {}).items():
            lines.append(f"| Llama-7B 7-token greedy decode, KV cache | {batch} | {v['actions_per_s']:.1f} actions/s |")
        for batch, v in c.get("prefill_oft", {}).items():
            lines.append(f"| Llama-7B prefill, OFT length {SEQ_OFT} | {batch} | {8 * v['samples_per_s']:.1f} actions/s |")
        for batch, v in c.get("vision", {}).items():
            lines.append(f"| DINOv2-L + SigLIP-So400m towers | {batch} | {v['images_per_s']:.1f} images/s |")
        for batch, v in c.get("lora_train", {}).items():
            for variant, w in v.get("variants", {"best": v}).items():
                lines.append(f"| Llama-7B LoRA r=32 fwd+bwd+step, len {SEQ_OPENVLA} ({variant}) | {batch} | "
                             f"{w['samples_per_s']:.1f} samples/s, peak {w['peak_gb']:.1f} GB |")
        lines.append("")
    if "rollout" in report:
        lines += ["| rollout (VLAPolicy.act) | batch | actions/s | peak GB |", "|---|---|---|---|"]
        for preset, rows in report["rollout"].items():
            for batch, v in rows.items():
                lines.append(f"| {preset} | {batch} | {v['actions_per_s']:.1f} | {v['peak_gb']:.1f} |")
        lines.append("")
    if "update" in report:
        lines += ["| update (update_policy) | model | LoRA on | GPUs | batch/GPU | samples/s | s/step | peak GB/GPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in report["update"]:
            lines.append(f"| {v['backend']} | {v.get('model', 'openvla-7b')} | {v.get('lora_targets', 'all-linear')} | "
                         f"{v['world_size']} | {v['per_gpu_batch']} | {v['samples_per_s']:.1f} | "
                         f"{v['seconds_per_step']:.2f} | {max(v['peak_gb_per_gpu_all_ranks']):.1f} |")
        lines.append("")
    for v in report.get("phases", []):
        lines += [f"update phases: {v['model']}, LoRA on {v['lora_targets']}{', int8' if v['int8'] else ''}, "
                  f"{v.get('backend', 'single')} x{v.get('world_size', 1)}, "
                  f"batch {v['per_gpu_batch']}: {v['seconds_per_step']:.3f} s/step, peak {v['peak_gb']:.1f} GB", "",
                  "| phase | seconds | share |", "|---|---|---|"]
        lines += [f"| {name} | {sec:.3f} | {sec / v['seconds_per_step']:.2f} |" for name, sec in v["phases_seconds"].items()]
        profiled = v["profiled_step"]
        lines += [f"| profiled step: GPU idle share | {profiled['wall_seconds']:.3f} wall | "
                  f"{profiled['gpu_idle_share']:.2f} |"]
        lines += [f"| kernels: {kind} | {sec:.3f} | {sec / profiled['wall_seconds']:.2f} |"
                  for kind, sec in profiled["kernel_seconds_by_kind"].items()]
        lines.append("")
    if report.get("ratios"):
        lines += ["| ratio to ceiling | value |", "|---|---|"]
        for key, values in report["ratios"].items():
            for name, value in values.items():
                lines.append(f"| {key} {name} | {value:.2f} |")
    return "\n".join(lines)


def main(args, objective) -> int:
    """`python -m trainer bench`; `objective`: the recipe's, with its options bound (see the module docstring)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    report: dict = {}
    path = Path(args.out)
    if path.exists():
        report = json.loads(path.read_text())
        report = {k: ({int(b) if str(b).isdigit() else b: v for b, v in val.items()} if isinstance(val, dict)
                      and k != "ceiling" else val) for k, val in report.items()}
        if "ceiling" in report:
            report["ceiling"] = {k: {int(b): v for b, v in rows.items()} for k, rows in report["ceiling"].items()}
        if "rollout" in report:
            report["rollout"] = {p: {int(b): v for b, v in rows.items()} for p, rows in report["rollout"].items()}
    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report["date"] = datetime.date.today().isoformat()
    parts = set(args.parts.split(","))
    args.models = args.models or [args.preset]
    result = None
    if "ceiling" in parts:
        report["ceiling"] = measure_ceiling(device, batches=tuple(args.batches), preset_name=args.preset)
    if "rollout" in parts:
        report["rollout"] = measure_rollout(device, batches=tuple(args.batches),
                                            presets=(args.preset, f"{args.preset}-oft".replace("-oft-oft", "-oft")))
    if "lora_ceiling" in parts:
        report.setdefault("ceiling", {})["lora_train"] = measure_lora_ceiling(device, (args.update_batch,), args.preset)
    if "phases" in parts:
        for model in args.models:
            for targets in args.lora_targets:
                result = measure_update_phases(args.update_batch, int8=args.int8, preset=model, steps=args.steps,
                                               lora_targets=targets, trace_dir=args.trace_dir, objective=objective)
                if result:
                    report.setdefault("phases", []).append(result)
                gc.collect()
                _reset_peak()
    if "update" in parts:
        for model in args.models:
            for targets in args.lora_targets:
                result = measure_update(args.update_batch, int8=args.int8, steps=args.steps, preset=model,
                                        lora_targets=targets, objective=objective)
                if result:
                    report.setdefault("update", []).append(result)
                gc.collect()
                _reset_peak()
    if ("update" in parts or "phases" in parts) and not result:
        return 0  # not rank 0: rank 0 writes the report
    report["ratios"] = ratios(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    return 0
