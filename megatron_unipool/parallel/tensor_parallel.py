"""Megatron-style tensor parallelism: column/row-parallel linears, a vocabulary-parallel embedding
and cross-entropy.

Every tensor-parallel rank sees the same input activations and computes the same loss; the
autograd functions below place the all-reduces so that each rank's gradients are those of its
own weight slice. Layers are built from the full (unsharded) weight so that a model has the
same initial values whatever its layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .state import Group


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; all-reduce backward (the input feeds every rank's slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward (sum of partial results); identity backward (each rank owns its part)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorParallel.apply(x, group)


def shard(full: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    """Part `rank` of `parts` equal slices along `dim`, in storage of its own (the full tensor can be freed)."""
    return full.chunk(parts, dim=dim)[rank].clone()


class TensorParallelInput(nn.Module):
    """The input that several column-parallel linears share (q, k, v; a SwiGLU's gate and up): one
    all-reduce of its summed gradient in backward, where each linear copying the input itself would
    all-reduce a gradient of its own (Megatron fuses such linears into one for the same reason)."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, x):
        return copy_to_tensor_parallel(x, self.group)


class ColumnParallelLinear(nn.Module):
    """y_slice = x W_slice^T: the output features are split; the input is replicated.

    ``shared_input``: the input has passed through a `TensorParallelInput` already, which reduces its
    gradient over the group."""

    def __init__(self, full: nn.Linear, group: Group, rank: int, parts: int, shared_input: bool = False):
        super().__init__()
        self.group = None if shared_input else group
        self.weight = nn.Parameter(shard(full.weight.data, 0, rank, parts))

    def forward(self, x):
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_slice W_slice^T: the input features are split, the output summed."""

    def __init__(self, full: nn.Linear, group: Group, rank: int, parts: int):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(shard(full.weight.data, 1, rank, parts))

    def forward(self, x_slice):
        return reduce_from_tensor_parallel(F.linear(x_slice, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of the vocabulary; rows it lacks contribute zeros."""

    def __init__(self, full: nn.Embedding, group: Group, rank: int, parts: int):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(shard(full.weight.data, 0, rank, parts))
        self.first = rank * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tensor_parallel(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


def vocab_parallel_cross_entropy_sum(logits_slice: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over tokens of -log softmax(logits)[target], with the vocabulary split over `group`.

    logits_slice [N, V/tp] holds this rank's vocabulary range (without tensor parallelism
    model.loss takes `kernels.cross_entropy_sum`). The max is a constant shift (no gradient); the two
    sums are all-reduced with an identity backward, so each rank's gradient is softmax - onehot on
    its own slice. A target outside the vocabulary gives a NaN loss, as the Triton kernel's does, where
    it would otherwise add log(sum exp) alone.
    """
    logits_slice = logits_slice.float()
    width = logits_slice.shape[-1]
    first = dist.get_rank(group) * width
    shift = logits_slice.detach().max(dim=-1).values
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shifted = logits_slice - shift.unsqueeze(-1)
    sum_exp = reduce_from_tensor_parallel(shifted.exp().sum(dim=-1), group)
    local = targets - first
    inside = (local >= 0) & (local < width)
    target_logit = shifted.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * inside
    target_logit = reduce_from_tensor_parallel(target_logit, group)
    outside_vocabulary = (targets < 0) | (targets >= width * dist.get_world_size(group))
    return (sum_exp.log() - target_logit).masked_fill(outside_vocabulary, float("nan")).sum()
