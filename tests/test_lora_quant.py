"""LoRA targets and trainable parameters; the LLM.int8 base; refused combinations."""

import pytest
import torch
from helpers import randomize_lora_b
from torch import nn

from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.lora import LoraSettings, apply_lora, check_quantization, quantize_int8, trainable_breakdown


def lora_policy(name="tiny", **settings):
    model, tokenizer = load_model_and_tokenizer(name, seed=0)
    peft_model = apply_lora(model, LoraSettings(rank=4, **settings))
    return VLAPolicy(peft_model, tokenizer, EnvSettings("none", False, "toy"), value_head=True)


def test_base_is_frozen_and_lora_covers_the_used_linear_layers():
    model, _ = load_model_and_tokenizer("tiny", seed=0)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    policy = lora_policy()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("value_head") for n in trainable)
    adapted = {n.split(".lora_")[0].replace("vla.base_model.model.", "") for n in trainable if "lora_A" in n}
    expected = {n for n in linears if not n.startswith(("language_model.lm_head", "vision_backbone.featurizer.blocks.2.",
                                                       "vision_backbone.fused_featurizer.blocks.2.",
                                                       "vision_backbone.fused_featurizer.attn_pool"))}
    assert adapted == expected
    # r * (in + out) per adapted layer
    lora_params = sum(4 * (linears[n].in_features + linears[n].out_features) for n in expected)
    breakdown = trainable_breakdown(policy)
    assert sum(v for k, v in breakdown.items() if k.startswith("LoRA")) == lora_params
    assert breakdown["value head"] == sum(p.numel() for p in policy.value_head.parameters())
    assert breakdown["frozen"] == sum(p.numel() for p in model.parameters())


def test_llm_only_targets():
    policy = lora_policy(target_modules="llm-linear")
    names = [n for n, p in policy.named_parameters() if "lora_A" in n]
    assert names and all(".language_model." in n for n in names)


def test_every_trainable_parameter_gets_a_gradient(toy_observations):
    policy = lora_policy("tiny-oft", train_proprio_projector=True)
    inputs = policy.prepare(toy_observations)
    result = policy.act(inputs)
    evaluated = policy.evaluate(inputs, result.token_ids)
    (evaluated.log_probs.mean() + evaluated.values.mean()).backward()
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert any("proprio_projector" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_lora_starts_as_the_base_model(toy_observations):
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    base = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).eval()
    inputs = base.prepare(toy_observations)
    before = base.act(inputs, greedy=True)
    adapted = VLAPolicy(apply_lora(model, LoraSettings(rank=4)), tokenizer, EnvSettings("none", False, "toy")).eval()
    after = adapted.act(inputs, greedy=True)
    assert torch.equal(before.token_ids, after.token_ids)  # lora_B starts at zero


def test_heads_cannot_be_trained_on_a_model_without_them():
    model, _ = load_model_and_tokenizer("tiny", seed=0)
    with pytest.raises(ValueError, match="no proprio projector"):
        apply_lora(model, LoraSettings(train_proprio_projector=True))


def test_int8_base_with_lora(toy_observations):
    import bitsandbytes as bnb

    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    reference = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).eval()
    inputs = reference.prepare(toy_observations)
    ref_tokens = reference.act(inputs, greedy=True).token_ids
    ref_logits = reference.evaluate(inputs, ref_tokens).logits.detach()

    quantized, _ = load_model_and_tokenizer("tiny", seed=0)
    quantize_int8(quantized, "cpu")
    q_proj = quantized.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
    assert isinstance(quantized.language_model.lm_head, nn.Linear)  # output layer left in full precision
    policy = VLAPolicy(apply_lora(quantized, LoraSettings(rank=4, target_modules="llm-linear")), tokenizer,
                       EnvSettings("none", False, "toy"), value_head=True)
    assert policy.act(inputs, greedy=True).token_ids.shape == ref_tokens.shape
    # the same teacher-forced tokens on both sides: the logits at later positions depend on the earlier tokens, and a
    # near tie between neighbouring bins (the tiny preset's action rows are smooth) can flip a greedy token under int8
    evaluated = policy.evaluate(inputs, ref_tokens)
    # int8 rounding moves logits a little, not a lot
    assert (evaluated.logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    evaluated.log_probs.mean().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed_zero3"])
def test_int8_with_a_sharding_backend_is_refused_with_alternatives(backend):
    with pytest.raises(ValueError) as error:
        check_quantization("int8", backend)
    assert "single_gpu_8bit" in str(error.value) and "ddp_2gpu_8bit" in str(error.value)
    check_quantization("int8", "ddp")
    check_quantization("none", backend)


def _autograd_node_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("targets", ["llm-linear", "all-linear"])
def test_int8_checkpointing_keeps_no_int8_autograd_context_and_gives_the_same_gradients(toy_observations, targets):
    """bitsandbytes keeps an fp16 copy of each int8 matmul's input on its autograd context, out of reach of the
    non-reentrant checkpoint: the int8 model must be checkpointed so that no int8 matmul node outlives the forward."""

    def int8_policy(checkpointing: bool):
        model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
        quantize_int8(model, "cpu")
        if checkpointing:
            model.gradient_checkpointing_enable()
        policy = VLAPolicy(apply_lora(model, LoraSettings(rank=4, target_modules=targets)), tokenizer,
                           EnvSettings("none", False, "toy"))
        randomize_lora_b(policy, std=0.02)
        return policy.train()

    plain, checkpointed = int8_policy(False), int8_policy(True)
    assert checkpointed.base_model.reentrant_checkpointing and not plain.base_model.reentrant_checkpointing
    inputs = plain.prepare(toy_observations)
    tokens = plain.act(inputs, greedy=True).token_ids
    losses = {}
    for name, policy in (("plain", plain), ("checkpointed", checkpointed)):
        loss = policy.evaluate(inputs, tokens).log_probs.mean()
        losses[name] = _autograd_node_names(loss)
        loss.backward()
    # MatMul8bitLt on a GPU, MatMul8bitFp on the CPU (bitsandbytes picks by device)
    assert any(n.startswith("MatMul8bit") for n in losses["plain"])  # the check below would see the context
    assert not any(n.startswith("MatMul8bit") for n in losses["checkpointed"])
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    checkpointed_grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.requires_grad}
    assert plain_grads.keys() == checkpointed_grads.keys()
    layer_grads = [n for n in plain_grads if ".language_model.model.layers." in n]
    assert layer_grads and all(checkpointed_grads[n] is not None for n in checkpointed_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fp32_adapters_on_a_bf16_base_compute_in_bf16_with_fp32_gradients(toy_observations):
    """PEFT's default would cast each adapted layer's input to fp32 (fp32 GEMMs and full-size copies); the policy runs
    the adapters in the base's dtype under autocast, with fp32 weights and gradients."""
    from trainer.models.policy import mixed_precision_adapters

    def bf16_policy(mixed: bool):
        model, tokenizer = load_model_and_tokenizer("tiny", seed=0, dtype=torch.bfloat16)
        peft_model = apply_lora(model, LoraSettings(rank=4))
        randomize_lora_b(peft_model, std=0.05)
        policy = VLAPolicy(peft_model, tokenizer, EnvSettings("none", False, "toy"))
        if not mixed:  # PEFT's own behaviour, for reference
            policy.adapter_compute_dtype = None
            for module in peft_model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = True
        return policy

    mixed, reference = bf16_policy(True), bf16_policy(False)
    assert mixed.adapter_compute_dtype == torch.bfloat16
    lora_params = {n: p for n, p in mixed.named_parameters() if p.requires_grad}
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params.values())
    seen = []
    lora_b = next(m for n, m in mixed.named_modules() if n.endswith("q_proj.lora_B.default"))
    lora_b.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    inputs = mixed.prepare(toy_observations)
    acted = mixed.act(inputs, greedy=True)
    evaluated = mixed.evaluate(inputs, acted.token_ids)
    assert seen and set(seen) == {torch.bfloat16}
    # rollout and update see the same function of the weights
    torch.testing.assert_close(evaluated.log_probs.detach(), acted.log_probs, rtol=0, atol=1e-5)
    evaluated.log_probs.mean().backward()
    expected = reference.evaluate(inputs, acted.token_ids)
    expected.log_probs.mean().backward()
    torch.testing.assert_close(evaluated.log_probs, expected.log_probs, rtol=0, atol=0.05)
    for name, param in lora_params.items():
        want = dict(reference.named_parameters())[name].grad
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(param.grad.flatten(), want.flatten(), dim=0)
        assert cosine > 0.98 or want.abs().max() < 1e-6, (name, float(cosine))
    assert mixed_precision_adapters(load_model_and_tokenizer("tiny", seed=0)[0], torch.float32) is None


def test_the_value_head_stays_fp32_when_acting_with_bf16_adapters(toy_observations):
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0, dtype=torch.bfloat16)
    policy = VLAPolicy(apply_lora(model, LoraSettings(rank=4)), tokenizer, EnvSettings("none", False, "toy"),
                       value_head=True)
    policy.value_head.to(torch.float32)
    torch.nn.init.normal_(policy.value_head.net[-1].weight, std=0.1, generator=torch.Generator().manual_seed(0))
    seen = []
    policy.value_head.net[1].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    inputs = policy.prepare(toy_observations)
    acted = policy.act(inputs, greedy=True)
    evaluated = policy.evaluate(inputs, acted.token_ids)
    assert seen == [torch.float32, torch.float32]  # the rollout's values and the update's come from the same fp32 head
    torch.testing.assert_close(acted.values, evaluated.values.detach(), rtol=0, atol=1e-6)
