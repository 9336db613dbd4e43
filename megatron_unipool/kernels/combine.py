"""The MoE combine, out[t] = sum over token t's kept slots s of gate[s] * y[s], and its backward, as
one Triton pass each way.

Shapes: T tokens, k slots per token, S kept slots (rows of y, grouped by expert), D hidden.
`row_TK[t, j]` is the row of y holding slot j of token t (-1 for a slot dropped over capacity);
`token_S[s]` is the token of row s.

Eager (moe/dispatch.py), forward is a weighting pass, a zero fill and a scatter-add (atomics on a
GPU), and backward a gather, a weighting pass and the gates' gradient through fp32 copies of both
[S, D] operands. Here forward gathers each token's k rows and writes its output row once (no atomics,
so the same bits every run), and backward reads each row's output gradient and expert output once,
writing the expert output's gradient and the gate's gradient (an fp32 dot product) in the same pass.
"""
from __future__ import annotations

import torch

from .triton_support import tl, triton

BLOCK_ROWS = 16
MAX_BLOCK_D = 256  # columns per step: a program walks the hidden dimension in chunks of this many


def combine_forward(y_SD: torch.Tensor, gate_S: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """[T, D] in y's dtype, summed in fp32 and rounded once."""
    y_SD, gate_S, row_TK = y_SD.contiguous(), gate_S.contiguous(), row_TK.contiguous()
    (tokens, top_k), dim = row_TK.shape, y_SD.shape[1]
    out = torch.empty(tokens, dim, dtype=y_SD.dtype, device=y_SD.device)
    _combine_forward_kernel[(triton.cdiv(tokens, BLOCK_ROWS),)](
        y_SD, gate_S, row_TK, out, tokens, dim, TOP_K=top_k, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim))
    return out


def combine_backward(grad_TD: torch.Tensor, y_SD: torch.Tensor, gate_S: torch.Tensor, token_S: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of y [S, D] in y's dtype, gradient of the gates [S] in their dtype)."""
    grad_TD, y_SD, gate_S, token_S = (t.contiguous() for t in (grad_TD, y_SD, gate_S, token_S))
    rows, dim = y_SD.shape
    grad_y = torch.empty_like(y_SD)
    grad_gate = torch.empty(rows, dtype=torch.float32, device=y_SD.device)
    _combine_backward_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        grad_TD, y_SD, gate_S, token_S, grad_y, grad_gate, rows, dim, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim))
    return grad_y, grad_gate.to(gate_S.dtype)


def _block_d(dim: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(dim))


if triton is not None:  # the kernels exist only where Triton does
    @triton.jit
    def _combine_forward_kernel(y_ptr, gate_ptr, row_ptr, out_ptr, tokens, dim, TOP_K: tl.constexpr,
                                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = token < tokens
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            total = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                row = tl.load(row_ptr + token * TOP_K + j, mask=in_range, other=-1)
                kept = row >= 0
                gate = tl.load(gate_ptr + row, mask=kept, other=0.0).to(tl.float32)
                mask = kept[:, None] & (cols < dim)[None, :]
                y = tl.load(y_ptr + row[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                total += gate[:, None] * y
            mask = in_range[:, None] & (cols < dim)[None, :]
            tl.store(out_ptr + token[:, None] * dim + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_backward_kernel(grad_ptr, y_ptr, gate_ptr, token_ptr, grad_y_ptr, grad_gate_ptr, rows, dim,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = row < rows
        token = tl.load(token_ptr + row, mask=in_range, other=0)
        gate = tl.load(gate_ptr + row, mask=in_range, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = in_range[:, None] & (cols < dim)[None, :]
            grad = tl.load(grad_ptr + token[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row[:, None] * dim + cols[None, :],
                     (gate[:, None] * grad).to(grad_y_ptr.dtype.element_ty), mask=mask)
            dot += tl.sum(grad * y, axis=1)
        tl.store(grad_gate_ptr + row, dot, mask=in_range)
