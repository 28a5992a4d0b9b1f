"""`python -m trainer bench`: throughput and memory of the full-size model against a ceiling measured in the same run.

Random weights (no checkpoint needed). Parts, each optional:
  ceiling  plain transformers Llama of OpenVLA's shape: prefill at the OpenVLA and OFT sequence lengths, greedy
           7-token decoding with a KV cache, LoRA r=32 forward+backward with gradient checkpointing; plus the two
           timm vision towers. "LM+vision" ceilings add the towers' time to the LM's.
  rollout  the policy API (`VLAPolicy.act`, the function rollouts, evaluation and this benchmark share) for
           OpenVLA (7 tokens, KV cache) and OpenVLA-OFT (one forward per 8-action chunk) at batch 1 / 16 / 64.
  update   the training update (`trainer.train.update_policy`: PPO loss, backward, guard, optimizer step) with
           LoRA r=32 on all linear layers and gradient checkpointing, on synthetic samples, under whatever
           backend `accelerate launch` gives it (single GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3; `--int8` for LLM.int8).
Writes JSON (and a markdown table) to --out.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

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
    import timm
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.config import preset

    vla_config = preset(preset_name)
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
    lm.train()
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.enable_input_require_grads()
    peft_lm = get_peft_model(lm, LoraConfig(r=32, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft_lm.parameters() if p.requires_grad], lr=1e-5)
    out["lora_train"] = {}
    for batch in train_batches:
        ids = torch.randint(0, vocab, (batch, SEQ_OPENVLA), device=device)

        def step():
            logits = peft_lm(input_ids=ids, use_cache=False, logits_to_keep=8).logits
            torch.log_softmax(logits[:, :-1, -256:].float(), -1).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _reset_peak()
        seconds = timed(step)
        out["lora_train"][batch] = {"seconds": seconds, "samples_per_s": batch / seconds, "peak_gb": _peak_gb()}
    del peft_lm, lm, optimizer
    gc.collect()
    _reset_peak()
    return out


# --- the project's own code ------------------------------------------------------------------------------------------


def _observations(batch: int, seed: int = 0):
    from trainer.envs.base import Observation

    rng = np.random.default_rng(seed)
    return [Observation(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                        rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                        rng.standard_normal(8).astype(np.float32),
                        "pick up the black bowl between the plate and the ramekin and place it on the plate")
            for _ in range(batch)]


def _policy(preset: str, device, lora: bool = False, int8: bool = False):
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
    from trainer.models.lora import LoraSettings, apply_lora, quantize_int8

    model, tokenizer = load_model_and_tokenizer(f"random:{preset}", seed=0, dtype=torch.bfloat16, device=device)
    if int8:
        quantize_int8(model, device)
    if lora:
        model.gradient_checkpointing_enable()
        model = apply_lora(model, LoraSettings(rank=32, alpha=16))
    policy = VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_spatial"), value_head=False)
    return policy.to(device)


def measure_rollout(device, batches=(1, 16, 64), presets=("openvla-7b", "openvla-7b-oft")) -> dict:
    out: dict = {}
    for preset in presets:
        policy = _policy(preset, device).eval()
        out[preset] = {}
        for batch in batches:
            observations = _observations(batch)
            start = time.perf_counter()
            inputs = policy.prepare(observations)
            prepare_seconds = time.perf_counter() - start
            _reset_peak()
            seconds = timed(lambda: policy.act(inputs, greedy=False, temperature=1.0))
            actions = batch * policy.chunk_size
            out[preset][batch] = {"seconds": seconds, "actions_per_s": actions / seconds,
                                  "policy_calls_per_s": 1 / seconds, "prepare_seconds_cpu": prepare_seconds,
                                  "peak_gb": _peak_gb()}
        del policy
        gc.collect()
        _reset_peak()
    return out


def _synthetic_samples(policy, count: int):
    from trainer.train import Samples

    inputs = policy.prepare(_observations(1))
    result = policy.act(inputs, greedy=False)
    samples = Samples()
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        samples.inputs.append(inputs)
        samples.token_ids.append(result.token_ids[0].cpu())
        samples.old_log_probs.append(result.log_probs[0].cpu())
        samples.advantages.append(float(torch.randn(1, generator=generator)))
        samples.returns.append(0.0)
        samples.old_values.append(0.0)
    return samples


def measure_update(batch: int, int8: bool = False, preset: str = "openvla-7b", steps: int = 3) -> dict:
    """Samples/s of the real update step (one optimizer step per call) under the launch's backend."""
    from trainer.config import RunConfig
    from trainer.dist import Dist
    from trainer.train import TrainState, build_optimizer, update_policy

    dist = Dist.create()
    config = RunConfig()
    config.algo.micro_batch_size = batch
    config.quant.mode = "int8" if int8 else "none"
    config.quant.optimizer_8bit = int8
    from trainer.models.lora import check_quantization

    check_quantization(config.quant.mode, dist.backend)
    policy = _policy(preset, dist.device, lora=True, int8=int8)
    samples = _synthetic_samples(policy, batch)
    optimizer, scheduler = build_optimizer(config, policy)
    model, optimizer, scheduler = dist.accelerator.prepare(policy, optimizer, scheduler)
    state = TrainState()
    _reset_peak()
    policy.train()
    seconds = timed(lambda: update_policy(config, policy, model, optimizer, samples, dist, 0, False, state),
                    warmup=1, iters=steps)
    result = {"backend": dist.backend + ("+int8" if int8 else ""), "world_size": dist.world_size,
              "per_gpu_batch": batch, "seconds_per_step": seconds,
              "samples_per_s": batch * dist.world_size / seconds, "peak_gb_per_gpu": _peak_gb(),
              "skipped_steps": state.skipped_steps}
    peaks = dist.gather_objects([_peak_gb()])
    result["peak_gb_per_gpu_all_ranks"] = peaks
    return result if dist.is_main else {}


# --- report ----------------------------------------------------------------------------------------------------------


def ratios(report: dict) -> dict:
    """Our figures over the ceiling's, at matching batch sizes."""
    ceiling, out = report.get("ceiling"), {}
    if not ceiling:
        return out
    rollout = report.get("rollout", {})
    for batch, ours in rollout.get("openvla-7b", {}).items():
        lm = ceiling["decode7"][batch]["seconds"]
        vision = ceiling["vision"][batch]["seconds"]
        out[f"openvla_rollout_b{batch}"] = {"vs_lm_decode": lm / ours["seconds"],
                                            "vs_lm_decode_plus_vision": (lm + vision) / ours["seconds"]}
    for batch, ours in rollout.get("openvla-7b-oft", {}).items():
        lm = ceiling["prefill_oft"][batch]["seconds"]
        vision = 2 * ceiling["vision"][batch]["seconds"]  # two views per sample
        out[f"oft_rollout_b{batch}"] = {"vs_lm_prefill": lm / ours["seconds"],
                                        "vs_lm_prefill_plus_vision": (lm + vision) / ours["seconds"]}
    for update in report.get("update", []):
        batch = update["per_gpu_batch"]
        if batch in ceiling["lora_train"]:
            ceiling_rate = ceiling["lora_train"][batch]["samples_per_s"]
            out[f"update_{update['backend']}_w{update['world_size']}_b{batch}"] = {
                "per_gpu_vs_lm_lora": update["samples_per_s"] / update["world_size"] / ceiling_rate}
    return out


def markdown(report: dict) -> str:
    lines = [f"device: {report.get('device')}  ", f"date: {report.get('date')}", ""]
    if "ceiling" in report:
        c = report["ceiling"]
        lines += ["| ceiling (plain transformers / timm) | batch | figure |", "|---|---|---|"]
        for batch, v in c["decode7"].items():
            lines.append(f"| Llama-7B 7-token greedy decode, KV cache | {batch} | {v['actions_per_s']:.1f} actions/s |")
        for batch, v in c["prefill_oft"].items():
            lines.append(f"| Llama-7B prefill, OFT length {SEQ_OFT} | {batch} | {8 * v['samples_per_s']:.1f} actions/s |")
        for batch, v in c["vision"].items():
            lines.append(f"| DINOv2-L + SigLIP-So400m towers | {batch} | {v['images_per_s']:.1f} images/s |")
        for batch, v in c["lora_train"].items():
            lines.append(f"| Llama-7B LoRA r=32 fwd+bwd+step, len {SEQ_OPENVLA} | {batch} | "
                         f"{v['samples_per_s']:.1f} samples/s, peak {v['peak_gb']:.1f} GB |")
        lines.append("")
    if "rollout" in report:
        lines += ["| rollout (VLAPolicy.act) | batch | actions/s | peak GB |", "|---|---|---|---|"]
        for preset, rows in report["rollout"].items():
            for batch, v in rows.items():
                lines.append(f"| {preset} | {batch} | {v['actions_per_s']:.1f} | {v['peak_gb']:.1f} |")
        lines.append("")
    if "update" in report:
        lines += ["| update (update_policy) | GPUs | batch/GPU | samples/s | s/step | peak GB/GPU |",
                  "|---|---|---|---|---|---|"]
        for v in report["update"]:
            lines.append(f"| {v['backend']} | {v['world_size']} | {v['per_gpu_batch']} | {v['samples_per_s']:.1f} | "
                         f"{v['seconds_per_step']:.2f} | {max(v['peak_gb_per_gpu_all_ranks']):.1f} |")
        lines.append("")
    if report.get("ratios"):
        lines += ["| ratio to ceiling | value |", "|---|---|"]
        for key, values in report["ratios"].items():
            for name, value in values.items():
                lines.append(f"| {key} {name} | {value:.2f} |")
    return "\n".join(lines)


def main(args) -> int:
    import datetime

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
    result = None
    if "ceiling" in parts:
        report["ceiling"] = measure_ceiling(device, batches=tuple(args.batches), preset_name=args.preset)
    if "rollout" in parts:
        report["rollout"] = measure_rollout(device, batches=tuple(args.batches),
                                            presets=(args.preset, f"{args.preset}-oft".replace("-oft-oft", "-oft")))
    if "update" in parts:
        result = measure_update(args.update_batch, int8=args.int8, steps=args.steps, preset=args.preset)
        if result:
            report.setdefault("update", []).append(result)
    if "update" in parts and not result:
        return 0  # not rank 0: rank 0 writes the report
    report["ratios"] = ratios(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    return 0
