"""Expert parallelism: send expert-sorted token slots to the ranks owning their experts and back.

Shapes: S slots on this rank sorted by (global) expert, M experts in the pool, sharded
contiguously over the ep ranks (rank r owns experts [r*M/ep, (r+1)*M/ep)), D hidden.
Splits are variable (dropless routing sends what the router chose); gradients travel back by
the reverse all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .state import Group


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send_splits), ...] -> [sum(recv_splits), ...]; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group: Group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


@dataclass
class Exchange:
    """How one layer's slots travelled, to send the results back."""

    send_splits: list[int]  # slots this rank sends to each ep rank
    recv_splits: list[int]  # slots it receives from each
    order: torch.Tensor  # received slots, source-major -> local-expert-major
    local_counts: torch.Tensor  # slots per local expert, over all sources
    group: Group
    dtype: torch.dtype  # results travel back in the activations' dtype, whatever the experts computed in


def dispatch_to_experts(x_SD: torch.Tensor, counts_M: torch.Tensor, group: Group) -> tuple[torch.Tensor, Exchange]:
    """All-to-all the slots to their experts' owners; returns them grouped by local expert."""
    ep = dist.get_world_size(group)
    per_rank_counts = counts_M.view(ep, -1)  # [ep destinations, local experts]
    received_counts = torch.empty_like(per_rank_counts)
    dist.all_to_all_single(received_counts, per_rank_counts.contiguous(), group=group)  # [ep sources, local experts]
    send_splits = per_rank_counts.sum(1).tolist()
    recv_splits = received_counts.sum(1).tolist()
    received = _AllToAll.apply(x_SD, send_splits, recv_splits, group)
    local_experts = torch.arange(received_counts.shape[1], device=x_SD.device).repeat(ep)
    expert_of_slot = torch.repeat_interleave(local_experts, received_counts.flatten())
    order = torch.argsort(expert_of_slot, stable=True)
    exchange = Exchange(send_splits, recv_splits, order, received_counts.sum(0), group, x_SD.dtype)
    return received.index_select(0, order), exchange


def return_to_sources(y_local_SD: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Inverse of dispatch_to_experts: results back to the ranks and slot order they came from."""
    y_local_SD = y_local_SD.to(exchange.dtype)
    source_major = torch.empty_like(y_local_SD).index_copy(0, exchange.order, y_local_SD)
    return _AllToAll.apply(source_major, exchange.recv_splits, exchange.send_splits, exchange.group)
