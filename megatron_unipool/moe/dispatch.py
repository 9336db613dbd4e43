"""Token permutation: sort routing slots by expert, drop over capacity, scatter results back.

Shapes: T tokens, k slots per token, M experts, S kept slots (S = T*k when dropless), D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.combine import combine_backward, combine_forward
from ..kernels.triton_support import wants_triton


@dataclass
class DispatchPlan:
    token_S: torch.Tensor  # source token of each kept slot, grouped by expert
    slot_S: torch.Tensor  # its position in the flattened [T*k] routing, to find its gate
    kept_per_expert_M: torch.Tensor  # slots each expert computes
    routed_per_expert_M: torch.Tensor  # slots routed to each expert before any drop
    dropped: int


def plan_dispatch(
    indices_TK: torch.Tensor, num_experts: int, capacity: int | None, active_TK: torch.Tensor | None = None
) -> DispatchPlan:
    """Group slots by expert (stable, so within an expert earlier tokens come first and win capacity).

    Inactive slots (`active_TK` False: NormRouter gates of 0) are never counted as routed or dropped.
    Under a capacity they are not dispatched either: they would take an expert's capacity. Dropless,
    they are computed on the expert top-k picked for them (their output and every gradient through
    them are exact zeros): cutting them off would give the slots a data-dependent count, which the
    host would have to read back from the device in every MoE layer's forward.
    """
    k = indices_TK.shape[1]
    experts = indices_TK.reshape(-1)
    if capacity is None:
        slot = torch.argsort(experts, stable=True)
        kept = _counts(experts, num_experts)
        routed = kept if active_TK is None else _counts(experts, num_experts, active_TK.reshape(-1))
        return DispatchPlan(slot // k, slot, kept, routed, 0)
    if active_TK is not None:
        experts = torch.where(active_TK.reshape(-1), experts, num_experts)  # sorts after every real expert
    slot = torch.argsort(experts, stable=True)
    routed = _counts(experts, num_experts + 1)
    if active_TK is not None:  # the inactive slots sort last: cut them off (this reads their count on the host)
        slot = slot[: slot.numel() - int(routed[num_experts])]
    routed = routed[:num_experts]
    sorted_experts = experts[slot]
    first_slot_of_expert = torch.cumsum(routed, 0) - routed
    rank_in_expert = torch.arange(slot.numel(), device=slot.device) - first_slot_of_expert[sorted_experts]
    keep = rank_in_expert < capacity
    slot = slot[keep]
    kept = routed.clamp(max=capacity)
    return DispatchPlan(slot // k, slot, kept, routed, int(keep.numel() - slot.numel()))


def _counts(experts: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Slots per expert, counted without reading anything back to the host (CUDA bincount reads the
    largest index first); `weights` (bool) counts only the slots it marks."""
    ones = torch.ones_like(experts) if weights is None else weights.to(experts.dtype)
    return torch.zeros(num_experts, dtype=torch.long, device=experts.device).index_add_(0, experts, ones)


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Copy each kept slot's token row; backward scatter-adds (index_select's index_add, not the
    sort-based index_put that advanced indexing `x[idx]` runs in backward)."""
    return x_TD.index_select(0, plan.token_S)


class _Combine(torch.autograd.Function):
    """out[t] = sum over slots s of token t: gate[s] * y[s], as one op.

    Backward gathers the output gradient once per slot and derives both input gradients from it
    (grad_y = gate * g, grad_gate = <g, y>); autograd on the unfused expression would also keep
    the weighted [S, D] copy alive until the scatter. With `row_TK` (each token's rows of y) the
    Triton kernels of kernels/combine.py do each direction in one pass.
    """

    @staticmethod
    def forward(ctx, y_SD, gate_S, token_S, row_TK, num_tokens: int):
        ctx.save_for_backward(y_SD, gate_S, token_S)
        ctx.fused = row_TK is not None
        if ctx.fused:
            return combine_forward(y_SD, gate_S, row_TK)
        weighted = y_SD * gate_S.unsqueeze(-1).to(y_SD.dtype)
        return y_SD.new_zeros(num_tokens, y_SD.shape[-1]).index_add_(0, token_S, weighted)

    @staticmethod
    def backward(ctx, grad_TD):
        y_SD, gate_S, token_S = ctx.saved_tensors
        if ctx.fused:
            grad_y, grad_gate = combine_backward(grad_TD, y_SD, gate_S, token_S)
            return (grad_y if ctx.needs_input_grad[0] else None, grad_gate if ctx.needs_input_grad[1] else None,
                    None, None, None)
        grad_SD = grad_TD.index_select(0, token_S)
        grad_y = grad_SD * gate_S.unsqueeze(-1).to(grad_SD.dtype) if ctx.needs_input_grad[0] else None
        grad_gate = (grad_SD.float() * y_SD.float()).sum(-1).to(gate_S.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_gate, None, None, None


def unpermute(y_SD: torch.Tensor, gates_TK: torch.Tensor, plan: DispatchPlan, num_tokens: int,
              kernel: str = "torch") -> torch.Tensor:
    """sum over a token's kept slots of gate * expert output; dropped slots contribute nothing.
    `kernel` (model.combine_kernel): torch's ops, or a Triton pass each way."""
    row_TK = None
    if wants_triton(kernel, y_SD, "model.combine_kernel"):  # each (token, slot)'s row of y; -1: dropped
        slots = plan.slot_S
        rows = torch.arange(slots.numel(), device=slots.device)
        row_TK = torch.full((gates_TK.numel(),), -1, device=slots.device).index_copy_(0, slots, rows)
        row_TK = row_TK.view_as(gates_TK)
    return _Combine.apply(y_SD, gates_TK.reshape(-1)[plan.slot_S], plan.token_S, row_TK, num_tokens)
