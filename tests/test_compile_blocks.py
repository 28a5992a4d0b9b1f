"""model.compile_blocks: the update's forward and backward through torch.compile'd ViT blocks and decoder layers give
the eager numbers; rollouts never compile (their forwards run without gradients, eagerly, token for token as before).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import randomize_lora_b
from torch._dynamo.utils import counters

from trainer.build import EnvConfig, ModelConfig, QuantConfig, QuantMode, build_policy, compiles_blocks
from trainer.envs.toy import toy_observations
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.lora import LoraSettings, apply_lora
from trainer.models.openvla import compile_blocks_for_training


def _policy(compiled: bool) -> VLAPolicy:
    model, tokenizer = load_model_and_tokenizer("tiny-oft", seed=0, dtype=torch.float32)
    model = apply_lora(model, LoraSettings(rank=4))
    randomize_lora_b(model)
    policy = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy"), value_head=False)
    if compiled:
        assert compile_blocks_for_training(policy.base_model) == 3 + 3 + 2  # both towers' blocks, the LLM's layers
    return policy


def _rollout_and_update(policy: VLAPolicy, checkpointing: bool):
    inputs = policy.prepare(toy_observations()[:3])
    with torch.no_grad():
        acted = policy.act(inputs, greedy=False, noise=policy.sampling_noise(3, torch.Generator().manual_seed(1)))
    if checkpointing:
        policy.base_model.gradient_checkpointing_enable()
    policy.train()
    policy.zero_grad()
    new = policy.evaluate(inputs, acted.token_ids, temperature=1.3)
    (new.log_probs * torch.linspace(-1, 1, new.log_probs.numel()).view_as(new.log_probs)).sum().backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.base_model.gradient_checkpointing_disable()
    policy.eval()
    return acted, new.log_probs.detach(), grads


@pytest.fixture(scope="module")
def eager_and_compiled():
    return _policy(False), _policy(True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_update_matches_eager_and_rollouts_stay_eager(eager_and_compiled, checkpointing):
    eager, compiled = eager_and_compiled
    counters.clear()
    eager_acted, eager_log_probs, eager_grads = _rollout_and_update(eager, checkpointing)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_acted, log_probs, grads = _rollout_and_update(compiled, checkpointing)
    # the rollout (no gradients) compiled nothing and acted exactly as the eager policy
    assert torch.equal(compiled_acted.token_ids, eager_acted.token_ids)
    assert torch.equal(compiled_acted.log_probs, eager_acted.log_probs)
    # the update went through compiled graphs (a first call compiles; a later one may find them cached)
    assert counters["stats"]["calls_captured"] > 0 or checkpointing
    torch.testing.assert_close(log_probs, eager_log_probs, rtol=1e-4, atol=1e-4)
    assert eager_grads.keys() == grads.keys() and len(grads) > 20  # LoRA of both towers, projector and the LLM
    assert any("featurizer" in name for name in grads) and any("language_model" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compile_blocks_refused_under_deepspeed_and_int8():
    settings = {"lora": LoraSettings(rank=4), "env": EnvConfig(), "value_head": False, "seed": 0}
    for backend in ("deepspeed_zero2", "deepspeed_zero3"):
        dist = SimpleNamespace(backend=backend, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=f"one process, DDP or FSDP2, not {backend}"):
            build_policy(ModelConfig(compile_blocks=True, gradient_checkpointing=False), quant=QuantConfig(),
                         dist=dist, **settings)
    with pytest.raises(ValueError, match="int8"):
        build_policy(ModelConfig(compile_blocks=True, gradient_checkpointing=False),
                     quant=QuantConfig(mode=QuantMode.INT8), dist=SimpleNamespace(backend="single",
                                                                                  device=torch.device("cpu")),
                     **settings)


def test_auto_compiles_on_a_gpu_where_supported_and_never_refuses():
    def dist(backend, device):
        return SimpleNamespace(backend=backend, device=torch.device(device))

    plain, int8 = QuantConfig(), QuantConfig(mode=QuantMode.INT8)
    assert compiles_blocks("auto", dist("single", "cuda"), plain) and compiles_blocks("auto", dist("ddp", "cuda"), plain)
    assert not compiles_blocks("auto", dist("single", "cpu"), plain)  # CPU runs (tests, the demo): eager
    assert compiles_blocks("auto", dist("fsdp", "cuda"), plain) and compiles_blocks(True, dist("fsdp", "cuda"), plain)
    assert not compiles_blocks("auto", dist("deepspeed_zero3", "cuda"), plain)
    assert not compiles_blocks("auto", dist("single", "cuda"), int8)
    assert compiles_blocks(True, dist("single", "cpu"), plain) and not compiles_blocks(False, dist("ddp", "cuda"), plain)
    # the default on this CPU machine builds eager blocks
    policy = build_policy(ModelConfig(source="tiny-oft"), LoraSettings(rank=4), QuantConfig(), EnvConfig(),
                          dist("single", "cpu"), value_head=False, seed=0)
    assert ModelConfig().compile_blocks == "auto"
    assert not any(hasattr(block, "training_forward") for block in policy.base_model.language_model.model.layers)
    assert ModelConfig(compile_blocks="sometimes").problems() == [
        "compile_blocks = 'sometimes'; expected true, false or auto"]


def test_oft_acts_through_the_compiled_blocks_inside_compiled_acting(eager_and_compiled):
    """VLAPolicy.compiled_acting (rollout.compile_blocks): an OFT act without gradients runs the compiled blocks and
    picks the eager policy's tokens, with its log-probs up to float rounding; outside the context it is eager again."""
    eager, compiled = eager_and_compiled
    inputs = eager.prepare(toy_observations()[:3])
    noise = eager.sampling_noise(3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = eager.act(inputs, greedy=False, noise=noise)
        counters.clear()
        with compiled.compiled_acting() as used:
            acted = compiled.act(inputs, greedy=False, noise=noise)
        assert used and counters["stats"]["unique_graphs"] > 0  # no-grad graphs of the blocks, compiled now
        assert torch.equal(acted.token_ids, reference.token_ids)
        torch.testing.assert_close(acted.log_probs, reference.log_probs, rtol=1e-4, atol=1e-4)
        assert not compiled.base_model.compiled_inference
        counters.clear()
        again = compiled.act(inputs, greedy=False, noise=noise)  # eager again: bit for bit
        assert counters["stats"]["unique_graphs"] == 0 and torch.equal(again.log_probs, reference.log_probs)
    # a no-op for standard OpenVLA (its decode steps run with a cache) and where the blocks are not compiled
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0, dtype=torch.float32)
    standard = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy"), value_head=False)
    compile_blocks_for_training(standard.base_model)
    with standard.compiled_acting() as used, eager.compiled_acting() as used_eager:
        assert not used and not standard.base_model.compiled_inference and not used_eager
