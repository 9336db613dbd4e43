"""Rotary position embeddings in the rotate-half convention (as Hugging Face LLaMA), so
attention weights export without permutation."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import rotary


class RotaryEmbedding(nn.Module):
    """The cos / sin tables of every position up to `max_seq_len`, applied by `kernel`
    (model.rope_kernel: torch's ops or the Triton kernel)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float, kernel: str = "torch"):
        super().__init__()
        self.kernel = kernel
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x_BSHK: torch.Tensor) -> torch.Tensor:
        return rotary(x_BSHK, self.cos, self.sin, self.kernel)
