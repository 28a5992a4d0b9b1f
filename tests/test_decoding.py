"""Sampling with Gumbel noise and standard OpenVLA's static-cache decoding (trainer/models/decoding.py).

The static decoder must give exactly the tokens of transformers' dynamic cache and the same log-probs (fp32), for
greedy, sampled and mixed batches, prompts of different lengths, batches padded up to a bucket, and LoRA adapters.
The CUDA graph path is the same step function replayed: the tests at the end compare it with the eager one on a GPU
(skipped here); scripts/check_gpu_paths.py does the same on the full-size model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize_lora_b

from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.decoding import StaticDecoder, bucket_sizes, sampling_noise
from trainer.models.lora import LoraSettings, apply_lora

TOY = EnvSettings("none", False, "toy")


def make_policy(name="tiny", lora=False, dtype=torch.float32, device="cpu") -> VLAPolicy:
    model, tokenizer = load_model_and_tokenizer(name, seed=0, dtype=dtype)
    if lora:
        model = apply_lora(model, LoraSettings(rank=4, include_lm_head=True))
        randomize_lora_b(model)
    return VLAPolicy(model, tokenizer, TOY, value_head=True).to(device).eval()


def test_gumbel_max_samples_the_softmax():
    logits = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(0)) * 2
    draws = 100_000
    noise = sampling_noise(torch.Generator().manual_seed(1), (draws, 1, 256))
    choice, log_probs = VLAPolicy._choose(logits.expand(draws, 1, 256), torch.zeros(draws, dtype=torch.bool), 1.3,
                                          noise)
    probabilities = torch.softmax(logits[0, 0] / 1.3, -1)

    def total_variation(samples, p):
        return 0.5 * float((torch.bincount(samples.flatten(), minlength=256).float() / draws - p).abs().sum())

    # as close to the softmax as torch.multinomial's own samples of the same size, and far from another temperature
    reference = total_variation(torch.multinomial(probabilities, draws, replacement=True,
                                                  generator=torch.Generator().manual_seed(2)), probabilities)
    assert total_variation(choice, probabilities) < 1.5 * reference + 0.003
    assert total_variation(choice, torch.softmax(logits[0, 0] / 1.5, -1)) > 3 * reference
    torch.testing.assert_close(log_probs[:, 0], torch.log(probabilities)[choice[:, 0]])
    # greedy rows ignore the noise
    greedy, _ = VLAPolicy._choose(logits.expand(4, 1, 256), torch.ones(4, dtype=torch.bool), 1.0, noise[:4])
    assert (greedy == logits.argmax(-1)).all()


def test_noise_is_finite_and_reproducible():
    a = sampling_noise(torch.Generator().manual_seed(3), (1000, 256))
    b = sampling_noise(torch.Generator().manual_seed(3), (1000, 256))
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.min() > -5 and a.max() < 17
    assert abs(float(a.mean()) - 0.5772) < 0.01  # the Euler-Mascheroni constant, Gumbel's mean
    # exactly -log(-log(u)) of the stream's uniforms (in float64: within float32 rounding), u clamped above zero
    uniform = torch.rand((1000, 256), generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    expected = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
    assert a.dtype == torch.float32 and a.shape == (1000, 256)
    torch.testing.assert_close(a.double(), expected, rtol=2e-6, atol=2e-6)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("lora", [False, True])
def test_static_decoder_gives_the_dynamic_cache_tokens_and_log_probs(lora, toy_observations):
    policy = make_policy(lora=lora)
    decoder = policy.static_decoder(4)
    assert isinstance(decoder, StaticDecoder) and decoder.buckets == [1, 2, 4]
    starts = []
    original_start = decoder.start
    decoder.start = lambda out, batch: starts.append(batch) or original_start(out, batch)
    generator = torch.Generator().manual_seed(0)
    # batches of 3 (padded to the bucket of 4), 1, 2 and 4 rows, in that order: rows a smaller batch leaves in the
    # buffers must not leak into it; prompts of different lengths (the toy observations') are left-padded
    observations = toy_observations + toy_observations[:1]
    for rows in (3, 1, 2, 4):
        inputs = policy.prepare(observations[:rows])
        noise = policy.sampling_noise(rows, generator)
        for greedy in (True, False, torch.arange(rows) % 2 == 0):
            dynamic = policy.act(inputs, greedy=greedy, temperature=1.5, noise=noise)
            static = policy.act(inputs, greedy=greedy, temperature=1.5, noise=noise, decoder=decoder)
            assert torch.equal(static.token_ids, dynamic.token_ids)
            torch.testing.assert_close(static.log_probs, dynamic.log_probs, rtol=0, atol=1e-5)
            torch.testing.assert_close(static.values, dynamic.values, rtol=0, atol=0)  # from the same prefill
            np.testing.assert_array_equal(static.env_actions, dynamic.env_actions)
    assert starts == [3] * 3 + [1] * 3 + [2] * 3 + [4] * 3
    # the sampled rows did sample (not all argmax)
    assert not torch.equal(policy.act(inputs, noise=noise, temperature=1.5).token_ids,
                           policy.act(inputs, greedy=True).token_ids)


def test_static_decoder_in_bf16_with_fp32_adapters_under_autocast(toy_observations):
    """The training set-up: bf16 base, fp32 LoRA computing under autocast. Same tokens as the dynamic cache."""
    policy = make_policy(lora=True, dtype=torch.bfloat16)
    assert policy.adapter_compute_dtype == torch.bfloat16
    inputs = policy.prepare(toy_observations)
    noise = policy.sampling_noise(3, torch.Generator().manual_seed(2))
    dynamic = policy.act(inputs, noise=noise, temperature=1.2)
    static = policy.act(inputs, noise=noise, temperature=1.2, decoder=policy.static_decoder(3))
    assert torch.equal(static.token_ids, dynamic.token_ids)
    torch.testing.assert_close(static.log_probs, dynamic.log_probs, rtol=0, atol=2e-2)


def test_prompts_longer_than_the_decoder_fall_back_to_the_dynamic_cache(toy_observations):
    policy = make_policy()
    inputs = policy.prepare(toy_observations)
    decoder = policy.static_decoder(4, max_text_tokens=8)
    assert inputs.text_ids.shape[1] > 8 + 15  # longer than the decoder's room, even rounded up to 16 slots
    assert not decoder.fits(3, 1 + 16 + inputs.text_ids.shape[1])
    decoder.start = lambda *args: pytest.fail("a prompt that does not fit must not use the static cache")
    reference = policy.act(inputs, greedy=True)
    with pytest.warns(UserWarning, match="does not fit the static decoder"):
        assert torch.equal(policy.act(inputs, greedy=True, decoder=decoder).token_ids, reference.token_ids)
    policy.act(inputs, greedy=True, decoder=decoder)
    assert decoder.fallbacks == 2  # counted (the benchmark reports it), warned once
    with pytest.raises(ValueError, match="does not fit"), torch.no_grad():
        StaticDecoder.start(decoder, policy(inputs, use_cache=True), 3)


def test_a_decoder_built_in_another_weight_state_is_refused(toy_observations):
    policy = make_policy(lora=True)
    inputs = policy.prepare(toy_observations)
    unmerged = policy.static_decoder(4)
    with policy.merged_adapters():
        with pytest.raises(RuntimeError, match="another model or weight state"):
            policy.act(inputs, greedy=True, decoder=unmerged)
        merged = policy.static_decoder(4)
        inside = policy.act(inputs, greedy=True, decoder=merged)
    with pytest.raises(RuntimeError, match="another model or weight state"):
        policy.act(inputs, greedy=True, decoder=merged)
    assert torch.equal(inside.token_ids, policy.act(inputs, greedy=True, decoder=policy.static_decoder(4)).token_ids)


def test_oft_has_no_decoding_steps_and_noise_is_checked(toy_observations):
    policy = make_policy("tiny-oft")
    assert policy.static_decoder(4) is None
    inputs = policy.prepare(toy_observations)
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.act(inputs, noise=torch.zeros(3, 7, 256))
    noise = policy.sampling_noise(3, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 56, 256)
    # per-row noise: a row's tokens depend on its own noise only
    alone = policy.act(inputs.select(slice(1, 2)), noise=noise[1:2])
    assert torch.equal(policy.act(inputs, noise=noise).token_ids[1], alone.token_ids[0])


# --- CUDA graphs (GPU only) ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("dtype, lora", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_graph_replays_give_the_eager_steps_tokens(dtype, lora, toy_observations):
    policy = make_policy(lora=lora, dtype=dtype, device="cuda")
    eager, graphs = policy.static_decoder(4), policy.static_decoder(4, graphs=True)
    generator = torch.Generator().manual_seed(0)
    observations = toy_observations + toy_observations[:1]
    for rows in (3, 1, 4, 3):
        inputs = policy.prepare(observations[:rows])
        noise = policy.sampling_noise(rows, generator)
        a = policy.act(inputs, noise=noise, temperature=1.5, decoder=eager)
        b = policy.act(inputs, noise=noise, temperature=1.5, decoder=graphs)
        if dtype == torch.float32:
            assert torch.equal(a.token_ids, b.token_ids)
            torch.testing.assert_close(b.log_probs, a.log_probs, rtol=0, atol=1e-5)
            assert torch.equal(a.token_ids, policy.act(inputs, noise=noise, temperature=1.5).token_ids)
        else:  # the same kernels replayed; a rare bf16 near-tie may round either way
            assert (a.token_ids == b.token_ids).float().mean() >= 0.95
            torch.testing.assert_close(b.log_probs, a.log_probs, rtol=0, atol=5e-2)
    assert graphs.capture_error is None and sorted(graphs._graphs) == [1, 4]


@cuda
def test_graphs_read_the_live_weights(toy_observations):
    """A graph replays with the weights as they are now (an optimizer step between rollouts updates them in place)."""
    policy = make_policy(lora=True, device="cuda")
    decoder = policy.static_decoder(4, graphs=True)
    inputs = policy.prepare(toy_observations)
    before = policy.act(inputs, greedy=True, decoder=decoder)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    after = policy.act(inputs, greedy=True, decoder=decoder)
    assert torch.equal(after.token_ids, policy.act(inputs, greedy=True).token_ids)
    assert not torch.equal(after.log_probs, before.log_probs)
