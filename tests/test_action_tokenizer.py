import numpy as np
import pytest

from trainer.models.action_tokenizer import ActionTokenizer


@pytest.fixture
def tokenizer():
    return ActionTokenizer(base_vocab_size=32000)


def test_action_ids_are_the_last_256_of_the_base_vocabulary(tokenizer):
    assert tokenizer.first_action_id == 31744
    assert tokenizer.last_action_id == 31999
    assert tokenizer.bin_centers.shape == (255,)
    assert tokenizer.bin_centers[0] == pytest.approx(-1 + 1 / 255)
    assert tokenizer.bin_centers[-1] == pytest.approx(1 - 1 / 255)


def test_encode_exact_values(tokenizer):
    # digitize(-1) = 1 -> 31999; digitize(1) = 256 -> 31744; 0 sits in bin 128 -> 31872; clipping beyond [-1, 1].
    ids = tokenizer.encode(np.array([-1.0, 1.0, 0.0, -5.0, 5.0, -1 + 2 / 255 + 1e-9]))
    assert ids.tolist() == [31999, 31744, 31872, 31999, 31744, 31998]


def test_decode_exact_values(tokenizer):
    assert tokenizer.decode(np.array([31872]))[0] == pytest.approx(0.0, abs=1e-12)
    assert tokenizer.decode(np.array([31999]))[0] == pytest.approx(-1 + 1 / 255)
    # d = 256 and d = 255 share the last centre; non-action ids clip to the end bins.
    assert tokenizer.decode(np.array([31744, 31745, 100, 32050])).tolist() == pytest.approx(
        [1 - 1 / 255, 1 - 1 / 255, 1 - 1 / 255, -1 + 1 / 255])


def test_round_trip_within_half_a_bin(tokenizer):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(1000, 7))
    actions[0] = [-1, 1, 0, 0.5, -0.5, 1 - 1e-12, -1 + 1e-12]
    error = np.abs(tokenizer.decode(tokenizer.encode(actions)) - actions)
    half_bin = (2 / 255) / 2
    assert error.max() <= half_bin + 1e-12


def test_tiny_vocabulary():
    tiny = ActionTokenizer(base_vocab_size=512)
    assert (tiny.first_action_id, tiny.last_action_id) == (256, 511)
    with pytest.raises(ValueError, match="must exceed"):
        ActionTokenizer(base_vocab_size=100)
