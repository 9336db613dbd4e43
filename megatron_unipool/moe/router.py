"""Routers: per-layer scores over the experts of a pool, top-k selection and gates.

Shapes: T tokens, D hidden, M experts in the pool, k experts per token.
Routing runs in fp32 whatever the model precision: top-k and softmax are sensitive to rounding
(`moe.router_tf32` lets the logits GEMM alone round its inputs to TF32 on CUDA).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig
from ..kernels import tf32_linear

NORM_EPS = 1e-8
TRIM_QUANTILE = 0.999  # of the draws averaged into NormRouter's constant


@functools.lru_cache(maxsize=None)
def norm_router_constant(num_experts: int, top_k: int, samples: int = 100_000, seed: int = 0) -> float:
    """c = E[1 / ||top-k of relu(x / ||x||)||], x ~ N(0, I_M): selected scores have unit norm at init.

    1/||top-k|| has a divergent tail (a draw whose only positive entries are tiny), invisible for
    large M but dominant for small M, where the plain Monte-Carlo mean swings with the seed. We
    average all but the largest 0.1% of draws: within 0.01 of the design note's values for
    M >= 96 and stable for small M. Draws with no positive entry (probability 2^-M) are dropped;
    if all are, c falls back to 1.
    """
    generator = torch.Generator().manual_seed(seed)
    inverse_norms = []
    chunk = max(1, 2**22 // num_experts)
    for start in range(0, samples, chunk):
        x = torch.randn(min(chunk, samples - start), num_experts, generator=generator, dtype=torch.float64,
                        device="cpu")  # whatever the default device (meta, for shapes only; CUDA)
        y = torch.relu(x / x.norm(dim=-1, keepdim=True))
        norm = y.topk(min(top_k, num_experts), dim=-1).values.norm(dim=-1)
        inverse_norms.append(1.0 / norm[norm > 0])
    values = torch.cat(inverse_norms)
    if values.numel() == 0:
        return 1.0
    return values[values <= torch.quantile(values, TRIM_QUANTILE)].mean().item()


def norm_constant(config: MoEConfig, num_experts: int) -> float:
    """NormRouter's c for a pool of `num_experts`: moe.norm_router_c, else c(M, k) above."""
    return float(config.norm_router_c) if config.norm_router_c is not None else norm_router_constant(
        num_experts, config.top_k)


@dataclass
class Routing:
    """One layer's routing of T tokens."""

    indices_TK: torch.Tensor  # chosen experts
    gates_TK: torch.Tensor  # weights of their outputs
    scores_TM: torch.Tensor  # the P of the balancing losses: probabilities or router scores
    logits_TM: torch.Tensor  # raw router logits, for the z-loss
    active_TK: Optional[torch.Tensor] = None  # False for slots that carry no weight and count as routed nowhere


class Router(nn.Module):
    """Linear router into a pool of `num_experts`, with softmax, sigmoid or NormRouter scoring.

    `expert_bias` is the aux-loss-free balancing bias: it only shifts which experts are
    selected, never the gates, and is updated outside autograd after each optimizer step.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: MoEConfig, init_std: float, compile: bool = False):
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        # model.compile: from the logits on (scores, top-k, gates) one torch.compile graph, the fused router
        self._select = torch.compile(_select) if compile else _select
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size).normal_(0.0, init_std))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        if config.router == "norm":
            self.scale = nn.Parameter(torch.ones(1))  # shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes
            self.norm_constant = norm_constant(config, num_experts)

    def forward(self, x_TD: torch.Tensor, logit_offset_M: Optional[torch.Tensor] = None) -> Routing:
        """`logit_offset_M` (UniPool-lock) lowers, or with -inf removes, experts this layer may not use."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), logit_offset_M)

    def _route(self, x_TD: torch.Tensor, offset_M: Optional[torch.Tensor]) -> Routing:
        # the logits GEMM stays outside the compiled part: with moe.router_tf32 it switches a cuBLAS setting
        logits = (tf32_linear if self.config.router_tf32 else F.linear)(x_TD, self.weight.float())
        return Routing(*self._select(self, logits, offset_M))

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_M: torch.Tensor, usable_M: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

        `usable_M` (UniPool-lock) limits balancing to the experts this layer owns: the others get
        few or no tokens by design, and counting them would make every owned expert look
        over-loaded (no balancing among them) while their own bias climbed against the lock.
        """
        counts = tokens_per_expert_M.float()
        if usable_M is None:
            self.expert_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
            return
        mean = counts[usable_M].mean()
        self.expert_bias += self.config.bias_update_rate * torch.sign(mean - counts) * usable_M


def _select(router: Router, logits: torch.Tensor, offset_M: Optional[torch.Tensor]) -> tuple:
    """Scores, top-k and gates from the logits: Routing's fields. A function of the router, not its method,
    so that under model.compile one graph serves every layer's router and every copy of the model."""
    cfg, k = router.config, router.config.top_k
    raw_logits = logits  # the z-loss's, whatever the lock does to the ones routing reads (design note)
    if offset_M is not None and cfg.router != "norm":
        logits = logits + offset_M
    if cfg.router == "softmax":
        scores = logits.softmax(dim=-1)
    elif cfg.router == "sigmoid":
        scores = logits.sigmoid()
    else:
        if offset_M is not None:  # masked experts are zeroed before the norm (design note)
            logits = logits.masked_fill(torch.isneginf(offset_M), 0.0)
        scores = NormScores.apply(logits, router.scale.float(), router.norm_constant, offset_M)
    # fp32 whatever the module's dtype: top_k_indices orders fp32 values
    selection = scores + router.expert_bias.float() if cfg.bias_balancing else scores
    if cfg.router == "norm" and cfg.bias_balancing:  # the bias reorders the experts the ReLU kept: a
        selection = selection.masked_fill(scores == 0, -math.inf)  # zeroed one would take a slot, weightless
    if offset_M is not None:  # the penalty is in the scores already; a masked expert must also beat the bias
        selection = selection.masked_fill(torch.isneginf(offset_M), -math.inf)
    indices = top_k_indices(selection, k)
    if cfg.router == "softmax" and not cfg.softmax_before_topk:
        gates = logits.gather(-1, indices).softmax(dim=-1)
    else:
        gates = scores.gather(-1, indices)
        if cfg.normalize_gates and cfg.router != "norm":
            gates = gates / gates.sum(dim=-1, keepdim=True)
    balance_scores = scores / scores.sum(dim=-1, keepdim=True) if cfg.router == "sigmoid" else scores
    # NormRouter's ReLU zeroes experts; a token with fewer than k positive scores fills its remaining
    # slots with zero-gate experts. They must not skew the load counts or take capacity (plan_dispatch).
    active = gates > 0 if cfg.router == "norm" else None
    return indices, gates, balance_scores, raw_logits, active


class NormScores(torch.autograd.Function):
    """NormRouter's scores s = sigma * c * relu(z / (||z|| + eps) + offset) as one autograd node.

    The same function as the expression, whose autograd graph dispatches 21 operators in backward for
    each layer and micro-batch (16 of them kernel launches on a GPU, where small batches are host-bound)
    and keeps four [T, M] tensors; written out, backward dispatches 13 (10 launches) and keeps only the
    unit vector u = z / (||z|| + eps) and two norms per row. With g the gradient reaching relu's input
    (zero where it is not positive) and s_c = sigma * c:
    dz = s_c * (g / (||z|| + eps) - u * <g, u> / ||z||), dsigma = c * <g, relu(u + offset)>.
    `offset` (UniPool-lock) is added on the unit vector, so the penalty does not rescale the others.
    """

    @staticmethod
    def forward(ctx, logits_TM, scale, constant: float, offset_M):
        norm_T1 = torch.linalg.vector_norm(logits_TM, dim=-1, keepdim=True)
        length_T1 = norm_T1 + NORM_EPS
        unit_TM = logits_TM / length_T1
        scale_c = scale * constant
        ctx.constant = constant
        ctx.save_for_backward(unit_TM, norm_T1, length_T1, scale_c, *(() if offset_M is None else (offset_M,)))
        return torch.relu(unit_TM if offset_M is None else unit_TM + offset_M) * scale_c

    @staticmethod
    @torch.autograd.function.once_differentiable  # what backward saves has no graph: no second derivative
    def backward(ctx, grad_TM):
        unit_TM, norm_T1, length_T1, scale_c, *offset = ctx.saved_tensors
        relu_input = unit_TM + offset[0] if offset else unit_TM
        grad_TM = torch.ops.aten.threshold_backward(grad_TM, relu_input, 0)  # relu's backward
        along_unit_T1 = (grad_TM * unit_TM).sum(-1, keepdim=True)
        grad_scale = None
        if ctx.needs_input_grad[1]:  # <g, relu(u)> is <g, u> summed over the rows, g being 0 where u <= 0
            kept = (grad_TM * torch.relu(relu_input)).sum() if offset else along_unit_T1.sum()
            grad_scale = (kept * ctx.constant).reshape(scale_c.shape)
        # an all-zero row has u = 0 and <g, u> = 0: its gradient is 0, as autograd's norm makes it
        nonzero_norm_T1 = norm_T1.clamp_min(torch.finfo(norm_T1.dtype).tiny)
        grad_logits = torch.addcmul(grad_TM / length_T1, unit_TM, along_unit_T1 / nonzero_norm_T1,
                                    value=-1.0).mul_(scale_c)
        return grad_logits, grad_scale, None, None


def top_k_indices(selection_TM: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest per row, ties to the lower expert index. torch.topk leaves the order of ties
    unspecified (on CPU it splits ties between identical experts one way or another depending on
    the pool size); with ties broken by index routing is the same on every device, and after
    upcycling a source keeps the tokens it ties with its copies on, so their capacity is exactly its
    own. The same result as a stable descending sort, at a topk's cost plus a few elementwise ops
    (a sort was 18x topk on CPU at 160 experts), with no host sync: top-k of one int64 key per
    entry, the float's order-preserving integer (IEEE bits, negatives' magnitude bits flipped) times
    M plus (M - 1 - index)."""
    num_experts = selection_TM.shape[-1]
    bits = (selection_TM.float() + 0.0).view(torch.int32).long()  # + 0.0: -0 becomes +0, as equal floats tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    lower_first = torch.arange(num_experts - 1, -1, -1, device=selection_TM.device)
    return torch.add(lower_first, ordered, alpha=num_experts).topk(k, dim=-1).indices


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None) -> int | None:
    """Slots per expert in capacity mode, ceil(C * T * k / M); None when dropless."""
    if factor is None:
        return None
    # exact for the decimal a config gives: 1.1 * 100 / 11 is 10 slots, not ceil(10.000000000000002)
    return math.ceil(Fraction(str(factor)) * num_tokens * top_k / num_experts)
