"""The OpenVLA checkpoint config (config.json), its presets, and what we add for OFT and tiny models.

The fields mirror the released `openvla/openvla-7b` config.json (OPENVLA_SPEC §1.1). What the released file does not
say (OFT inputs, tiny widths) lives under the extra key ``"trainer"``; a checkpoint without it gets the defaults of the
real model, so a downloaded openvla-7b directory loads as is.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

OPENVLA_TIMM_IDS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
LLAMA2_SPACE_TOKEN = 29871  # SentencePiece "▁": OpenVLA appends it after "Out:" before the action tokens
LLAMA2_STOP_TOKEN = 2


@dataclass
class OFTConfig:
    """OpenVLA-OFT inputs and outputs (OPENVLA_SPEC §4): parallel decoding of a whole action chunk."""

    num_images: int = 2  # primary (agentview) + wrist
    use_proprio: bool = True
    proprio_dim: int = 8
    chunk_size: int = 8
    use_l1_head: bool = True  # continuous actions from the MLPResNet head (greedy evaluation); RL uses the tokens
    # </s> after the action slots, as OpenVLA-OFT trains and evaluates; RLinf's OFT port (and the checkpoints it
    # RL-trains) leaves it out.
    stop_token: bool = True
    # Set once this trainer fine-tunes the model (RL on the action tokens; saved with exports): greedy evaluation
    # then decodes the tokens it was trained on by default, not the L1 head of the release it started from.
    trained_on_tokens: bool = False


@dataclass
class TrainerExtras:
    """What config.json of the released checkpoints does not carry."""

    family: str = "openvla"  # "openvla" (7 tokens, KV-cache decoding) or "oft" (one forward per chunk)
    # Overrides passed to timm.create_model for each vision tower (tiny presets shrink the towers here).
    timm_model_kwargs: list[dict] = field(default_factory=lambda: [{}, {}])
    space_token_id: int = LLAMA2_SPACE_TOKEN
    stop_token_id: int = LLAMA2_STOP_TOKEN
    action_dim: int = 7
    oft: OFTConfig | None = None


@dataclass
class VLAConfig:
    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool = True
    image_resize_strategy: str = "resize-naive"
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    timm_model_ids: list[str] = field(default_factory=lambda: list(OPENVLA_TIMM_IDS))
    timm_override_act_layers: list = field(default_factory=lambda: [None, None])
    hf_llm_id: str = "meta-llama/Llama-2-7b-hf"
    llm_max_length: int = 2048
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    output_projector_states: bool = False
    n_action_bins: int = 256
    norm_stats: dict | None = None
    # Only what differs from transformers' LlamaConfig defaults, as the released file stores it.
    text_config: dict = field(
        default_factory=lambda: {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16",
                                 "vocab_size": 32064}
    )
    model_type: str = "openvla"
    trainer: TrainerExtras = field(default_factory=TrainerExtras)
    # Where norm_stats came from, for the model summary (not written to config.json): "config.json",
    # "dataset_statistics.json" (which replaces config.json's, as the official loaders do), or a preset's own.
    norm_stats_source: str = field(default="preset", compare=False)

    @property
    def image_size(self) -> int:
        return self.image_sizes[0]

    @property
    def base_vocab_size(self) -> int:
        """The tokenizer's vocabulary before <PAD> and padding rows (32000 for Llama-2); action ids end here."""
        return self.text_config["vocab_size"] - self.pad_to_multiple_of

    @property
    def is_oft(self) -> bool:
        return self.trainer.family == "oft"

    @property
    def num_images(self) -> int:
        return self.trainer.oft.num_images if self.is_oft else 1

    # --- config.json round trip -----------------------------------------------------------------------------------

    def to_json_dict(self) -> dict:
        data = asdict(self)
        data.pop("norm_stats_source")
        data["architectures"] = ["OpenVLAForActionPrediction"]
        data["torch_dtype"] = "bfloat16"
        return data

    @classmethod
    def from_json_dict(cls, data: dict) -> VLAConfig:
        data = dict(data)
        known = {f for f in cls.__dataclass_fields__}
        extras = data.pop("trainer", None) or {}
        oft = extras.pop("oft", None)
        trainer = TrainerExtras(**extras, oft=OFTConfig(**oft) if oft else None)
        kwargs = {k: v for k, v in data.items() if k in known and k not in ("trainer", "norm_stats_source")}
        config = cls(**kwargs, trainer=trainer)
        if config.trainer.family not in ("openvla", "oft"):
            raise ValueError(f"unknown model family {config.trainer.family!r}; expected 'openvla' or 'oft'")
        if config.is_oft and config.trainer.oft is None:
            config.trainer.oft = OFTConfig()
        return config

    def save(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps(self.to_json_dict(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> VLAConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {directory}")
        config = cls.from_json_dict(json.loads(path.read_text()))
        config.norm_stats_source = "config.json"
        return config

    def as_oft(self, oft: OFTConfig | None = None) -> VLAConfig:
        """The same backbone read as OpenVLA-OFT (OFT checkpoints keep openvla-7b's config.json)."""
        config = copy.deepcopy(self)
        config.trainer.family = "oft"
        config.trainer.oft = oft or OFTConfig()
        return config


# --- presets ---------------------------------------------------------------------------------------------------------

TINY_BASE_VOCAB = 512  # tiny tokenizer: specials + characters + filler; the last 256 ids are the action tokens
TINY_IMAGE_SIZE = 32
TINY_HIDDEN_SIZE = 64
# Random init of the tiny language model: std 1/sqrt(width). transformers' default 0.02 suits Llama-2-7B's width 4096
# (about 1.3/sqrt(4096)); at width 64 it made every block's output tiny next to the token's own embedding, so the
# random policy's hidden state at the action position hardly depended on the input (between-instruction spread 3% of
# its norm; the same greedy action for every instruction and image) and learning the instruction took ~1.5x as many
# steps (docs/learning.md).
TINY_INIT_STD = TINY_HIDDEN_SIZE**-0.5
TINY_TOY_NORM_STATS = {
    # The toy env takes actions in [-1, 1] directly: identity bounds; proprio is already in [-1, 1].
    "toy": {
        "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7},
        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
    }
}


def _tiny_config(family: str) -> VLAConfig:
    vit_common = {"img_size": TINY_IMAGE_SIZE, "patch_size": 8, "depth": 3, "num_heads": 2}
    config = VLAConfig(
        image_sizes=[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        pad_token_id=TINY_BASE_VOCAB,
        norm_stats=copy.deepcopy(TINY_TOY_NORM_STATS),
        text_config={
            "model_type": "llama", "pad_token_id": TINY_BASE_VOCAB, "torch_dtype": "float32",
            "vocab_size": TINY_BASE_VOCAB + 64, "hidden_size": TINY_HIDDEN_SIZE, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "initializer_range": TINY_INIT_STD,
        },
        trainer=TrainerExtras(
            family=family,
            timm_model_kwargs=[dict(vit_common, embed_dim=32), dict(vit_common, embed_dim=48)],
            space_token_id=3,  # "▁" in the tiny tokenizer (trainer.models.tokenizer)
            stop_token_id=2,
            oft=OFTConfig(use_l1_head=True) if family == "oft" else None,
        ),
    )
    return config


def preset(name: str) -> VLAConfig:
    if name == "openvla-7b":
        return VLAConfig()
    if name == "openvla-7b-oft":
        return VLAConfig().as_oft()
    if name == "tiny":
        return _tiny_config("openvla")
    if name == "tiny-oft":
        return _tiny_config("oft")
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


PRESETS = ("openvla-7b", "openvla-7b-oft", "tiny", "tiny-oft")
