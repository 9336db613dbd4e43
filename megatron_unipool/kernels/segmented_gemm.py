"""Weight gradients of experts several calls share, contracted over every call's rows where they lie.

Shapes: C calls, M experts, N and K the weight's dimensions (out[e] is [N, K]).
Call c contributes, for each expert e, the rows of its operands a_c [rows_c, N] and b_c [rows_c, K]
that expert e owns: its rows are sorted by expert, counts_CM[c, e] of them (rows past the counts, such
as trailing padding, are ignored). The result is

    out[e] = sum over c of a_c[rows of e]^T b_c[rows of e]    (fp32)

One kernel launch computes it from the calls' own tensors, reached as offsets from the first call's
(each tensor at a multiple of 16 bytes, which the kernel tells the compiler: sm_90 code then loads rows
with 16-byte asynchronous copies, where a table of raw addresses compiled to 2-byte loads; a tensor
that is not so aligned, or whose rows are not contiguous, is copied first): nothing else is copied.
A pool shared by L layers (UniPool) otherwise regroups the layers' operands expert-major into one
buffer per operand before one `torch._grouped_mm` per weight (kernels/grouped_gemm.py), a copy of
every operand. Each program computes one [BLOCK_N, BLOCK_K] tile of one expert's gradient, walking
that expert's row segment in every call in turn, accumulating in fp32: the sum over the calls is
rounded once, to fp32. fp32 operands are multiplied in full fp32 ("ieee"), not TF32 (Triton's default).
"""
from __future__ import annotations

import torch

from .triton_support import gemm_configs, tl, triton

ALIGN_BYTES = 16
# (BLOCK_N, BLOCK_K, BLOCK_R, warps, stages): tiles of the [N, K] gradient and rows per step; on a GPU the
# fastest of these for each (N, K), timed at the first call (Triton's autotuner)
GPU_TILES = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3)]


def segmented_weight_gradient(a_calls: list[torch.Tensor], b_calls: list[torch.Tensor], counts_CM: torch.Tensor
                              ) -> torch.Tensor:
    """[M, N, K] fp32: for each expert, a^T b summed over its rows in every call (module docstring).
    The calls' operands share a dtype and a device, each 2-D (`_aligned` says which get copied first)."""
    calls, experts = counts_CM.shape
    n, k = a_calls[0].shape[1], b_calls[0].shape[1]
    a_calls, b_calls = _aligned(a_calls), _aligned(b_calls)  # referenced here until the kernel is queued
    device = a_calls[0].device
    counts_CM = counts_CM.to(device=device, dtype=torch.int64)
    starts_CM = torch.cumsum(counts_CM, 1) - counts_CM
    out = torch.empty(experts, n, k, dtype=torch.float32, device=device)

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), experts

    _segmented_at_b_kernel[grid](a_calls[0], _offsets(a_calls), b_calls[0], _offsets(b_calls), starts_CM, counts_CM,
                                 out, calls, experts, n, k, ALIGN=ALIGN_BYTES // a_calls[0].element_size(),
                                 IEEE=a_calls[0].dtype == torch.float32)
    return out


def _aligned(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors, each copied whose rows are not contiguous or whose address is not a multiple of
    ALIGN_BYTES. A copy must stay referenced until the kernel is queued: after that, the caching
    allocator orders any reuse of its memory behind the kernel."""
    return [t if t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0 else t.clone(memory_format=torch.contiguous_format)
            for t in tensors]


def _offsets(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's offset from the first, in elements (of their common dtype), on their device: copied
    from pinned memory without waiting, as a copy from pageable memory would wait for the device to drain."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = torch.tensor([(t.data_ptr() - base) // size for t in tensors], dtype=torch.int64)
    if not tensors[0].is_cuda:
        return offsets
    return offsets.pin_memory().to(tensors[0].device, non_blocking=True)


if triton is not None:  # the kernel exists only where Triton does
    # it writes every entry of out: timing it more than once is harmless
    @triton.autotune(configs=gemm_configs(GPU_TILES, ("BLOCK_N", "BLOCK_K", "BLOCK_R")), key=["N", "K"])
    @triton.jit
    def _segmented_at_b_kernel(a_base, a_offsets, b_base, b_offsets, starts_ptr, counts_ptr, out_ptr,
                               calls, experts, N, K, ALIGN: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                               UPCAST: tl.constexpr, IEEE: tl.constexpr):
        tile, expert = tl.program_id(0), tl.program_id(1)
        tiles_k = tl.cdiv(K, BLOCK_K)
        cols_n = (tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_k = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        steps = tl.arange(0, BLOCK_R)
        total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for call in range(calls):
            # this call's operands, ALIGN elements (16 bytes) aligned as the first call's
            a_ptr = a_base + tl.multiple_of(tl.load(a_offsets + call), ALIGN)
            b_ptr = b_base + tl.multiple_of(tl.load(b_offsets + call), ALIGN)
            start = tl.load(starts_ptr + call * experts + expert)
            count = tl.load(counts_ptr + call * experts + expert)
            for offset in range(0, count, BLOCK_R):
                rows = start + offset + steps
                in_segment = (offset + steps) < count
                a = tl.load(a_ptr + rows[:, None] * N + cols_n[None, :],
                            mask=in_segment[:, None] & (cols_n < N)[None, :], other=0.0)
                b = tl.load(b_ptr + rows[:, None] * K + cols_k[None, :],
                            mask=in_segment[:, None] & (cols_k < K)[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                if IEEE:
                    total = tl.dot(tl.trans(a), b, total, input_precision="ieee")
                else:
                    total = tl.dot(tl.trans(a), b, total)
        out = out_ptr + expert.to(tl.int64) * N * K + cols_n[:, None] * K + cols_k[None, :]
        tl.store(out, total, mask=(cols_n < N)[:, None] & (cols_k < K)[None, :])
