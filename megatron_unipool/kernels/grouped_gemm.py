"""SwiGLU experts applied to tokens already sorted by expert (dropless grouped GEMM).

Shapes: S sorted token slots, D hidden, F expert width, M experts, P padded slots.
x_SD holds expert 0's tokens first, then expert 1's, ...; counts_M says how many each has.

Two implementations with the same numbers, forward and backward:
- "grouped_mm": `torch._grouped_mm`, one kernel per projection for all experts (CUTLASS on
  Hopper), offsets computed on the device so nothing waits for the host. Its GPU kernels need
  16-byte-aligned strides, including along the token dimension in the weight-gradient GEMM, so
  on CUDA each expert's slice is padded to a multiple of 16 bytes / element size rows
  (torchtitan does the same); padding rows are zero and never read back.
- "loop": one dense GEMM per expert's contiguous slice, with its own backward (_SegmentSwiGLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPED_MM_ALIGN_BYTES = 16


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm exists and takes these operands (16-byte aligned rows; bf16 only on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    align = GROUPED_MM_ALIGN_BYTES // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def resolve_expert_gemm(backend: str, x: torch.Tensor, *weights: torch.Tensor) -> str:
    if backend == "grouped_mm" and not grouped_mm_supported(x, *weights):
        raise RuntimeError(
            f"model.expert_gemm='grouped_mm' is not available for {x.dtype} on {x.device.type} with expert"
            f" shapes {[tuple(w.shape) for w in weights]} (needs torch._grouped_mm, bf16 on CUDA, widths that"
            f" are multiples of {GROUPED_MM_ALIGN_BYTES // x.element_size()}); use 'auto' or 'loop'"
        )
    if backend == "auto":
        # on CPU torch's grouped_mm kernel is no faster than the loop (docs/benchmarks.md, moe_layer)
        return "grouped_mm" if x.is_cuda and grouped_mm_supported(x, *weights) else "loop"
    return backend


def grouped_swiglu(
    x_SD: torch.Tensor,
    counts_M: torch.Tensor,
    w_gate_MFD: torch.Tensor,
    w_up_MFD: torch.Tensor,
    w_down_MDF: torch.Tensor,
    backend: str = "auto",
    align_rows: int | None = None,
) -> torch.Tensor:
    """out[s] = W_down[e] (silu(W_gate[e] x[s]) * W_up[e] x[s]) for the expert e owning slot s.

    `align_rows` overrides the per-expert row padding of the grouped_mm path (tests use it to
    exercise the CUDA padding on CPU).
    """
    if x_SD.shape[0] == 0:  # no slots: an empty result still tied to x_SD, so every rank's backward has the same steps
        return x_SD * 0
    # autocast does not cover these GEMMs: cast to its dtype here, outside the kernels, so that weight
    # gradients flow back to the fp32 masters through the casts
    device = x_SD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_SD.dtype
    with torch.autocast(device, enabled=False):
        x_SD, w_gate_MFD, w_up_MFD, w_down_MDF = (t.to(dtype) for t in (x_SD, w_gate_MFD, w_up_MFD, w_down_MDF))
        if resolve_expert_gemm(backend, x_SD, w_gate_MFD, w_down_MDF) == "grouped_mm":
            if align_rows is None:
                align_rows = GROUPED_MM_ALIGN_BYTES // x_SD.element_size() if x_SD.is_cuda else 1
            return _swiglu_grouped_mm(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, align_rows)
        return _SegmentSwiGLU.apply(x_SD, tuple(counts_M.tolist()), w_gate_MFD, w_up_MFD, w_down_MDF)


class _SegmentSwiGLU(torch.autograd.Function):
    """SwiGLU experts one expert slice at a time, with weight gradients written in place.

    Plain autograd over per-expert slices stacks every expert's weight gradient into the
    [M, F, D] gradient: a full extra copy per call, which dominates when a large pool is shared by
    many layers. Here each expert's weight-gradient GEMM writes its row of the gradient directly.
    Activations stay per-slice tensors: slice-sized buffers are reused by the allocator and stay in
    cache, whereas whole-batch [S, F] buffers are fresh pages on every call (2-3x slower on CPU).
    """

    @staticmethod
    def forward(ctx, x_SD, counts, w_gate_MFD, w_up_MFD, w_down_MDF):
        segments = _segments(counts)
        saved, outputs = [], []
        for e, rows in segments:
            x = x_SD[rows]
            gate, up = x @ w_gate_MFD[e].t(), x @ w_up_MFD[e].t()
            silu = F.silu(gate)
            hidden = silu * up
            outputs.append(hidden @ w_down_MDF[e].t())
            saved += [gate, up, silu, hidden]
        ctx.segments = segments
        ctx.save_for_backward(x_SD, w_gate_MFD, w_up_MFD, w_down_MDF, *saved)
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_SD):
        x_SD, w_gate_MFD, w_up_MFD, w_down_MDF, *saved = ctx.saved_tensors
        segments = ctx.segments
        grad_w_gate, grad_w_up = _per_expert_zeros(w_gate_MFD, segments), _per_expert_zeros(w_up_MFD, segments)
        grad_w_down = _per_expert_zeros(w_down_MDF, segments)
        grad_x = []
        for i, (e, rows) in enumerate(segments):
            gate, up, silu, hidden = saved[4 * i: 4 * i + 4]
            x, grad = x_SD[rows], grad_SD[rows]
            grad_hidden = grad @ w_down_MDF[e]
            torch.mm(grad.t(), hidden, out=grad_w_down[e])
            grad_up = grad_hidden * silu
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
            torch.mm(grad_gate.t(), x, out=grad_w_gate[e])
            torch.mm(grad_up.t(), x, out=grad_w_up[e])
            grad_x.append(torch.addmm(grad_gate @ w_gate_MFD[e], grad_up, w_up_MFD[e]))
        return torch.cat(grad_x), None, grad_w_gate, grad_w_up, grad_w_down


def _segments(counts: tuple[int, ...]) -> list[tuple[int, slice]]:
    """(expert, its rows) for every expert that has rows."""
    segments, start = [], 0
    for e, count in enumerate(counts):
        if count:
            segments.append((e, slice(start, start + count)))
        start += count
    return segments


def _per_expert_zeros(like_MXY: torch.Tensor, segments) -> torch.Tensor:
    """A gradient buffer whose rows of experts without tokens are zero (the others get written)."""
    used = {e for e, _ in segments}
    if len(used) == like_MXY.shape[0]:
        return torch.empty_like(like_MXY)
    buffer = torch.empty_like(like_MXY)
    for e in range(like_MXY.shape[0]):
        if e not in used:
            buffer[e].zero_()
    return buffer


def _swiglu_grouped_mm(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, align_rows: int) -> torch.Tensor:
    if align_rows == 1:
        offsets = torch.cumsum(counts_M, 0).to(torch.int32)
        return _grouped_swiglu_core(x_SD, offsets, w_gate_MFD, w_up_MFD, w_down_MDF)
    rows_P, offsets = _padded_rows(counts_M, align_rows, x_SD.shape[0])
    padded = x_SD.new_zeros(x_SD.shape[0] + counts_M.numel() * (align_rows - 1), x_SD.shape[1])
    padded = padded.index_copy(0, rows_P, x_SD)
    return _grouped_swiglu_core(padded, offsets, w_gate_MFD, w_up_MFD, w_down_MDF)[rows_P]


def _grouped_swiglu_core(x, offsets, w_gate_MFD, w_up_MFD, w_down_MDF) -> torch.Tensor:
    gate = torch._grouped_mm(x, w_gate_MFD.transpose(-2, -1), offs=offsets)
    up = torch._grouped_mm(x, w_up_MFD.transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(torch._grouped_mm(F.silu(gate) * up, w_down_MDF.transpose(-2, -1), offs=offsets))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: _grouped_mm's backward rejects
    broadcast (stride 0) gradients such as that of `out.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _padded_rows(counts_M: torch.Tensor, align: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each slot when every expert's slice starts at a multiple of `align`; padded end offsets.

    Computed on the device without a host sync (the slot count is known from the shapes).
    """
    padded = (counts_M + align - 1) // align * align
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts_M, 0) - counts_M
    experts = torch.arange(counts_M.numel(), device=counts_M.device)
    expert_of_slot = torch.repeat_interleave(experts, counts_M, output_size=num_slots)
    slot = torch.arange(num_slots, device=counts_M.device)
    rows = padded_start[expert_of_slot] + slot - start[expert_of_slot]
    return rows, torch.cumsum(padded, 0).to(torch.int32)
