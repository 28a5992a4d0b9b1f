"""The policy API: batched acting and evaluation, agreement between them, sampling, OFT chunks, values."""

import numpy as np
import pytest
import torch

from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.processor import pixel_values


def make_policy(name="tiny", value_head=True, env=EnvSettings("none", False, "toy")):
    model, tokenizer = load_model_and_tokenizer(name, seed=0)
    return VLAPolicy(model, tokenizer, env, value_head=value_head).eval()


@pytest.mark.parametrize("name, tokens, chunk", [("tiny", 7, 1), ("tiny-oft", 56, 8)])
def test_act_shapes_and_ranges(name, tokens, chunk, toy_observations):
    policy = make_policy(name)
    inputs = policy.prepare(toy_observations)
    assert inputs.images.shape == (3, policy.config.num_images, 32, 32, 3)
    assert inputs.text_mask.sum(1).tolist() == [len(policy.prompt_ids(o.instruction)) for o in toy_observations]
    result = policy.act(inputs, greedy=False, temperature=1.0)
    assert result.token_ids.shape == (3, tokens) and result.log_probs.shape == (3, tokens)
    assert result.env_actions.shape == (3, chunk, 7)
    assert ((result.token_ids >= 256) & (result.token_ids < 512)).all()  # only action tokens are ever sampled
    assert (result.log_probs <= 0).all()
    assert result.values.shape == (3,)
    # toy stats are identity bounds: env actions are the bin centres of the tokens (OFT adds 1e-8 to the range)
    centres = policy.action_tokenizer.decode(result.token_ids).reshape(3, chunk, 7)
    np.testing.assert_allclose(result.env_actions, centres, atol=1e-7)


def test_prompt_ends_with_the_space_token():
    policy = make_policy()
    ids = policy.prompt_ids("Move to the red target")
    assert ids[-1] == policy.config.trainer.space_token_id == 3
    assert ids[0] != policy.tokenizer.bos_token_id
    assert policy.tokenizer.decode(ids).strip().startswith("In: What action should the robot take to move to the red")


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_evaluate_reproduces_rollout_log_probs_in_one_batched_forward(name, toy_observations):
    policy = make_policy(name)
    inputs = policy.prepare(toy_observations)
    result = policy.act(inputs, greedy=False, temperature=1.6, generator=torch.Generator().manual_seed(1))
    calls = []
    hook = policy.vla.register_forward_hook(lambda *a: calls.append(1))
    evaluated = policy.evaluate(inputs, result.token_ids, temperature=1.6)
    hook.remove()
    assert len(calls) == 1  # one batched forward, no per-sample loop
    torch.testing.assert_close(evaluated.log_probs, result.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(evaluated.values, result.values)
    assert evaluated.entropy.shape == result.log_probs.shape
    assert (evaluated.entropy > 0).all() and (evaluated.entropy <= np.log(256) + 1e-4).all()
    assert evaluated.log_probs.requires_grad


def test_batched_act_equals_one_at_a_time(toy_observations):
    policy = make_policy("tiny")
    batched = policy.act(policy.prepare(toy_observations), greedy=True)
    for i, obs in enumerate(toy_observations):
        single = policy.act(policy.prepare([obs]), greedy=True)
        assert torch.equal(single.token_ids[0], batched.token_ids[i])
        torch.testing.assert_close(single.log_probs[0], batched.log_probs[i], atol=1e-5, rtol=1e-5)


def test_standard_openvla_decodes_with_one_prefill_and_cached_steps(toy_observations):
    policy = make_policy("tiny")
    lengths = []
    hook = policy.vla.language_model.model.register_forward_hook(
        lambda m, args, kwargs, out: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    policy.act(policy.prepare(toy_observations))
    hook.remove()
    assert lengths[1:] == [1] * 6 and lengths[0] > 16  # prefill, then 6 single-token steps


def _rough_action_rows(policy) -> None:
    """The tiny presets' action rows are smooth in the action value (neighbouring bins' logits nearly tie, so a
    near-zero temperature may pick either); random rows give every bin its own logit, as this test needs."""
    with torch.no_grad():
        head = policy.base_model.language_model.lm_head.weight
        first = policy.action_tokenizer.first_action_id
        head[first: first + 256] = torch.randn(256, head.shape[1], generator=torch.Generator().manual_seed(0)) * 0.5


def test_greedy_is_argmax_and_sampling_follows_temperature(toy_observations):
    policy = make_policy("tiny-oft")
    _rough_action_rows(policy)
    inputs = policy.prepare(toy_observations[:1])
    greedy = policy.act(inputs, greedy=True)
    logits = policy.evaluate(inputs, greedy.token_ids).logits
    assert torch.equal(greedy.token_ids - 256, logits.argmax(-1))
    cold = policy.act(inputs, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold.token_ids, greedy.token_ids)
    assert (cold.log_probs > -1e-3).all()  # a near-zero temperature puts all mass on the argmax
    hot = policy.act(inputs, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert (hot.token_ids == greedy.token_ids).float().mean() < 0.2
    # at temperature T the log-prob of the argmax token is log_softmax(logits / T)
    expected = torch.log_softmax(logits / 5.0, -1).gather(-1, (greedy.token_ids - 256)[..., None])[..., 0]
    torch.testing.assert_close(policy.evaluate(inputs, greedy.token_ids, temperature=5.0).log_probs, expected)
    with pytest.raises(ValueError, match="temperature"):
        policy.act(inputs, temperature=0.0)


def test_per_sample_greedy_mask(toy_observations):
    policy = make_policy("tiny-oft")
    inputs = policy.prepare(toy_observations)
    greedy = policy.act(inputs, greedy=True)
    mixed = policy.act(inputs, greedy=torch.tensor([True, False, True]), temperature=5.0,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed.token_ids[[0, 2]], greedy.token_ids[[0, 2]])
    assert not torch.equal(mixed.token_ids[1], greedy.token_ids[1])


def test_oft_l1_head_actions(toy_observations):
    policy = make_policy("tiny-oft")
    result = policy.act(policy.prepare(toy_observations), greedy=True, use_l1_head=True)
    assert result.normalized_actions.shape == (3, 8, 7)
    assert not np.allclose(result.normalized_actions, policy.action_tokenizer.decode(result.token_ids).reshape(3, 8, 7))


def test_libero_settings_binarise_and_invert_the_gripper(toy_observations):
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    model.config.norm_stats = {"libero_spatial_no_noops": {"action": stats, "proprio": {"q01": [0] * 8, "q99": [1] * 8}}}
    policy = VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_spatial")).eval()
    assert policy.unnorm_key == "libero_spatial_no_noops"
    frames = [np.zeros((256, 256, 3), dtype=np.uint8)]
    from trainer.envs.base import Observation

    obs = Observation(frames[0], frames[0], np.zeros(8, np.float32), "pick up the bowl")
    inputs = policy.prepare([obs])
    assert inputs.images.shape == (1, 1, 32, 32, 3)
    result = policy.act(inputs, greedy=True)
    assert result.env_actions[0, 0, -1] in (-1.0, 1.0)
    assert result.env_actions[0, 0, -1] == -np.sign(2 * result.normalized_actions[0, 0, -1] - 1)


def test_act_decodes_with_the_kv_cache_even_in_training_mode_with_checkpointing(toy_observations):
    """transformers switches the cache off under gradient checkpointing in train mode; act must not be affected."""
    policy = make_policy("tiny")
    inputs = policy.prepare(toy_observations)
    reference = policy.act(inputs, greedy=True)
    policy.base_model.gradient_checkpointing_enable()
    policy.train()
    result = policy.act(inputs, greedy=True)
    assert policy.training  # restored
    assert torch.equal(result.token_ids, reference.token_ids)
    torch.testing.assert_close(result.log_probs, reference.log_probs)


# --- the official greedy decode (evaluation) ------------------------------------------------------------------------


def _official_openvla_greedy(model, pixel_values, prompt_ids, n_actions=7):
    """The official predict_action, re-typed from OPENVLA_SPEC §2 / §3 with plain HF calls (no KV cache, one sample):
    greedy generation over the whole vocabulary that stops at </s>, the last 7 ids of the sequence, id -> bin with
    clip(vocab - id - 1, 0, 254)."""
    language_model = model.language_model
    embed = language_model.get_input_embeddings()
    prefix = model._prefix_embeddings(pixel_values, None)
    generated = []
    for _ in range(n_actions):
        ids = torch.tensor([prompt_ids + generated])
        logits = language_model(inputs_embeds=torch.cat([prefix, embed(ids)], dim=1)).logits[0, -1]
        generated.append(int(logits.argmax()))
        if generated[-1] == model.config.trainer.stop_token_id:
            break
    last = np.array((prompt_ids + generated)[-n_actions:])
    return _official_bins(model.config, last)


def _official_oft_tokens(model, pixel_values, proprio, prompt_ids):
    """OFT's discrete path (OPENVLA_SPEC §4.3): [BOS, patches, proprio, prompt, 56 zero slots, </s>], bidirectional
    attention, logits at the 56 positions from the space token on, argmax over the whole vocabulary."""
    language_model = model.language_model
    embed = language_model.get_input_embeddings()
    slots = model.num_action_slots
    prefix = model._prefix_embeddings(pixel_values, proprio)
    sequence = torch.cat([prefix, embed(torch.tensor([prompt_ids])), torch.zeros(1, slots, prefix.shape[-1]),
                          embed(torch.tensor([[model.config.trainer.stop_token_id]]))], dim=1)
    no_mask = torch.zeros(1, 1, sequence.shape[1], sequence.shape[1])  # every token sees every token
    logits = language_model(inputs_embeds=sequence, attention_mask=no_mask).logits[0]
    start = prefix.shape[1] + len(prompt_ids) - 1  # the space token's position
    return _official_bins(model.config, logits[start: start + slots].argmax(-1).numpy())


def _official_bins(config, token_ids: np.ndarray) -> np.ndarray:
    bins = np.linspace(-1, 1, 256)
    centres = (bins[:-1] + bins[1:]) / 2
    vocab_size = config.text_config["vocab_size"] - config.pad_to_multiple_of
    return centres[np.clip(vocab_size - token_ids - 1, 0, 254)]


def _make_top_tokens_mixed(policy, inputs) -> None:
    """A random tiny model's top token is a non-action id almost everywhere. Scale the action rows of the output layer
    so that action tokens win, then let </s> (a non-action id) win where one particular action token would
    (OpenVLA), or at the positions whose hidden state points its way (OFT)."""
    with torch.no_grad():
        head = policy.base_model.language_model.lm_head.weight
        first = policy.action_tokenizer.first_action_id
        head[first: first + 256] *= 3.0
        stop = policy.config.trainer.stop_token_id
        if policy.config.is_oft:
            hidden = policy.base_model(pixel_values(inputs.images), inputs.text_ids, inputs.text_mask,
                                       proprio=inputs.proprio).action_hidden
            direction = hidden[0, 3] - hidden.mean((0, 1))  # slot 3 of sample 0, as it differs from the rest
            head[stop] = direction / direction.norm() * 40.0
        else:  # the action token that wins most often, on rows where different bins win at different positions
            _rough_action_rows(policy)
            head[first: first + 256] *= 3.0
            restricted = policy.act(inputs, greedy=True)
            winner = int(restricted.token_ids[:, 0].mode().values)
            logit = policy.evaluate(inputs, restricted.token_ids).logits[:, 0, winner - first].mean()
            head[stop] = head[winner] * (1.02 if logit > 0 else 0.98)  # a little above the winner's logit


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_official_greedy_equals_the_official_decode_when_the_top_token_is_not_an_action(name, toy_observations):
    policy = make_policy(name, value_head=False)
    observations = toy_observations * 3  # more positions; prompts of different lengths pad differently
    inputs = policy.prepare(observations)
    _make_top_tokens_mixed(policy, inputs)
    official = policy.act(inputs, greedy=True, official_greedy=True)
    restricted = policy.act(inputs, greedy=True)
    first = policy.action_tokenizer.first_action_id
    outside = (official.token_ids < first) | (official.token_ids >= first + 256)
    assert 0 < outside.float().mean() < 1, "the test needs top tokens both inside and outside the action ids"
    assert not np.allclose(official.normalized_actions, restricted.normalized_actions)
    model = policy.base_model
    pixel = pixel_values(inputs.images)
    for i in range(len(observations)):
        prompt = policy.prompt_ids(observations[i].instruction)
        if policy.config.is_oft:
            expected = _official_oft_tokens(model, pixel[i: i + 1], inputs.proprio[i: i + 1], prompt)
        else:
            expected = _official_openvla_greedy(model, pixel[i: i + 1], prompt)
        np.testing.assert_allclose(official.normalized_actions[i].reshape(-1), expected, atol=0, rtol=0)
    if not policy.config.is_oft:  # the early </s> path ran: some generation ended before its 7th token, so the
        # prompt's end (its last token is the space token) fills the front of those rows
        early = official.token_ids[:, -1] == policy.config.trainer.stop_token_id
        assert early.any() and (official.token_ids[early, 0] != policy.config.trainer.stop_token_id).all()
        assert (official.token_ids[early] == policy.config.trainer.space_token_id).any()
    # greedy log-probs are the whole-vocabulary ones; restricted greedy keeps the 256-way ones that training uses
    assert (official.log_probs <= 0).all() and torch.equal(restricted.token_ids - first,
                                                           policy.evaluate(inputs, restricted.token_ids).logits.argmax(-1))


def test_sampling_stays_on_action_ids_with_official_greedy(toy_observations):
    """Sampled steps (not greedy) of an evaluation batch are unaffected: 256-way, consistent with evaluate()."""
    policy = make_policy("tiny-oft", value_head=False)
    inputs = policy.prepare(toy_observations)
    _make_top_tokens_mixed(policy, inputs)
    mixed = policy.act(inputs, greedy=torch.tensor([True, False, False]), official_greedy=True, temperature=1.3,
                       generator=torch.Generator().manual_seed(0))
    first = policy.action_tokenizer.first_action_id
    sampled = mixed.token_ids[1:]
    assert ((sampled >= first) & (sampled < first + 256)).all()
    evaluated = policy.evaluate(inputs.select([1, 2]), sampled, temperature=1.3)
    torch.testing.assert_close(evaluated.log_probs, mixed.log_probs[1:], atol=1e-5, rtol=1e-5)
