"""SwiGLU feed-forward networks: a dense one, and a pool of experts any number of layers can call.

Shapes: M experts, F expert width, D hidden. Weights are [M, F, D] / [M, D, F] so that
sharding the pool over expert-parallel ranks is a slice of dimension 0.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..kernels import DeferredWeightGradients, autocast_dtype, grouped_swiglu, swiglu_activation
from ..kernels.grouped_gemm import expert_row_alignment
from ..parallel.expert_parallel import dispatch_to_experts, return_to_sources
from ..parallel.state import Group
from ..parallel.tensor_parallel import shard


class ExpertPool(nn.Module):
    """M experts; under expert parallelism this rank holds a contiguous 1/ep of them."""

    WEIGHTS = ("w_gate", "w_up", "w_down")

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float, output_std: float,
                 gemm: str = "auto", activation: str = "torch", wgrad_kernel: str = "torch"):
        super().__init__()
        self.num_experts = num_experts  # in the whole pool, whatever this rank holds
        self.gemm = gemm  # kernels.grouped_swiglu backend: auto | grouped_mm | loop | triton
        self.activation = activation  # kernels.swiglu backend: torch | triton
        self.wgrad_kernel = wgrad_kernel  # kernels.DeferredWeightGradients kernel: torch | triton
        self.ep_group: Group = None
        # inside `deferred_weight_gradients` only
        self._deferred: Optional[DeferredWeightGradients] = None
        self._compute_weights: Optional[tuple[torch.Tensor, ...]] = None
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size).normal_(0.0, init_std))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size).normal_(0.0, output_std))

    def shard_(self, rank: int, parts: int, group: Group) -> None:
        """Keep experts [rank * M/parts, (rank + 1) * M/parts); tokens for the others travel over `group`."""
        for name in self.WEIGHTS:
            full = getattr(self, name)  # a frozen pool stays frozen
            setattr(self, name, nn.Parameter(shard(full.data, 0, rank, parts), requires_grad=full.requires_grad))
        self.ep_group = group

    @contextlib.contextmanager
    def deferred_weight_gradients(self, anchor: torch.Tensor) -> Iterator[torch.Tensor]:
        """Within: every call computes with one shared copy of the weights, and their gradients are
        computed together, once per backward pass, when backward reaches the yielded tensor
        (`anchor`, wired); compute the calls from it.

        For a pool several layers share (model.pool_weight_gradients), per forward: one cast of the
        pool to the autocast dtype instead of one per layer (each also kept for backward), and one
        weight-gradient GEMM per expert over all the layers' tokens instead of a full-pool gradient
        per layer (kernels.DeferredWeightGradients). Backward only reads what forward stored, so
        recomputation (activation checkpointing) outside this context is unaffected.
        """
        weights = (self.w_gate, self.w_up, self.w_down)
        # the Triton expert GEMMs pad no rows, which torch._grouped_mm's weight-gradient GEMM would need
        if self.gemm == "triton":
            self._deferred = DeferredWeightGradients("triton", "model.expert_gemm")
        else:
            self._deferred = DeferredWeightGradients(self.wgrad_kernel)
        dtype = autocast_dtype(self.w_gate)
        self._compute_weights = tuple(w.detach().to(dtype) for w in weights)  # gradients come from the anchor
        try:
            yield self._deferred.attach(anchor, *weights)
        finally:
            self._deferred = self._compute_weights = None

    def row_alignment(self, dtype: torch.dtype, device: torch.device) -> int:
        """What each expert's number of input rows must be a multiple of (the expert GEMM's alignment, see
        `forward`); 1 under expert parallelism, whose exchange regroups the rows (the pool pads them after)."""
        if self.ep_group is not None:
            return 1
        return expert_row_alignment(self.gemm, dtype, device, self.w_gate, self.w_down)

    def forward(self, x_SD: torch.Tensor, counts_M: torch.Tensor, rows_aligned: bool = False) -> torch.Tensor:
        """Outputs for slots sorted by expert (counts_M over the whole pool), in the same order.
        `rows_aligned`: each expert's rows are padded to `row_alignment` already (zero rows), so the
        expert GEMM pads nothing itself."""
        weights = self._compute_weights or (self.w_gate, self.w_up, self.w_down)
        if self.ep_group is None:
            return grouped_swiglu(x_SD, counts_M, *weights, self.gemm, align_rows=1 if rows_aligned else None,
                                  deferred=self._deferred, activation=self.activation)
        x_local, exchange = dispatch_to_experts(x_SD, counts_M, self.ep_group)
        y_local = grouped_swiglu(x_local, exchange.local_counts, *weights, self.gemm, deferred=self._deferred,
                                 activation=self.activation)
        return return_to_sources(y_local, exchange)


class SwiGLU(nn.Module):
    """Dense LLaMA feed-forward: W2 (silu(W1 x) * W3 x); `activation` computes silu(.) * . (kernels.swiglu)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, output_std: float,
                 activation: str = "torch"):
        super().__init__()
        self.activation = activation
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        for w, std in ((self.w_gate, init_std), (self.w_up, init_std), (self.w_down, output_std)):
            nn.init.normal_(w.weight, 0.0, std)
        self.projection_input = nn.Identity()  # of w_gate and w_up: where tensor parallelism reduces its gradient

    def forward(self, x):
        x = self.projection_input(x)
        return self.w_down(swiglu_activation(self.w_gate(x), self.w_up(x), self.activation))
