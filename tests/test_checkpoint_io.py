"""Save / load in the Hugging Face layout: bit-identical round trips and errors that name the problem."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer, load_vla, save_tiny_checkpoint
from trainer.models.loading import CheckpointError


def _policy(source, family=None):
    model, tokenizer = load_model_and_tokenizer(str(source), seed=7, family=family)
    return VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy")).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-oft"])
def test_saved_and_loaded_tiny_model_gives_bit_identical_outputs(tmp_path, name, toy_observations):
    save_tiny_checkpoint(tmp_path / "ckpt", name=name, seed=7, max_shard_size="300KB")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 2, files  # really sharded
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    if name == "tiny-oft":
        assert {"proprio_projector.safetensors", "action_head.safetensors"} <= set(files)
        assert not any(k.startswith(("proprio_projector", "action_head")) for k in index["weight_map"])

    original = _policy(name)
    loaded = _policy(tmp_path / "ckpt")
    for (ka, va), (kb, vb) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    inputs = original.prepare(toy_observations)
    assert torch.equal(inputs.text_ids, loaded.prepare(toy_observations).text_ids)  # the saved tokenizer agrees
    a = original.act(inputs, greedy=True)
    b = loaded.act(inputs, greedy=True)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.log_probs, b.log_probs)
    np.testing.assert_array_equal(a.env_actions, b.env_actions)


def test_config_json_keeps_the_released_fields(tmp_path):
    save_tiny_checkpoint(tmp_path, name="tiny")
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("norm_stats", "n_action_bins", "timm_model_ids", "text_config", "image_sizes", "pad_to_multiple_of",
                "use_fused_vision_backbone", "arch_specifier"):
        assert key in config
    assert config["model_type"] == "openvla"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vla(tmp_path / "nope")


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    save_tiny_checkpoint(tmp_path, name="tiny")
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("projector.fc2.bias")
    weights["projector.fc9.weight"] = torch.zeros(2)
    weights["projector.fc1.bias"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_vla(tmp_path, dtype=torch.float32)
    message = str(error.value)
    assert "missing tensor(s): projector.fc1.bias, projector.fc2.bias" in message
    assert "unexpected tensor(s): projector.fc9.weight" in message
    assert "projector.fc1.bias: checkpoint [3] vs model [320]" in message
    assert "Nothing was re-initialised" in message


def test_missing_shard_file_is_named(tmp_path):
    save_tiny_checkpoint(tmp_path, name="tiny", max_shard_size="300KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_vla(tmp_path)


def test_unknown_unnorm_key_lists_the_available_ones(tmp_path):
    save_tiny_checkpoint(tmp_path, name="tiny")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(KeyError, match=r"'libero_goal'.*available: \['toy'\]"):
        VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_goal"))


def test_oft_components_in_the_released_pt_form(tmp_path):
    """OFT ships the heads as DDP-saved torch files beside a plain openvla config.json; they load as OFT."""
    save_tiny_checkpoint(tmp_path, name="tiny-oft", seed=1)
    for component in ("proprio_projector", "action_head"):
        state = load_file(tmp_path / f"{component}.safetensors")
        torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / f"{component}--150000_checkpoint.pt")
        (tmp_path / f"{component}.safetensors").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config["trainer"]["family"] = "openvla"  # as released: nothing in config.json says OFT
    config["trainer"]["oft"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_vla(tmp_path, dtype=torch.float32, family="oft")
    reference, _ = load_model_and_tokenizer("tiny-oft", seed=1)
    for (ka, va), (kb, vb) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
