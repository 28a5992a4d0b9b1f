"""LoRA merged into the base weights for rollouts (VLAPolicy.merged_adapters, rollout.merge_lora): the adapters are
not run while merged, actions and log-probs stay the same, and the base weights come back bit for bit."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

import trainer.train
from trainer.engine import merges_lora_for_rollout
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.lora import LoraSettings, apply_lora, quantize_int8
from trainer.train import load_config

ROOT = Path(__file__).resolve().parents[1]


def lora_policy(name="tiny", dtype=torch.float32, int8=False, tie_lm_head=False, **settings) -> VLAPolicy:
    model, tokenizer = load_model_and_tokenizer(name, seed=0, dtype=dtype)
    if int8:
        quantize_int8(model, "cpu")
    if tie_lm_head:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    peft_model = apply_lora(model, LoraSettings(rank=4, **settings))
    randomize_lora_b(peft_model)
    return VLAPolicy(peft_model, tokenizer, EnvSettings("none", False, "toy"), value_head=True)


def lora_layers(policy: VLAPolicy) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in policy.vla.modules() if isinstance(m, LoraLayer)]


def base_weights(policy: VLAPolicy) -> dict[str, torch.Tensor]:
    """Every frozen parameter and buffer (the base model), cloned."""
    state = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    state.update({n: b.detach().clone() for n, b in policy.named_buffers()})
    return state


def assert_bit_identical(policy: VLAPolicy, before: dict[str, torch.Tensor]) -> None:
    now = base_weights(policy)
    assert now.keys() == before.keys()
    changed = [n for n in before if not (now[n].dtype == before[n].dtype and torch.equal(now[n], before[n]))]
    assert changed == []


class AdapterCalls:
    """Counts forward calls of every lora_A / lora_B submodule."""

    def __init__(self, policy: VLAPolicy):
        self.count = 0
        modules = [m for n, m in policy.vla.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])]
        assert modules
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *args):
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_merged_act_runs_no_adapter_and_gives_the_same_actions_and_log_probs(name, toy_observations):
    policy = lora_policy(name, include_lm_head=name == "tiny")
    inputs = policy.prepare(toy_observations)
    calls = AdapterCalls(policy)
    greedy = policy.act(inputs, greedy=True)
    sampled = policy.act(inputs, generator=torch.Generator().manual_seed(3))
    assert calls.take() > 0  # unmerged, the adapters run

    before = base_weights(policy)
    with policy.merged_adapters():
        assert all(layer.merged for layer in lora_layers(policy))
        assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if n in before)
        merged_greedy = policy.act(inputs, greedy=True)
        merged_sampled = policy.act(inputs, generator=torch.Generator().manual_seed(3))
        assert calls.take() == 0  # merged: plain linear layers only
    assert torch.equal(merged_greedy.token_ids, greedy.token_ids)
    torch.testing.assert_close(merged_greedy.log_probs, greedy.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_greedy.values, greedy.values, rtol=0, atol=1e-5)
    assert torch.equal(merged_sampled.token_ids, sampled.token_ids)
    torch.testing.assert_close(merged_sampled.log_probs, sampled.log_probs, rtol=0, atol=1e-5)

    assert_bit_identical(policy, before)
    assert not any(layer.merged for layer in lora_layers(policy))
    after = policy.act(inputs, greedy=True)
    assert calls.take() > 0
    assert torch.equal(after.log_probs, greedy.log_probs)  # the very same model as before the context


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_are_restored_bit_for_bit(dtype, toy_observations):
    policy = lora_policy(dtype=dtype, include_lm_head=True)
    inputs = policy.prepare(toy_observations)
    reference = policy.act(inputs, greedy=True)
    before = base_weights(policy)
    with policy.merged_adapters():
        merged = policy.act(inputs, greedy=True)
    assert_bit_identical(policy, before)
    assert not any(layer.merged or layer.merged_adapters for layer in lora_layers(policy))
    assert torch.equal(policy.act(inputs, greedy=True).log_probs, reference.log_probs)
    # the bf16 merge is the same function up to rounding (the autocast context is harmless while merged)
    torch.testing.assert_close(merged.log_probs, reference.log_probs, rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 0.05)
    if dtype == torch.bfloat16:  # why the originals are kept: PEFT's merge + unmerge alone does not give W back
        layer = lora_layers(policy)[0]
        weight = layer.get_base_layer().weight
        original = weight.detach().clone()
        with torch.no_grad():
            layer.merge()
            layer.unmerge()
        assert not torch.equal(weight, original)


def test_base_weights_are_restored_when_the_rollout_raises(toy_observations):
    policy = lora_policy(dtype=torch.bfloat16)
    inputs = policy.prepare(toy_observations)
    before = base_weights(policy)
    with pytest.raises(RuntimeError, match="env crashed"), policy.merged_adapters():
        policy.act(inputs)
        raise RuntimeError("env crashed")
    assert_bit_identical(policy, before)
    assert not any(layer.merged for layer in lora_layers(policy))


@pytest.mark.parametrize("case", ["int8 base", "tied lm_head"])
def test_weights_that_cannot_be_merged_exactly_are_left_alone(case, toy_observations):
    """An LLM.int8 base cannot take W + B @ A without re-quantising; a weight shared with the input embeddings would
    change both. The context then does nothing: the adapters keep running."""
    if case == "int8 base":
        policy = lora_policy(int8=True, target_modules="llm-linear")
    else:
        policy = lora_policy(tie_lm_head=True, include_lm_head=True)
    inputs = policy.prepare(toy_observations)
    calls = AdapterCalls(policy)
    reference = policy.act(inputs, greedy=True)
    calls.take()
    before = base_weights(policy)
    with policy.merged_adapters():
        assert not any(layer.merged for layer in lora_layers(policy))
        inside = policy.act(inputs, greedy=True)
        assert calls.take() > 0
    assert_bit_identical(policy, before)
    assert torch.equal(inside.log_probs, reference.log_probs)


def test_a_model_without_lora_is_left_alone(toy_observations):
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    policy = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy"))
    before = base_weights(policy)
    with policy.merged_adapters():
        policy.act(policy.prepare(toy_observations))
    assert_bit_identical(policy, before)


# --- in the training loop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, merges", [("single", True), ("ddp", True), ("fsdp", True),
                                             ("deepspeed_zero2", False), ("deepspeed_zero3", False)])
def test_merge_lora_where_the_rollout_acts_on_whole_weights(backend, merges):
    assert merges_lora_for_rollout(True, backend) is merges
    assert merges_lora_for_rollout(False, backend) is False


FAST = ["--env.groups_per_iteration", "2", "--rollout.num_generations", "4", "--env.num_workers", "8",
        "--algo.name", "ppo", "--algo.ppo_epochs", "1", "--algo.num_mini_batches", "1", "--algo.micro_batch_size", "64",
        "--train.iterations", "2", "--train.eval_every", "2", "--train.eval_episodes_per_task", "2",
        "--train.checkpoint_every", "0", "--log.progress", "false", "--log.plots", "false"]


def _run(output_dir: Path, monkeypatch, merge: bool) -> tuple[VLAPolicy, dict, dict, list[bool]]:
    """A 2-iteration PPO run on the toy task (with evaluations); returns the policy, its initial base and trainable
    weights and, for every entry into merged_adapters, whether all LoRA layers were merged inside.

    Test hooks: lora_B starts random (so that merging changes the weights), and every other rollout episode is
    rewarded on its last step (a random tiny policy rarely succeeds, and all-zero rewards would train nothing)."""
    config = load_config(["--config", str(ROOT / "configs" / "tiny_toy_cpu.yaml"), "--train.output_dir",
                          str(output_dir), *FAST, "--rollout.merge_lora", str(merge).lower()])
    assert config.rollout.merge_lora is merge
    built: dict = {}
    entries: list[bool] = []
    build, merged_adapters = trainer.train.build_policy, VLAPolicy.merged_adapters

    def build_and_keep(*args, **kwargs):
        built["policy"] = build(*args, **kwargs)
        randomize_lora_b(built["policy"])
        built["initial"] = base_weights(built["policy"])
        built["trainable"] = {n: p.detach().clone() for n, p in built["policy"].named_parameters() if p.requires_grad}
        return built["policy"]

    @contextmanager
    def spy(self):
        with merged_adapters(self):
            entries.append(all(layer.merged for layer in lora_layers(self)))
            yield

    class RolloutWithRewards(trainer.train.Rollout):
        def collect(self, **kwargs):
            episodes, stats = super().collect(**kwargs)
            for episode in episodes[::2]:
                episode.rewards[-1] = 1.0
            return episodes, stats

    monkeypatch.setattr(trainer.train, "build_policy", build_and_keep)
    monkeypatch.setattr(trainer.train, "Rollout", RolloutWithRewards)
    monkeypatch.setattr(VLAPolicy, "merged_adapters", spy)
    trainer.train.train(config)
    return built["policy"], built["initial"], built["trainable"], entries


def test_training_with_merged_rollouts_keeps_the_base_and_trains_like_unmerged_rollouts(tmp_path, monkeypatch):
    merged_policy, initial, initial_trainable, entries = _run(tmp_path / "merged", monkeypatch, merge=True)
    # 2 rollouts + 2 evaluations (baseline, iteration 2) of 2 modes each, all with every layer merged
    assert entries == [True] * 6
    assert_bit_identical(merged_policy, initial)
    assert not any(layer.merged for layer in lora_layers(merged_policy))

    plain_policy, _, _, plain_entries = _run(tmp_path / "plain", monkeypatch, merge=False)
    assert plain_entries == []
    # the same sampled actions (fp32: the merged log-probs agree to ~1e-7), hence the same updates
    trained = {n: p for n, p in merged_policy.named_parameters() if p.requires_grad}
    reference = dict(plain_policy.named_parameters())
    assert any("lora_B" in n for n in trained)
    for name, param in trained.items():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=5e-4, msg=name)  # they moved ~6e-3
    assert any(not torch.equal(p, initial_trainable[n]) for n, p in trained.items())  # training moved them
