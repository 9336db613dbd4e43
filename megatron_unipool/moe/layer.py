"""The MoE feed-forward block: route -> dispatch -> experts -> combine (+ shared expert).

Shapes: T tokens, D hidden, M experts in the pool, k experts per token.
The expert pool is NOT a submodule of the layer: the model owns it once and several layers
call it, so it appears once in parameters() and the state dict and autograd sums every
layer's contribution into the same gradient.

With `recompute_experts` the expert computation (permute, experts, combine, shared expert),
which holds the layer's largest activations ([slots, expert width] per projection), is
recomputed in backward; routing runs once, so statistics are recorded once per forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import MoEConfig
from ..kernels import autocast_dtype
from ..kernels.triton_support import wants_triton
from .balance import PoolStats
from .dispatch import DispatchPlan, expert_rows, permute, plan_dispatch, unpermute
from .experts import ExpertPool, SwiGLU
from .lock import PoolLock
from .losses import cardinality_entropy_loss, load_balancing_loss, z_loss
from .router import Router, Routing, capacity


class MoELayer(nn.Module):
    def __init__(self, config: MoEConfig, hidden_size: int, pool: ExpertPool, stats: PoolStats, layer_slot: int,
                 layers_in_pool: int, init_std: float, output_std: float, recompute_experts: bool = False,
                 lock: Optional[PoolLock] = None, permute_kernel: str = "torch", compile_router: bool = False):
        super().__init__()
        self.permute_kernel = permute_kernel  # moe.dispatch's permute and unpermute: torch | triton
        object.__setattr__(self, "lock", lock)  # shared with the pool's other layers, owned by the model
        self.config = config
        self.recompute_experts = recompute_experts
        self.router = Router(hidden_size, pool.num_experts, config, init_std, compile_router)
        object.__setattr__(self, "pool", pool)  # shared, owned by the model
        object.__setattr__(self, "stats", stats)
        self.layer_slot = layer_slot
        self.layers_in_pool = layers_in_pool
        self.shared_expert = (
            SwiGLU(hidden_size, config.shared_expert_ffn_hidden_size, init_std, output_std, pool.activation)
            if config.shared_expert_ffn_hidden_size
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing, plan, losses = self.route(x_TD)
        if self.recompute_experts and torch.is_grad_enabled():
            out_TD = checkpoint(self._experts, x_TD, routing.gates_TK, plan, use_reentrant=False)
        else:
            out_TD = self._experts(x_TD, routing.gates_TK, plan)
        return out_TD.view_as(x), losses

    def route(self, x_TD: torch.Tensor) -> tuple[Routing, DispatchPlan, dict[str, torch.Tensor]]:
        """The routing half of the layer: scores, top-k and gates, the dispatch plan and the balancing
        losses (the layer's counts recorded when training). benchmarks/moe_layer.py times it alone."""
        cfg = self.config
        num_tokens, num_experts = x_TD.shape[0], self.pool.num_experts
        routing = self.router(x_TD, self.lock.logit_offset(self.layer_slot) if self.lock is not None else None)
        reachable = num_experts
        if self.lock is not None and cfg.capacity_factor is not None:  # a hard-locked layer spreads over its own
            reachable = self.lock.reachable_experts(self.layer_slot)
        slots = capacity(num_tokens, cfg.top_k, reachable, cfg.capacity_factor)
        plan = plan_dispatch(routing.indices_TK, num_experts, slots, routing.active_TK)
        if self.training:
            self.stats.record(self.layer_slot, plan.routed_per_expert_M, plan.dropped, num_tokens * cfg.top_k)
        return routing, plan, self._losses(routing, plan.routed_per_expert_M, num_tokens)

    def _experts(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # the experts compute in the autocast dtype: the tokens are cast as they are permuted, so that the
        # copies and the expert-parallel all-to-all move bf16 rows, not fp32 ones (their gradients likewise)
        dtype, rows = autocast_dtype(x_TD), None
        if wants_triton(self.permute_kernel, x_TD, "model.permute_kernel"):  # straight into the GEMM's padded layout
            rows = expert_rows(plan, *gates_TK.shape, self.pool.row_alignment(dtype, x_TD.device))
        counts_M = plan.kept_per_expert_M if rows is None else rows.counts_M
        y = self.pool(permute(x_TD, plan, dtype, rows), counts_M, rows_aligned=rows is not None)
        out_TD = unpermute(y, gates_TK, plan, x_TD.shape[0], rows)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        return out_TD

    def _losses(self, routing, routed_M: torch.Tensor, num_tokens: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        losses = {}
        if cfg.aux_loss == "layer":
            load = torch.div(routed_M, max(num_tokens * cfg.top_k, 1))  # true division: fp32, one operator
            losses["aux_loss"] = load_balancing_loss(routing.scores_TM, load, cfg.aux_loss_coeff)
        elif cfg.aux_loss == "pool":
            losses["aux_loss"] = load_balancing_loss(routing.scores_TM, self.stats.f_bar(), cfg.aux_loss_coeff
                                                     ) / self.layers_in_pool
        if cfg.z_loss_coeff > 0:
            losses["z_loss"] = z_loss(routing.logits_TM, cfg.z_loss_coeff)
        if cfg.lock_entropy_coeff > 0:
            target = self.pool.num_experts / self.layers_in_pool
            losses["entropy_loss"] = (  # coeff * (H_l - log K)^2 / L: the model's sum is the layers' mean
                cardinality_entropy_loss(routing.scores_TM, target, cfg.lock_entropy_coeff) / self.layers_in_pool)
        return losses
