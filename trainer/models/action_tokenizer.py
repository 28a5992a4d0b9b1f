"""Discretised actions as the last vocabulary ids (OpenVLA's action tokenizer, re-derived from OPENVLA_SPEC §3).

Each of the 7 normalised action dimensions in [-1, 1] is binned with 256 uniform edges over [-1, 1]; bin d (1..256,
from ``np.digitize``) is written as the token ``base_vocab_size - d``. For the real model ``base_vocab_size`` is the
Llama tokenizer's 32000, so action tokens are ids 31744..31999. Decoding maps an id back to one of the 255 bin
centres (d = 256 and d = 255 share the last centre, exactly as the released checkpoints were trained).
"""

from __future__ import annotations

import numpy as np
import torch

N_BINS = 256


class ActionTokenizer:
    def __init__(self, base_vocab_size: int, n_bins: int = N_BINS):
        if base_vocab_size <= n_bins:
            raise ValueError(f"base_vocab_size ({base_vocab_size}) must exceed the number of bins ({n_bins})")
        self.base_vocab_size = base_vocab_size
        self.n_bins = n_bins
        self.bin_edges = np.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bin_edges[:-1] + self.bin_edges[1:]) / 2.0  # n_bins - 1 centres

    @property
    def first_action_id(self) -> int:
        """Smallest action token id (31744 for OpenVLA)."""
        return self.base_vocab_size - self.n_bins

    @property
    def last_action_id(self) -> int:
        return self.base_vocab_size - 1

    def encode(self, normalized_actions: np.ndarray) -> np.ndarray:
        """[..., D] actions in [-1, 1] (clipped) -> [..., D] int64 token ids."""
        clipped = np.clip(np.asarray(normalized_actions, dtype=np.float64), -1.0, 1.0)
        bins = np.digitize(clipped, self.bin_edges)  # 1..n_bins
        return (self.base_vocab_size - bins).astype(np.int64)

    def decode(self, token_ids) -> np.ndarray:
        """[..., D] token ids -> [..., D] bin centres in [-1, 1]. Non-action ids clip to the nearest end bin."""
        ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        index = np.clip(self.base_vocab_size - ids.astype(np.int64) - 1, 0, self.n_bins - 2)
        return self.bin_centers[index]

    # Sampling is restricted to the action vocabulary: the policy's distribution is over these n_bins logits,
    # so every sampled token maps to a bin and log-probs are comparable between rollout and update.
    def action_slice(self) -> slice:
        return slice(self.first_action_id, self.base_vocab_size)

    def local_to_token_ids(self, local_index: torch.Tensor) -> torch.Tensor:
        """Index into the action-logit slice (0..n_bins-1) -> vocabulary id."""
        return local_index + self.first_action_id

    def token_ids_to_local(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids - self.first_action_id
