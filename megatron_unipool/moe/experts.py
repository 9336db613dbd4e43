"""SwiGLU feed-forward networks: a dense one, and a pool of experts any number of layers can call.

Shapes: M experts, F expert width, D hidden. Weights are [M, F, D] / [M, D, F] so that
sharding the pool over expert-parallel ranks is a slice of dimension 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import grouped_swiglu
from ..parallel.expert_parallel import dispatch_to_experts, return_to_sources
from ..parallel.state import Group


class ExpertPool(nn.Module):
    """M experts; under expert parallelism this rank holds a contiguous 1/ep of them."""

    WEIGHTS = ("w_gate", "w_up", "w_down")

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float, output_std: float,
                 gemm: str = "auto"):
        super().__init__()
        self.num_experts = num_experts  # in the whole pool, whatever this rank holds
        self.gemm = gemm  # kernels.grouped_swiglu backend: auto | grouped_mm | loop
        self.ep_group: Group = None
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size).normal_(0.0, output_std))

    def shard_(self, rank: int, parts: int, group: Group) -> None:
        """Keep experts [rank * M/parts, (rank + 1) * M/parts); tokens for the others travel over `group`."""
        for name in self.WEIGHTS:
            setattr(self, name, nn.Parameter(getattr(self, name).data.chunk(parts)[rank].clone()))
        self.ep_group = group

    def forward(self, x_SD: torch.Tensor, counts_M: torch.Tensor) -> torch.Tensor:
        """Outputs for slots sorted by expert (counts_M over the whole pool), in the same order."""
        if self.ep_group is None:
            return grouped_swiglu(x_SD, counts_M, self.w_gate, self.w_up, self.w_down, self.gemm)
        x_local, exchange = dispatch_to_experts(x_SD, counts_M, self.ep_group)
        y_local = grouped_swiglu(x_local, exchange.local_counts, self.w_gate, self.w_up, self.w_down, self.gemm)
        return return_to_sources(y_local, exchange)


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
