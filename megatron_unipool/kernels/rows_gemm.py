"""The experts' forward and input-gradient GEMMs in Triton, with each expert's rows as the small side.

Shapes: S rows sorted by expert (expert e's are rows ends[e-1] .. ends[e]), M experts, K the
contraction, N the output width. For every row s of expert e:

    out[s] = a[s] @ b[e]        (a [S, K], b [M, K, N] with any strides; optionally + a2[s] @ b2[e])

which is `torch._grouped_mm(a, b, offs=ends)`. Where few rows reach each expert (UniPool's pool: about
85 per expert and layer for the 469M model) torch._grouped_mm ran at 41% of a dense GEMM's rate on an
H200, 2.75 ms where the weights' memory traffic bounds it near 1.0 ms (docs/benchmarks.md). Here each
program computes a [BLOCK_N, BLOCK_S] tile of out^T = b[e]^T a^T: the weight's N side fills the tensor
cores' 64-row dimension and the rows take the other, in blocks as narrow as 16, so 85 rows cost 96
computed. Programs over one expert's row blocks are adjacent in the grid, so they run together and read
each weight tile from L2 after the first. No row padding is needed: the rows of a block past
its expert's end are masked. The second pair (a2, b2) sums two products in one pass (the input
gradient of the gate and up projections). fp32 operands are multiplied in full fp32 ("ieee"), not TF32.

The expert of each program is found from the row ends in the kernel (each program loads all M of
them): no host sync and no table to build per tile size, so the autotuner may pick the row block.
"""
from __future__ import annotations

import torch

from .triton_support import gemm_configs, tl, triton

# (BLOCK_N, BLOCK_K, BLOCK_S, warps, stages): weight-side tile, contraction step, row block
GPU_TILES = [(128, 64, 16, 4, 4), (128, 64, 32, 4, 4), (128, 64, 64, 4, 4)]


def rows_grouped_mm(a_SK: torch.Tensor, b_MKN: torch.Tensor, ends_M: torch.Tensor, a2_SK: torch.Tensor | None = None,
                    b2_MKN: torch.Tensor | None = None) -> torch.Tensor:
    """[S, N] in a's dtype: a @ b[e] per expert's rows (+ a2 @ b2[e]); rows past ends[-1] are left unwritten."""
    a_SK = a_SK.contiguous()
    rows, k = a_SK.shape
    experts, _, n = b_MKN.shape
    pair = a2_SK is not None
    a2_SK = a2_SK.contiguous() if pair else a_SK
    b2_MKN = b2_MKN if pair else b_MKN
    out = torch.empty(rows, n, dtype=a_SK.dtype, device=a_SK.device)
    if rows == 0:
        return out
    ends_M = ends_M.to(torch.int64)
    experts_p2 = triton.next_power_of_2(experts)
    # a bucket of the mean rows per expert, so that the autotuner picks a row block per regime
    rows_bucket = triton.next_power_of_2(max(1, rows // experts))

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_S"]) + experts, triton.cdiv(n, meta["BLOCK_N"])

    _rows_grouped_mm_kernel[grid](
        a_SK, b_MKN, a2_SK, b2_MKN, out, ends_M, experts, n, k, a2_SK.shape[1], *b_MKN.stride(), *b2_MKN.stride(),
        rows_bucket, PAIR=pair, EXPERTS_P2=experts_p2, IEEE=a_SK.dtype == torch.float32)
    return out


if triton is not None:  # the kernel exists only where Triton does
    @triton.jit
    def _accumulate(acc, a_ptr, b_ptr, rows, in_rows, cols_n, K, N, stride_bk, stride_bn,
                    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc [BLOCK_N, BLOCK_S] += b[:, cols_n]^T a[rows]^T over all of K (b already at its expert)."""
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            in_k = ks < K
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=in_rows[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptr + cols_n[:, None] * stride_bn + ks[None, :] * stride_bk,
                        mask=(cols_n < N)[:, None] & in_k[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc = tl.dot(b, tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(b, tl.trans(a), acc)
        return acc

    # tuned per shape, weight layout (stride_bk 1: read transposed) and rows-per-expert regime; out is rewritten whole
    @triton.autotune(configs=gemm_configs(GPU_TILES, ("BLOCK_N", "BLOCK_K", "BLOCK_S")),
                     key=["N", "K", "stride_bk", "EXPERTS_P2", "rows_bucket"])
    @triton.jit
    def _rows_grouped_mm_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, out_ptr, ends_ptr, experts, N, K, K2,
                                stride_be, stride_bk, stride_bn, stride_b2e, stride_b2k, stride_b2n, rows_bucket,
                                PAIR: tl.constexpr, EXPERTS_P2: tl.constexpr, IEEE: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                                UPCAST: tl.constexpr):
        block, n_block = tl.program_id(0), tl.program_id(1)
        # this program's expert and rows: the experts' row blocks laid end to end, block `block` of them
        index = tl.arange(0, EXPERTS_P2)
        valid = index < experts
        ends = tl.load(ends_ptr + index, mask=valid, other=0)
        starts = tl.load(ends_ptr + index - 1, mask=valid & (index > 0), other=0)
        blocks = (ends - starts + BLOCK_S - 1) // BLOCK_S
        blocks_before = tl.cumsum(blocks, 0) - blocks
        if block >= tl.sum(blocks):
            return
        expert = tl.sum(((blocks_before + blocks) <= block).to(tl.int32))
        mine = index == expert
        first_row = tl.sum(tl.where(mine, starts, 0)) + (block - tl.sum(tl.where(mine, blocks_before, 0))) * BLOCK_S
        rows = first_row + tl.arange(0, BLOCK_S)
        in_rows = rows < tl.sum(tl.where(mine, ends, 0))
        cols_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)
        acc = _accumulate(acc, a_ptr, b_ptr + expert.to(tl.int64) * stride_be, rows, in_rows, cols_n, K, N,
                          stride_bk, stride_bn, BLOCK_K, UPCAST, IEEE)
        if PAIR:
            acc = _accumulate(acc, a2_ptr, b2_ptr + expert.to(tl.int64) * stride_b2e, rows, in_rows, cols_n, K2, N,
                              stride_b2k, stride_b2n, BLOCK_K, UPCAST, IEEE)
        out = out_ptr + rows[None, :].to(tl.int64) * N + cols_n[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_rows[None, :] & (cols_n < N)[:, None])
