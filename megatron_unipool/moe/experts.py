"""SwiGLU feed-forward networks: a dense one, and a pool of experts any number of layers can call.

Shapes: M experts, F expert width, D hidden. Weights are [M, F, D] / [M, D, F] so that
sharding the pool over expert-parallel ranks is a slice of dimension 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import grouped_swiglu


class ExpertPool(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float, output_std: float):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size).normal_(0.0, output_std))

    def forward(self, x_SD: torch.Tensor, counts_M: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_SD, counts_M, self.w_gate, self.w_up, self.w_down)


class SwiGLU(nn.Module):
    """Dense LLaMA feed-forward: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, output_std: float):
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        for w, std in ((self.w_gate, init_std), (self.w_up, init_std), (self.w_down, output_std)):
            nn.init.normal_(w.weight, 0.0, std)

    def forward(self, x):
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))
