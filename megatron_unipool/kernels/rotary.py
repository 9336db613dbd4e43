"""Rotary position embedding in the rotate-half convention, over [B, S, H, K] queries or keys:
torch's elementwise ops, or one Triton kernel per direction.

With h = K/2, out[:h] = x[:h] cos - x[h:] sin and out[h:] = x[h:] cos + x[:h] sin; the gradient is
the same rotation by the opposite angle. Eager, that is a negation, a concatenation, two products
and a sum forward (and as many backward), each a pass over q or k broadcasting the [S, K] tables.
The kernel makes one pass each way, in fp32, rounding once to the input's dtype (the eager path
rounds each product and the sum to bf16 under autocast).
"""
from __future__ import annotations

import torch

from .triton_support import tl, triton, wants_triton

ROWS_PER_PROGRAM = 32


def rotary(x_BSHK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """x rotated by position: cos_SK / sin_SK hold cos and sin of each position's angles, the first
    half of K repeated in the second (at least x's sequence length of rows)."""
    seq = x_BSHK.shape[1]
    if seq > cos_SK.shape[0]:  # the kernel would read angles past the tables (the eager path fails to broadcast)
        raise ValueError(f"a sequence of {seq} positions is longer than the rotary tables' {cos_SK.shape[0]}"
                         " (model.seq_len)")
    if wants_triton(backend, x_BSHK, "model.rope_kernel"):
        return TritonRotary.apply(x_BSHK, cos_SK[:seq], sin_SK[:seq])
    cos, sin = cos_SK[:seq, None, :].to(x_BSHK.dtype), sin_SK[:seq, None, :].to(x_BSHK.dtype)
    first, second = x_BSHK.chunk(2, dim=-1)
    return x_BSHK * cos + torch.cat([-second, first], dim=-1) * sin


def _rotate(x_BSHK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor, sign: float) -> torch.Tensor:
    """One launch: every row of x (a position and head) rotated by sign * its position's angles, into
    a contiguous [B, S, H, K]. x may be strided (the gradient arrives through attention's transpose)
    as long as each row is contiguous."""
    batch, seq, heads, dim = x_BSHK.shape
    x = x_BSHK if x_BSHK.stride(-1) == 1 else x_BSHK.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = batch * seq * heads
    half = dim // 2
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _rotary_kernel[grid](x, out, cos_SK, sin_SK, rows, heads, seq, *x.stride()[:3], cos_SK.stride(0), sign,
                         HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_ROWS=ROWS_PER_PROGRAM)
    return out


class TritonRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSHK, cos_SK, sin_SK):
        ctx.save_for_backward(cos_SK, sin_SK)
        return _rotate(x_BSHK, cos_SK, sin_SK, 1.0)

    @staticmethod
    def backward(ctx, grad_BSHK):
        cos_SK, sin_SK = ctx.saved_tensors
        return _rotate(grad_BSHK, cos_SK, sin_SK, -1.0), None, None


if triton is not None:  # the kernel exists only where Triton does
    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, heads, seq, batch_stride, seq_stride, head_stride,
                       table_stride, sign, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (batch, position, head)
        col = tl.arange(0, BLOCK_HALF)
        mask = (row < rows)[:, None] & (col < HALF)[None, :]
        position = (row // heads) % seq
        source = ((row // (heads * seq)) * batch_stride + position * seq_stride + (row % heads) * head_stride)[:, None]
        target = row[:, None] * (2 * HALF) + col[None, :]  # out is contiguous
        table = position[:, None] * table_stride + col[None, :]
        x1 = tl.load(x_ptr + source + col[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + source + HALF + col[None, :], mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32) * sign
        tl.store(out_ptr + target, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + target + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
