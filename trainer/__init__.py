"""RL fine-tuning of OpenVLA / OpenVLA-OFT with LoRA on LIBERO."""

__version__ = "0.1.0"

from trainer.logging import silence_third_party_noise  # noqa: E402 -- before any third-party library is imported

silence_third_party_noise()
