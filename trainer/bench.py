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
  levers   issue 13's speed levers end to end: whole RL iterations of OFT on the LIBERO stand-in with each lever
           (pipelined rollout, images prepared in the env workers, merged LoRA, no recompute) on its own and all
           together, repeats reported as ranges, against a model-only ceiling of the same run and the FLOP bound.
  decode   standard OpenVLA's decoding with adapters: transformers' dynamic cache, the static cache and CUDA graphs,
           merged or not, against the plain-transformers decode ceiling.

The objective is the recipe's (train.objective); this library module does not import the recipe, so the command line
passes it in: `objective(policy, model, batch, counts) -> (loss, diagnostics)`; likewise the recipe's advantages for
the levers part: `advantages(episodes, dist) -> (Samples, metrics)`.
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
from dataclasses import dataclass
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
from trainer.envs.pool import EnvPool
from trainer.envs.sharding import build_work_items
from trainer.learner import Counts, Learner, Samples, collate
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.config import preset as preset_config
from trainer.models.lora import LoraSettings, apply_lora
from trainer.models.memory import sequence_length
from trainer.models.openvla import compile_blocks_for_training
from trainer.rollout import collect_episodes

SEQ_OPENVLA = 256 + 1 + 20 + 7  # patches + BOS + prompt + action tokens
SEQ_OFT = 1 + 512 + 1 + 20 + 56 + 1  # BOS + 2 views of patches + proprio + prompt + action slots + stop


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_calls(fn, warmup: int = 1, iters: int = 3) -> list[float]:
    """Seconds of each call after warm-up (synchronised per call)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iters):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return seconds


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
            seconds = timed(lambda: plain_decode7(lm, ids))
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


def plain_llama(preset_name: str, device):
    """transformers' LlamaForCausalLM of the preset's language model shape, random bf16 weights, SDPA, eval mode."""
    config = LlamaConfig(**{k: v for k, v in preset_config(preset_name).text_config.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@torch.no_grad()
def plain_prefill(lm, ids: torch.Tensor):
    """The plain-transformers prefill: the prompt's forward, filling the dynamic KV cache (last logits only)."""
    return lm(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def plain_decode7(lm, ids: torch.Tensor) -> torch.Tensor:
    """The plain-transformers decode ceiling: prefill, then 6 greedy steps with the dynamic KV cache."""
    out = plain_prefill(lm, ids)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(6):
        out = lm(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return token


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


ROLLOUT_VARIANTS = {"plain": "", "lora": "+lora", "lora-merged": "+lora merged"}  # bench --rollout-variants


def measure_rollout(device, batches=(1, 16, 64), presets=("openvla-7b", "openvla-7b-oft"),
                    variants=("", "+lora", "+lora merged"), compiled: bool = False) -> dict:
    """Each preset three ways: the plain model; with LoRA r=32 on all linear layers (the policy as RL rolls it out);
    and the same adapters folded into the weights for the rollout (`rollout.merge_lora`, `VLAPolicy.merged_adapters`).
    `variants` picks some of them. `compiled`: then OpenVLA-OFT presets once more, merged and acting through compiled
    blocks ("+lora merged compiled": model.compile_blocks with rollout.compile_blocks; the first, compiling call is
    the warm-up). Each call's seconds are kept (`seconds_each`) beside their mean."""
    out: dict = {}
    for preset in presets:
        oft = "oft" in preset
        wanted = [v for v in ("", "+lora", "+lora merged") if v in variants]
        wanted += ["+lora merged compiled"] if compiled and oft else []
        model = tokenizer = None
        for variant in wanted:
            if model is None:
                model, tokenizer = load_model_and_tokenizer(f"random:{preset}", seed=0, dtype=torch.bfloat16,
                                                            device=device)
            if "+lora" in variant and not hasattr(model, "peft_config"):
                model = apply_lora(model, LoraSettings(rank=32, alpha=16))
            policy = VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_spatial")).to(device).eval()
            if variant.endswith("compiled"):
                compile_blocks_for_training(policy.base_model)
            name = preset + variant
            out[name] = {}
            for batch in batches:
                observations = _observations(batch)
                start = time.perf_counter()
                inputs = policy.prepare(observations)
                prepare_seconds = time.perf_counter() - start
                _reset_peak()
                with (policy.merged_adapters() if "merged" in variant else nullcontext(),
                      policy.compiled_acting(variant.endswith("compiled"))):
                    each = timed_calls(lambda: policy.act(inputs, greedy=False, temperature=1.0))
                seconds = float(np.mean(each))
                actions = batch * policy.chunk_size
                out[name][batch] = {"seconds": seconds, "seconds_each": each, "actions_per_s": actions / seconds,
                                    "policy_calls_per_s": 1 / seconds, "prepare_seconds_cpu": prepare_seconds,
                                    "peak_gb": _peak_gb()}
                print(f"rollout {name} batch {batch}: {actions / seconds:.1f} actions/s "
                      f"(calls {[round(x, 4) for x in each]} s)", flush=True)
            del policy
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


def _lora_policy(preset: str, dist: Dist, lora_targets: str = "all-linear", int8: bool = False,
                 variant: UpdateVariant | None = None) -> VLAPolicy:
    """The random full-size policy with LoRA r=32 (gradient recompute unless `variant` says otherwise), built as
    training builds it."""
    variant = variant or UpdateVariant()
    return build_policy(ModelConfig(source=f"random:{preset}", dtype=Dtype.BF16,
                                    gradient_checkpointing=variant.recompute, compile_blocks=variant.compile_blocks),
                        LoraSettings(rank=32, alpha=16, target_modules=lora_targets),
                        QuantConfig(mode=QuantMode.INT8 if int8 else QuantMode.NONE, optimizer_8bit=int8),
                        EnvConfig(suite=Suite.LIBERO_SPATIAL), dist, value_head=False, seed=0)


@dataclass(frozen=True)
class UpdateVariant:
    """How the benchmarked update runs: gradient recompute (as the LoRA ceiling) and model.compile_blocks."""

    recompute: bool = True
    compile_blocks: bool = False

    @property
    def name(self) -> str:
        return "_".join(["recompute" if self.recompute else "no_recompute"] + ["compiled"] * self.compile_blocks)


def _lora_engine(preset: str, lora_targets: str, int8: bool = False, variant: UpdateVariant | None = None) -> Engine:
    """`_lora_policy`, its optimizer and the launch's engine, set up as training does."""
    dist = Dist.create()
    optim = OptimConfig()
    policy = _lora_policy(preset, dist, lora_targets, int8, variant)
    optimizer, _ = build_optimizer(optim, policy, iterations=1, optimizer_8bit=int8)
    return setup_engine(dist, policy, optimizer, optim)


def _update_setup(batch: int, int8: bool, preset: str, lora_targets: str,
                  variant: UpdateVariant | None = None) -> tuple[Engine, Samples]:
    """The policy with LoRA r=32, its optimizer and engine, built and set up as training does, and synthetic samples."""
    engine = _lora_engine(preset, lora_targets, int8, variant)
    return engine, _synthetic_samples(engine.policy, batch)


def measure_update(batch: int, int8: bool = False, preset: str = "openvla-7b", steps: int = 3,
                   lora_targets: str = "all-linear", label: str | None = None, *, objective,
                   variant: UpdateVariant | None = None, profile_step: bool = False) -> dict:
    """Samples/s of the real update step (one optimizer step per call) under the launch's backend: the mean over
    `steps` steps after one warm-up, and each step's rate (`samples_per_s_repeats`: median and range). `label` names
    the set-up in the report (e.g. the accelerate config), default the backend. `profile_step`: then one more step
    under torch.profiler on every rank: GPU busy and idle time, kernel time by kind (communication included) and the
    collective calls by name (rank 0's, and each rank's busy share)."""
    variant = variant or UpdateVariant()
    engine, samples = _update_setup(batch, int8, preset, lora_targets, variant)
    dist = engine.dist
    learner = Learner(engine, epochs=1, mini_batches=1, micro_batch_size=batch, seed=0)
    loss_fn = functools.partial(objective, engine.policy, engine.model)
    skipped = []
    _reset_peak()
    engine.policy.train()
    each = []

    def step():
        _sync()
        start = time.perf_counter()
        skipped.extend(learner.update(samples, loss_fn, 0).skip_reasons)
        _sync()
        each.append(time.perf_counter() - start)

    step()  # warm-up (and compilation)
    each.clear()
    for _ in range(steps):
        step()
    seconds = sum(each) / len(each)
    backend = dist.backend + ("+int8" if int8 else "")
    result = {"backend": backend, "label": label or backend, "world_size": dist.world_size,
              "model": preset, "lora_targets": lora_targets, "variant": variant.name,
              "per_gpu_batch": batch, "seconds_per_step": seconds,
              "samples_per_s": batch * dist.world_size / seconds, "peak_gb_per_gpu": _peak_gb(),
              "skipped_steps": len(skipped),
              "samples_per_s_repeats": spread([batch * dist.world_size / s for s in each])}
    peaks = dist.gather_objects([_peak_gb()])
    result["peak_gb_per_gpu_all_ranks"] = peaks
    if profile_step:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
        profiled = profiled_step(prof, each[-1])
        result["profiled_step"] = profiled
        result["profiled_step_gpu_busy_share_all_ranks"] = dist.gather_objects([1 - profiled["gpu_idle_share"]])
    return result if dist.is_main else {}


def measure_update_phases(batch: int, int8: bool = False, preset: str = "openvla-7b", steps: int = 3,
                          lora_targets: str = "all-linear", trace_dir: str | None = None, *, objective,
                          variant: UpdateVariant | None = None) -> dict:
    """Where one update step's time goes (one GPU), from CUDA events around the same calls `Learner.update` makes
    (the objective, `Engine.backward`, `Engine.step`) plus hooks at the towers' and the projector's outputs; then
    one step under torch.profiler: GPU kernel time by kind, and the GPU's idle share of the step."""
    variant = variant or UpdateVariant()
    engine, samples = _update_setup(batch, int8, preset, lora_targets, variant)
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
    if not dist.is_main:
        return {}
    return {"model": preset, "lora_targets": lora_targets, "int8": int8, "per_gpu_batch": batch,
            "variant": variant.name, "seconds_per_step": sum(totals.values()),
            "samples_per_s": batch / sum(totals.values()), "peak_gb": peak, "phases_seconds": phases,
            "profiled_step": profiled_step(prof, wall),
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


def profiled_step(prof, wall_seconds: float) -> dict:
    """One profiled step: GPU kernel time by kind, busy and idle shares of the step's wall time, the number of GPU
    kernels, and the collective operations called (name -> calls, CPU side)."""
    kernels = kernel_time_by_kind(prof)
    busy = sum(kernels.values())
    collectives: dict[str, int] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA and COLLECTIVE.search(event.name):
            collectives[event.name] = collectives.get(event.name, 0) + 1
    gpu_kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"wall_seconds": wall_seconds, "gpu_busy_seconds": busy, "gpu_idle_share": max(0.0, 1 - busy / wall_seconds),
            "kernel_seconds_by_kind": kernels, "gpu_kernels": gpu_kernels,
            "collective_calls": dict(sorted(collectives.items(), key=lambda kv: -kv[1])[:12])}


COLLECTIVE = re.compile(r"^(c10d::|nccl:)|all_gather|allgather|reduce_scatter|all_reduce|allreduce|broadcast", re.I)


def kernel_time_by_kind(prof) -> dict[str, float]:
    """Seconds of GPU kernels of a profiled region, by kind (matrix multiplies, attention, communication, the rest).
    Communication kernels overlap compute where the backend overlaps them, so kinds may add up to more than the wall
    time of a step."""

    kinds = {"communication (nccl)": re.compile(r"nccl", re.I),
             "matmul": re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*(?:mma|tensorop)", re.I),
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


# --- speed levers (issue 13): each on its own and together, against ceilings of the same run and the FLOP bound ----

# The FLOP bound of issue 13: 2 FLOP per parameter and token of a forward (towers included), at the dense bf16 matrix
# rate measured on an H200 of this workplace (788-798 TFLOP/s on random data; the issue uses 790). An update costs
# about 3 forwards with recompute (the base is frozen: input gradients only), 2 without.
PEAK_BF16_FLOPS = 790e12
UPDATE_FORWARDS = {True: 3.0, False: 2.0}


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements."""
    ordered = sorted(values)
    return {"median": float(np.median(ordered)), "min": ordered[0], "max": ordered[-1], "values": ordered}


def forward_flops(policy, text_tokens: int) -> float:
    """2 FLOP per parameter per token of one forward (the issue's accounting), for the sequence of one sample."""
    params = sum(p.numel() for p in policy.base_model.parameters())
    return 2.0 * params * sequence_length(policy.base_model, text_tokens)


def flop_bound_actions_per_s(policy, text_tokens: int, peak: float = PEAK_BF16_FLOPS) -> float:
    """Rollout only: actions per second if every forward ran at the peak rate (one forward per chunk)."""
    return peak / forward_flops(policy, text_tokens) * policy.chunk_size


def flop_bound_env_steps_per_s(policy, text_tokens: int, recompute: bool, epochs: int = 1,
                               peak: float = PEAK_BF16_FLOPS) -> float:
    """Rollout + `epochs` update epochs per env step at the peak rate (issue 13: ~175 for OFT with recompute, ~235
    without)."""
    per_step = forward_flops(policy, text_tokens) / policy.chunk_size * (1 + epochs * UPDATE_FORWARDS[recompute])
    return peak / per_step


LEVER_CONFIGS = {  # name -> (pipeline, images prepared in the workers, merge_lora, recompute)
    "baseline": (False, False, False, True),
    "pipeline": (True, False, False, True),
    "workers_preprocess": (False, True, False, True),
    "merge_lora": (False, False, True, True),
    "no_recompute": (False, False, False, False),
    "all": (True, True, True, False),
}


def _set_recompute(policy, on: bool) -> None:
    base = policy.base_model
    if on:
        base.gradient_checkpointing_enable()
    else:
        base.gradient_checkpointing_disable()


def measure_levers(device, preset: str = "openvla-7b-oft", configs=tuple(LEVER_CONFIGS), repeats: int = 3,
                   episodes: int = 16, num_workers: int = 16, max_steps: int = 40, micro_batch: int = 16,
                   env_kwargs: dict | None = None, ceiling: bool = True, progress=None, *, objective,
                   advantages) -> dict:
    """Whole RL iterations (rollout -> GRPO advantages -> one PPO update epoch) of the random full-size policy with
    LoRA r=32 on all linear layers on the LIBERO stand-in env, with each lever of issue 13 on its own and all together
    (LEVER_CONFIGS), `repeats` iterations each. What the trainer runs: collect_episodes inside
    `Engine.rollout_weights`, the recipe's `advantages(episodes, dist) -> (Samples, metrics)` and `Learner.update` with
    the recipe's `objective` (both passed in, see the module docstring); the policy, its engine and both env pools
    (images prepared in the trainer / in the workers) are built once. Env steps per second of each iteration, its split, the ratio to the baseline, to the
    FLOP bound, and to a model-only ceiling of the same run (plain transformers: the OFT-length prefill and LoRA
    update, 1 / (1/rollout + 1/update) per env step). `progress(out)` is called after each configuration (the
    caller writes what is measured so far: a run cut short by a time limit keeps it)."""
    device = torch.device(device)
    unknown = sorted(set(configs) - set(LEVER_CONFIGS))
    if unknown:
        raise ValueError(f"unknown lever configurations {unknown}; expected some of {list(LEVER_CONFIGS)}")
    out: dict = {"preset": preset, "episodes": episodes, "num_workers": num_workers, "max_steps": max_steps,
                 "micro_batch": micro_batch, "repeats": repeats, "configs": {}}
    if ceiling:
        out["ceiling"] = measure_oft_ceiling(device, preset, micro_batch)
    engine = _lora_engine(preset, "all-linear")
    policy, dist = engine.policy, engine.dist
    learner = Learner(engine, epochs=1, mini_batches=1, micro_batch_size=micro_batch, seed=0)
    loss_fn = functools.partial(objective, policy, engine.model)
    env = {"max_steps": max_steps, **(env_kwargs or {})}
    text_tokens: list[int] = []

    def flop_bounds() -> None:
        text = int(np.median(text_tokens)) if text_tokens else 32
        out["text_tokens"] = text
        out["flop_bound_env_steps_per_s"] = {"recompute": flop_bound_env_steps_per_s(policy, text, True),
                                             "no_recompute": flop_bound_env_steps_per_s(policy, text, False)}
    with EnvPool("libero_standin", num_workers, env, start_timeout_s=600) as plain_pool, \
         EnvPool("libero_standin", num_workers, env, observation_transform=policy.worker_transform(),
                 start_timeout_s=600) as prepared_pool:

        def iteration(index: int, levers: tuple[bool, bool, bool, bool]) -> dict:
            pipeline, in_workers, merge, recompute = levers
            _set_recompute(policy, recompute)
            groups = [((index + g) % 10, (7 * index + g) % 50) for g in range(max(episodes // 8, 1))]
            items = build_work_items(groups, samples_per_group=min(episodes, 8))
            _sync()
            start = time.perf_counter()
            policy.eval()
            engine.merge_lora = merge  # what rollout.merge_lora sets (explicitly on or off here)
            with engine.rollout_weights():
                episodes_, stats = collect_episodes(
                    policy, prepared_pool if in_workers else plain_pool, items, temperature=1.0, run_seed=1,
                    episode_offset=index * 1000, model=engine.model, pipeline=pipeline)
            rollout_seconds = time.perf_counter() - start
            samples, _ = advantages(episodes_, dist)
            policy.train()
            learner.update(samples, loss_fn, index)
            _sync()
            seconds = time.perf_counter() - start
            text_tokens.extend(int(e.inputs[0].text_mask.sum()) for e in episodes_ if e.inputs)
            return {"seconds": seconds, "rollout_seconds": rollout_seconds, "update_seconds": seconds - rollout_seconds,
                    "policy_seconds": stats.policy_seconds, "prepare_seconds": stats.prepare_seconds,
                    "env_wait_seconds": stats.env_seconds, "policy_calls": stats.policy_calls,
                    "env_steps": stats.env_steps, "samples": len(samples),
                    "env_steps_per_s": stats.env_steps / seconds,
                    "env_errors": sum(e.env_error is not None for e in episodes_)}

        iteration(0, LEVER_CONFIGS["all"])  # warm-up: allocator, kernels, both pools' first (numba-like) steps
        iteration(1, LEVER_CONFIGS["baseline"])
        index = 2
        for name in configs:
            _reset_peak()
            runs = []
            try:  # one failing configuration (out of memory, say) must not lose the others
                for _ in range(repeats):
                    runs.append(iteration(index, LEVER_CONFIGS[name]))
                    index += 1
            except Exception:  # noqa: BLE001
                import traceback

                out.setdefault("errors", {})[name] = traceback.format_exc()
                print(out["errors"][name], flush=True)
                index += repeats
                if not runs:
                    continue
            out["configs"][name] = {"levers": dict(zip(("pipeline", "workers_preprocess", "merge_lora", "recompute"),
                                                       LEVER_CONFIGS[name])),
                                    "iterations": runs, "peak_gb": _peak_gb(),
                                    **{key: spread([r[key] for r in runs]) for key in
                                       ("env_steps_per_s", "seconds", "rollout_seconds", "update_seconds",
                                        "policy_seconds", "prepare_seconds", "env_wait_seconds")}}
            flop_bounds()
            print(f"levers {name}: {out['configs'][name]['env_steps_per_s']['median']:.1f} env steps/s "
                  f"({[round(r['env_steps_per_s'], 1) for r in runs]})", flush=True)
            if progress is not None:
                progress(out)
    flop_bounds()
    return out  # the model is freed with this frame (main collects)


def measure_oft_ceiling(device, preset: str = "openvla-7b-oft", batch: int = 16) -> dict:
    """Plain transformers at OpenVLA-OFT's sequence length: the prefill (one chunk per sample), and the LoRA r=32
    forward + backward + AdamW step with and without recompute (adapters in bf16 under autocast, as the policy)."""
    device = torch.device(device)
    vocab = preset_config(preset).base_vocab_size
    lm = plain_llama(preset.replace("-oft", ""), device)
    ids = torch.randint(0, vocab, (batch, SEQ_OFT), device=device)
    with torch.no_grad():
        prefill = timed(lambda: lm(input_ids=ids, use_cache=False, logits_to_keep=56))
    out = {"batch": batch, "prefill_chunks_per_s": batch / prefill}
    lm.train()
    lm.enable_input_require_grads()
    peft_lm = get_peft_model(lm, LoraConfig(r=32, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft_lm.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = peft_lm(input_ids=ids, use_cache=False, logits_to_keep=57).logits
        torch.log_softmax(logits[:, :-1, -256:].float(), -1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with disable_input_dtype_casting(peft_lm, active=True):
        for recompute in (True, False):
            if hasattr(peft_lm, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                enable, disable = peft_lm.activation_checkpointing_enable, peft_lm.activation_checkpointing_disable
                kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
            else:
                enable, disable = peft_lm.gradient_checkpointing_enable, peft_lm.gradient_checkpointing_disable
                kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
            if recompute:
                enable(**kwargs)
            else:
                disable()
            _reset_peak()
            seconds = timed(step)
            out["lora_train_recompute" if recompute else "lora_train_no_recompute"] = {
                "samples_per_s": batch / seconds, "peak_gb": _peak_gb()}
    return out


def measure_decode(device, batches=(16, 64), preset: str = "openvla-7b", repeats: int = 3, iters: int = 2,
                   ceiling: bool = True, progress=None) -> dict:
    """Standard OpenVLA's `act` with LoRA r=32 on all linear layers (as a training rollout acts), decoding with
    transformers' dynamic cache, the static cache, and CUDA graphs (CUDA only), unmerged and merged; against the
    plain-transformers decode ceiling of the same run (prefill + 6 cached greedy steps, LM only, and with the towers)
    and the FLOP bound; `repeats` timings of `iters` calls each. Also how far the paths agree on the same noise
    (tokens and log-probs of graphs vs eager static vs dynamic). `progress(out)` is called after each batch size."""
    device = torch.device(device)
    out: dict = {"preset": preset, "repeats": repeats, "iters": iters, "ceiling": {}, "variants": {}, "agreement": {}}
    # also where an act's time goes: "prefill_seconds" (towers, projector and the prompt's forward with the cache,
    # per weights state), the ceiling's prefill and towers alone; the decoding steps take the rest
    if ceiling:
        lm = plain_llama(preset, device)
        towers = _towers(preset, device)
        for batch in batches:
            ids = torch.randint(0, lm.config.vocab_size - 64, (batch, SEQ_OPENVLA - 7), device=device)
            plain_decode7(lm, ids)
            lm_seconds = [timed(functools.partial(plain_decode7, lm, ids), warmup=0, iters=iters) for _ in range(repeats)]
            prefill = functools.partial(plain_prefill, lm, ids)
            prefill_seconds = [timed(prefill, warmup=0, iters=iters) for _ in range(repeats)]
            vision = _time_towers(towers, batch, device, iters)
            out["ceiling"][batch] = {"decode7_actions_per_s": spread([batch / t for t in lm_seconds]),
                                     "decode7_plus_vision_actions_per_s": spread(
                                         [batch / (t + vision) for t in lm_seconds]),
                                     # where a call's time goes: the prefill alone, the towers alone
                                     "prefill_seconds": spread(prefill_seconds), "towers_seconds": vision}
        lm = towers = None  # freed before the policy is built
        gc.collect()
        _reset_peak()
    policy = _lora_policy(preset, Dist.create())
    with torch.no_grad():  # adapters that change the outputs (lora_B starts at zero)
        generator = torch.Generator().manual_seed(0)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    policy.eval()
    modes = ["dynamic", "static"] + (["graphs"] if device.type == "cuda" else [])
    for batch in batches:
        inputs = policy.prepare(_observations(batch))
        noise = policy.sampling_noise(batch, torch.Generator().manual_seed(batch))
        out.setdefault("text_tokens", int(inputs.text_mask.sum(1).max()))
        out.setdefault("flop_bound_actions_per_s", flop_bound_actions_per_s(policy, out["text_tokens"]))
        for weights in ("lora", "lora merged"):
            results = {}
            with policy.merged_adapters() if weights == "lora merged" else nullcontext():
                for mode in modes:
                    try:  # one failing path (a capture that does not work here, say) must not lose the others
                        decoder = None if mode == "dynamic" else policy.static_decoder(batch, graphs=mode == "graphs")
                        _reset_peak()
                        results[mode] = policy.act(inputs, noise=noise, decoder=decoder)  # warm-up (and capture)
                        act = functools.partial(policy.act, inputs, noise=noise, decoder=decoder)
                        seconds = [timed(act, warmup=0, iters=iters) for _ in range(repeats)]
                    except Exception:  # noqa: BLE001
                        import traceback

                        out.setdefault("errors", {})[f"{weights}/{mode}_b{batch}"] = traceback.format_exc()
                        print(out["errors"][f"{weights}/{mode}_b{batch}"], flush=True)
                        continue
                    out["variants"].setdefault(f"{weights}/{mode}", {})[batch] = {
                        "actions_per_s": spread([batch / t for t in seconds]), "seconds": spread(seconds),
                        "peak_gb": _peak_gb(), "fallbacks": 0 if decoder is None else decoder.fallbacks,
                        "capture_error": None if decoder is None else decoder.capture_error}
                # the act's first part alone (towers, projector, prefill with the cache), the same in every mode
                prefill = functools.partial(policy, inputs.to(policy.device), use_cache=True)
                with torch.no_grad():
                    prefill()
                    prefill_seconds = [timed(prefill, warmup=0, iters=iters) for _ in range(repeats)]
                out.setdefault("prefill_seconds", {}).setdefault(weights, {})[batch] = spread(prefill_seconds)
            reference = results.get("static")
            for mode in results if reference is not None else ():
                if mode != "static":
                    out["agreement"][f"{weights}/{mode}_vs_static_b{batch}"] = {
                        "token_agreement": float((results[mode].token_ids == reference.token_ids).float().mean()),
                        "max_abs_log_prob_difference": float((results[mode].log_probs - reference.log_probs).abs().max())}
        if progress is not None:
            progress(out)
    return out


def _towers(preset_name: str, device):
    config = preset_config(preset_name)
    return [timm.create_model(m, pretrained=False, num_classes=0, **{"img_size": config.image_size, **kw})
            .to(device, torch.bfloat16).eval()
            for m, kw in zip(config.timm_model_ids, config.trainer.timm_model_kwargs)]


@torch.no_grad()
def _time_towers(towers, batch: int, device, iters: int) -> float:
    size = towers[0].patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    return timed(lambda: [t.forward_features(images) for t in towers], warmup=1, iters=iters)


def speed_ratios(report: dict) -> dict:
    """The levers' and the decode's figures as ratios: to the baseline / plain path, to the ceiling of the same run,
    and to the FLOP bound (median of the repeats; the ranges are in the raw report)."""
    out: dict = {}
    levers = report.get("levers")
    if levers and levers.get("configs"):
        configs = levers["configs"]
        baseline = configs.get("baseline", {}).get("env_steps_per_s", {}).get("median")
        ceiling = levers.get("ceiling")
        for name, result in configs.items():
            rate = result["env_steps_per_s"]["median"]
            recompute = result["levers"]["recompute"]
            row = {"env_steps_per_s": rate,
                   "vs_flop_bound": rate / levers["flop_bound_env_steps_per_s"]["recompute" if recompute else
                                                                               "no_recompute"]}
            if baseline:
                row["vs_baseline"] = rate / baseline
            if ceiling:
                update = ceiling["lora_train_recompute" if recompute else "lora_train_no_recompute"]["samples_per_s"]
                model_only = 1 / (1 / (8 * ceiling["prefill_chunks_per_s"]) + 1 / (8 * update))
                row["vs_model_only_ceiling"] = rate / model_only
            out[f"e2e_{name}"] = row
    decode = report.get("decode")
    if decode and decode.get("variants"):
        for variant, rows in decode["variants"].items():
            for batch, result in rows.items():
                rate = result["actions_per_s"]["median"]
                row = {"actions_per_s": rate, "vs_flop_bound": rate / decode["flop_bound_actions_per_s"]}
                plain = decode["variants"].get(variant.split("/")[0] + "/dynamic", {}).get(batch)
                if plain:
                    row["vs_dynamic_cache"] = rate / plain["actions_per_s"]["median"]
                ceiling = decode.get("ceiling", {}).get(batch)
                if ceiling:
                    row["vs_lm_decode_ceiling"] = rate / ceiling["decode7_actions_per_s"]["median"]
                    row["vs_lm_decode_plus_vision"] = rate / ceiling["decode7_plus_vision_actions_per_s"]["median"]
                out[f"decode_{variant}_b{batch}"] = row
    return out


# --- report ----------------------------------------------------------------------------------------------------------


def ratios(report: dict) -> dict:
    """Our figures over the ceiling's, at matching batch sizes."""
    ceiling, out = report.get("ceiling"), scaling(report.get("update", []))
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
            targets += _variant_suffix(update)
            out[f"update_{update.get('label', update['backend'])}_w{update['world_size']}_b{batch}{targets}"] = {
                "per_gpu_vs_lm_lora": update["samples_per_s"] / update["world_size"] / ceiling_rate}
    for phases in report.get("phases", []):
        batch = phases["per_gpu_batch"]
        if batch in ceiling.get("lora_train", {}) and phases["model"] == "openvla-7b":
            name = f"phases_{phases['lora_targets']}{'_int8' if phases['int8'] else ''}_b{batch}{_variant_suffix(phases)}"
            out[name] = {"vs_lm_lora": phases["samples_per_s"] / ceiling["lora_train"][batch]["samples_per_s"]}
    return out


def scaling(updates: list[dict]) -> dict:
    """Each multi-GPU update against the one-GPU update of the same model, LoRA targets and batch per GPU (the last
    measured of each): `vs_one_gpu` (2.0 = perfect on 2 GPUs), with the range from the repeats' extremes."""
    def key(u):
        return u.get("model"), u.get("lora_targets"), u["per_gpu_batch"], u.get("variant", "recompute")

    single = {key(u): u for u in updates if u["world_size"] == 1 and u["backend"] == "single"}
    out = {}
    for update in updates:
        one = single.get(key(update))
        if update["world_size"] == 1 or one is None:
            continue
        row = {"vs_one_gpu": update["samples_per_s"] / one["samples_per_s"]}
        if "samples_per_s_repeats" in update and "samples_per_s_repeats" in one:
            many, base = update["samples_per_s_repeats"], one["samples_per_s_repeats"]
            row.update(vs_one_gpu_min=many["min"] / base["max"], vs_one_gpu_max=many["max"] / base["min"])
        name = f"scaling_{update.get('label', update['backend'])}_w{update['world_size']}_b{update['per_gpu_batch']}"
        out[name + _variant_suffix(update)] = row
    return out


def _variant_suffix(result: dict) -> str:
    """"" for the default update (recompute, eager blocks), else "_<variant>"."""
    variant = result.get("variant", "recompute")
    return "" if variant == "recompute" else f"_{variant}"


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
        lines += [("| update (Learner.update) | model | LoRA on | GPUs | batch/GPU | samples/s | [min, max] of steps | "
                   "s/step | peak GB/GPU |"), "|---|---|---|---|---|---|---|---|---|"]
        for v in report["update"]:
            span = v.get("samples_per_s_repeats")
            span = f"[{span['min']:.1f}, {span['max']:.1f}]" if span else ""
            lines.append(f"| {v.get('label', v['backend'])} | {v.get('model', 'openvla-7b')} | "
                         f"{v.get('lora_targets', 'all-linear')} | {v['world_size']} | {v['per_gpu_batch']} | "
                         f"{v['samples_per_s']:.1f} | {span} | {v['seconds_per_step']:.2f} | "
                         f"{max(v['peak_gb_per_gpu_all_ranks']):.1f} |")
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
    levers = report.get("levers")
    if levers and levers.get("configs"):
        lines += [(f"end to end ({levers['preset']}, LIBERO stand-in, {levers['episodes']} episodes of <= "
                   f"{levers['max_steps']} steps on {levers['num_workers']} workers, micro-batch "
                   f"{levers['micro_batch']}; median [min, max] of {levers['repeats']} iterations)"), "",
                  ("| levers | env steps/s | s/iteration | rollout s | update s | policy s | prepare s | env wait s | "
                   "peak GB |"), "|---|---|---|---|---|---|---|---|---|"]
        for name, v in levers["configs"].items():
            rate = v["env_steps_per_s"]
            lines.append(f"| {name} | {rate['median']:.1f} [{rate['min']:.1f}, {rate['max']:.1f}] | "
                         + " | ".join(f"{v[k]['median']:.2f}" for k in ("seconds", "rollout_seconds", "update_seconds",
                                                                         "policy_seconds", "prepare_seconds",
                                                                         "env_wait_seconds"))
                         + f" | {v['peak_gb']:.1f} |")
        bound = levers["flop_bound_env_steps_per_s"]
        lines += ["", (f"FLOP bound: {bound['recompute']:.0f} env steps/s with recompute, "
                       f"{bound['no_recompute']:.0f} without"), ""]
    decode = report.get("decode")
    if decode and decode.get("variants"):
        lines += [(f"decode ({decode['preset']}, LoRA r=32 all-linear; median [min, max] of {decode['repeats']} "
                   f"repeats; FLOP bound {decode['flop_bound_actions_per_s']:.0f} actions/s)"), "",
                  "| act | batch | actions/s | peak GB |", "|---|---|---|---|"]
        for batch, v in decode.get("ceiling", {}).items():
            rate = v["decode7_actions_per_s"]
            lines.append(f"| plain transformers decode ceiling (LM only) | {batch} | {rate['median']:.1f} "
                         f"[{rate['min']:.1f}, {rate['max']:.1f}] | |")
        for variant, rows in decode["variants"].items():
            for batch, v in rows.items():
                rate = v["actions_per_s"]
                lines.append(f"| {variant} | {batch} | {rate['median']:.1f} [{rate['min']:.1f}, {rate['max']:.1f}] | "
                             f"{v['peak_gb']:.1f} |")
        for name, v in decode.get("agreement", {}).items():
            lines.append(f"| agreement {name} | | tokens {v['token_agreement']:.4f}, max abs log-prob difference "
                         f"{v['max_abs_log_prob_difference']:.2e} | |")
        lines.append("")
    if report.get("speed_ratios"):
        lines += ["| speed ratio | values |", "|---|---|"]
        for key, values in report["speed_ratios"].items():
            lines.append(f"| {key} | " + ", ".join(f"{name} {value:.2f}" for name, value in values.items()) + " |")
        lines.append("")
    if report.get("ratios"):
        lines += ["| ratio to ceiling | value |", "|---|---|"]
        for key, values in report["ratios"].items():
            for name, value in values.items():
                lines.append(f"| {key} {name} | {value:.2f} |")
    return "\n".join(lines)


def main(args, objective, advantages=None) -> int:
    """`python -m trainer bench`; `objective` and `advantages` (the levers part): the recipe's, with their options
    bound (see the module docstring)."""
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
    variant = UpdateVariant(recompute=not args.no_recompute, compile_blocks=args.compile_blocks)
    result = None
    if "ceiling" in parts:
        report["ceiling"] = measure_ceiling(device, batches=tuple(args.batches), preset_name=args.preset)
    if "rollout" in parts:
        presets = tuple(dict.fromkeys([args.preset, f"{args.preset}-oft".replace("-oft-oft", "-oft")]))
        report["rollout"] = measure_rollout(device, batches=tuple(args.batches), presets=presets,
                                            variants=tuple(ROLLOUT_VARIANTS[v] for v in args.rollout_variants),
                                            compiled=args.compile_blocks)
    if "lora_ceiling" in parts:
        report.setdefault("ceiling", {})["lora_train"] = measure_lora_ceiling(device, (args.update_batch,), args.preset)
    if "phases" in parts:
        for model in args.models:
            for targets in args.lora_targets:
                result = measure_update_phases(args.update_batch, int8=args.int8, preset=model, steps=args.steps,
                                               lora_targets=targets, trace_dir=args.trace_dir, objective=objective,
                                               variant=variant)
                if result:
                    report.setdefault("phases", []).append(result)
                gc.collect()
                _reset_peak()
    if "update" in parts:
        for model in args.models:
            for targets in args.lora_targets:
                result = measure_update(args.update_batch, int8=args.int8, steps=args.steps, preset=model,
                                        lora_targets=targets, label=args.label, objective=objective,
                                        variant=variant, profile_step=args.profile_step)
                if result:
                    report.setdefault("update", []).append(result)
                gc.collect()
                _reset_peak()
    oft_preset = f"{args.preset}-oft".replace("-oft-oft", "-oft")

    def write(part: str):
        def save(result: dict) -> None:  # what is measured so far, in case the run is cut short
            report[part] = result
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=str))
        return save

    if "levers" in parts:
        standin = {k: v for k, v in (("step_seconds", args.standin_step_seconds),
                                     ("render_seconds", args.standin_render_seconds)) if v is not None}
        report["levers"] = measure_levers(device, preset=oft_preset, configs=tuple(args.levers), repeats=args.repeats,
                                          episodes=args.e2e_episodes, num_workers=args.e2e_workers,
                                          max_steps=args.e2e_max_steps, micro_batch=args.update_batch,
                                          env_kwargs=standin, progress=write("levers"), objective=objective,
                                          advantages=advantages)
    if "decode" in parts:
        report["decode"] = measure_decode(device, batches=tuple(args.batches), preset=args.preset.replace("-oft", ""),
                                          repeats=args.repeats, progress=write("decode"))
    if ("update" in parts or "phases" in parts) and not result:
        return 0  # not rank 0: rank 0 writes the report
    report["ratios"] = ratios(report)
    report["speed_ratios"] = speed_ratios(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    return 0
