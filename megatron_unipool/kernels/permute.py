"""Tokens into the experts' layout and their outputs back (the MoE permute and combine), one Triton
pass each way and one for each backward, none with atomics.

Shapes: T tokens, k slots per token, P rows of the experts' input (the kept slots grouped by expert,
each expert's rows padded to what its GEMM needs; padding rows hold no slot), D hidden.
`row_TK[t, j]` is the row holding slot j of token t (-1: dropped over capacity); `slot_P[p]` is the
slot, t * k + j, held by row p (-1: padding).

- gather: x_P[p] = x[t] for the token t of row p's slot, zeros for padding, cast to the experts' dtype
  as it is copied. Backward: grad_x[t] = the sum of its rows' gradients, in fp32, rounded once to x's
  dtype.
- combine: out[t] = sum over j of gate[t, j] * y[row_TK[t, j]], each token's row written once (summed in
  fp32: no atomics, the same bits every run). Backward, row by row: grad_y[p] = gate * grad_out[t]
  (zeros for padding) and the gate's gradient <grad_out[t], y[p]>, an fp32 dot product, in one pass.

Eager (moe/dispatch.py), the gather is a cast and an index_select, whose backward is an index_add
(atomics on a GPU) and a cast; on CUDA the grouped GEMM's row padding then adds a zero fill, an
index_copy into the padded rows and an index_select back out (kernels/grouped_gemm.py), each with its
own backward; the combine is a weighting pass, a zero fill and a scatter-add, and its backward a
gather, a weighting pass and the gates' gradient through fp32 copies of both [S, D] operands.
"""
from __future__ import annotations

import torch

from .triton_support import tl, triton

BLOCK_ROWS = 16
MAX_BLOCK_D = 256  # columns per step: a program walks the hidden dimension in chunks of this many


class GatherRows(torch.autograd.Function):
    """x_TD -> x_PD in `dtype` (module docstring); the gradient of x in x's dtype."""

    @staticmethod
    def forward(ctx, x_TD, slot_P, row_TK, dtype):
        ctx.save_for_backward(row_TK)
        ctx.x_dtype = x_TD.dtype
        x_TD = x_TD.contiguous()
        rows, dim = slot_P.numel(), x_TD.shape[1]
        out = torch.empty(rows, dim, dtype=dtype, device=x_TD.device)
        if rows:
            _gather_rows_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
                x_TD, slot_P, out, rows, dim, TOP_K=row_TK.shape[1], BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim))
        return out

    @staticmethod
    def backward(ctx, grad_PD):
        (row_TK,) = ctx.saved_tensors
        return _sum_rows(grad_PD, row_TK, None, ctx.x_dtype), None, None, None


class CombineRows(torch.autograd.Function):
    """(y_PD, gates_TK) -> out_TD in y's dtype (module docstring)."""

    @staticmethod
    def forward(ctx, y_PD, gates_TK, row_TK, slot_P):
        ctx.save_for_backward(y_PD, gates_TK, slot_P)
        return _sum_rows(y_PD, row_TK, gates_TK, y_PD.dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, gates_TK, slot_P = ctx.saved_tensors
        grad_TD, y_PD, gates_TK = grad_TD.contiguous(), y_PD.contiguous(), gates_TK.contiguous()
        rows, dim = y_PD.shape
        grad_y = torch.empty_like(y_PD)
        grad_gates = torch.zeros(gates_TK.shape, dtype=torch.float32, device=y_PD.device)  # dropped slots: 0
        if rows:
            _combine_backward_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
                grad_TD, y_PD, gates_TK, slot_P, grad_y, grad_gates, rows, dim, TOP_K=gates_TK.shape[1],
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim))
        return grad_y, grad_gates.to(gates_TK.dtype), None, None


def _sum_rows(rows_PD: torch.Tensor, row_TK: torch.Tensor, gates_TK: torch.Tensor | None, dtype: torch.dtype
              ) -> torch.Tensor:
    """out[t] = sum over j of (gates[t, j] or 1) * rows[row_TK[t, j]], [T, D] in `dtype`, summed in fp32."""
    rows_PD, row_TK = rows_PD.contiguous(), row_TK.contiguous()
    (tokens, top_k), dim = row_TK.shape, rows_PD.shape[1]
    out = torch.empty(tokens, dim, dtype=dtype, device=rows_PD.device)
    if tokens:
        weighted = gates_TK is not None
        _sum_rows_kernel[(triton.cdiv(tokens, BLOCK_ROWS),)](
            rows_PD, gates_TK.contiguous() if weighted else rows_PD, row_TK, out, tokens, dim, TOP_K=top_k,
            WEIGHTED=weighted, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim))
    return out


def _block_d(dim: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(dim))


if triton is not None:  # the kernels exist only where Triton does
    @triton.jit
    def _gather_rows_kernel(x_ptr, slot_ptr, out_ptr, rows, dim, TOP_K: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = row < rows
        slot = tl.load(slot_ptr + row, mask=in_range, other=-1)
        has_slot = slot >= 0
        token = tl.where(has_slot, slot, 0) // TOP_K
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            in_cols = (cols < dim)[None, :]
            x = tl.load(x_ptr + token[:, None] * dim + cols[None, :], mask=has_slot[:, None] & in_cols, other=0.0)
            tl.store(out_ptr + row[:, None] * dim + cols[None, :], x.to(out_ptr.dtype.element_ty),
                     mask=in_range[:, None] & in_cols)

    @triton.jit
    def _sum_rows_kernel(rows_ptr, gate_ptr, row_ptr, out_ptr, tokens, dim, TOP_K: tl.constexpr,
                         WEIGHTED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = token < tokens
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            total = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                row = tl.load(row_ptr + token * TOP_K + j, mask=in_range, other=-1)
                kept = row >= 0
                mask = kept[:, None] & (cols < dim)[None, :]
                value = tl.load(rows_ptr + row[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if WEIGHTED:
                    gate = tl.load(gate_ptr + token * TOP_K + j, mask=kept, other=0.0).to(tl.float32)
                    value = gate[:, None] * value
                total += value
            mask = in_range[:, None] & (cols < dim)[None, :]
            tl.store(out_ptr + token[:, None] * dim + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_backward_kernel(grad_ptr, y_ptr, gate_ptr, slot_ptr, grad_y_ptr, grad_gate_ptr, rows, dim,
                                 TOP_K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = row < rows
        slot = tl.load(slot_ptr + row, mask=in_range, other=-1)
        has_slot = slot >= 0
        token = tl.where(has_slot, slot, 0) // TOP_K
        gate = tl.load(gate_ptr + slot, mask=has_slot, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            in_cols = (cols < dim)[None, :]
            mask = has_slot[:, None] & in_cols
            grad = tl.load(grad_ptr + token[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row[:, None] * dim + cols[None, :],
                     (gate[:, None] * grad).to(grad_y_ptr.dtype.element_ty), mask=in_range[:, None] & in_cols)
            dot += tl.sum(grad * y, axis=1)
        tl.store(grad_gate_ptr + slot, dot, mask=has_slot)
