"""RL fine-tuning of OpenVLA / OpenVLA-OFT with LoRA on LIBERO."""

__version__ = "0.1.0"
