"""SwiGLU experts applied to tokens already sorted by expert (dropless grouped GEMM).

Shapes: S sorted token slots, D hidden, F expert width, M experts, P padded slots.
x_SD holds expert 0's tokens first, then expert 1's, ...; counts_M says how many each has.

Three implementations with the same numbers, forward and backward:
- "grouped_mm": `torch._grouped_mm`, one kernel per projection for all experts (CUTLASS on
  Hopper), offsets computed on the device so nothing waits for the host. Its GPU kernels need
  16-byte-aligned strides, including along the token dimension in the weight-gradient GEMM, so
  on CUDA each expert's slice is padded to a multiple of 16 bytes / element size rows
  (torchtitan does the same); padding rows are zero and never read back.
- "loop": one dense GEMM per expert's contiguous slice, with its own backward (_SegmentSwiGLU).
- "triton": every expert GEMM in Triton, for few rows per expert: the forward and input-gradient GEMMs
  with the rows as the small side (kernels.rows_gemm), the weight gradients read in place
  (kernels.segmented_gemm). No row padding.

All have explicit backward passes whose weight gradients can be deferred to a
`DeferredWeightGradients`: an expert pool shared by L layers then gets one weight-gradient GEMM per
expert over all L layers' tokens, instead of L full-pool gradients each from 1/L of the tokens. On the
grouped_mm path those GEMMs either regroup the layers' rows expert-major for `torch._grouped_mm`, or
read them where they are (kernels.segmented_gemm, Triton).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import KernelUnavailableError
from .rows_gemm import rows_grouped_mm
from .segmented_gemm import segmented_weight_gradient
from .swiglu import swiglu_backward, swiglu_forward
from .triton_support import wants_triton

GROUPED_MM_ALIGN_BYTES = 16
GROUPED_MM_MAX_GROUPS = 1023  # torch's CUDA kernel sets its groups up in one thread block: < 1024 experts per call
# The weight-gradient operands of one call are (x, grad_gate, grad_up, hidden, grad_out); each weight's
# gradient is grad^T input over its expert's rows, with (grad, input) at these positions, for w_gate,
# w_up and w_down in turn.
WEIGHT_GRADIENT_OPERANDS = ((1, 0), (2, 0), (4, 3))


def grouped_mm_refusal(dtype: torch.dtype, device: torch.device, *weights: torch.Tensor) -> str | None:
    """What torch._grouped_mm lacks to take these operands (16-byte aligned rows; on CUDA bf16 and fewer
    than 1024 experts), or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch._grouped_mm, which torch {torch.__version__} lacks"
    if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
        return "bf16 operands on CUDA"
    if torch.device(device).type == "cuda" and any(w.shape[0] > GROUPED_MM_MAX_GROUPS for w in weights):
        return f"at most {GROUPED_MM_MAX_GROUPS} experts per rank on CUDA"
    align = GROUPED_MM_ALIGN_BYTES // dtype.itemsize
    if not all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights):
        return f"expert widths that are multiples of {align} for {dtype}"
    return None


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *weights: torch.Tensor) -> bool:
    return grouped_mm_refusal(dtype, device, *weights) is None


def resolve_expert_gemm(backend: str, dtype: torch.dtype, device: torch.device, *weights: torch.Tensor) -> str:
    """The expert GEMM `backend` (model.expert_gemm) runs as for operands of `dtype` on `device`."""
    device = torch.device(device)
    wants_triton(backend, device, "model.expert_gemm")  # refuses a "triton" this machine cannot run
    needs = grouped_mm_refusal(dtype, device, *weights) if backend == "grouped_mm" else None
    if needs is not None:
        raise KernelUnavailableError(
            f"model.expert_gemm='grouped_mm' is not available for {dtype} on {device.type} with expert"
            f" shapes {[tuple(w.shape) for w in weights]}: it needs {needs}; use 'auto' or 'loop'"
        )
    if backend == "auto":
        # on CPU torch's grouped_mm kernel is no faster than the loop (docs/benchmarks.md, moe_layer)
        return "grouped_mm" if device.type == "cuda" and grouped_mm_supported(dtype, device, *weights) else "loop"
    return backend


def expert_row_alignment(backend: str, dtype: torch.dtype, device: torch.device, *weights: torch.Tensor) -> int:
    """What each expert's number of rows must be a multiple of for the expert GEMM: 16 bytes of rows
    for torch._grouped_mm on CUDA, 1 otherwise."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and resolve_expert_gemm(backend, dtype, device, *weights) == "grouped_mm":
        return GROUPED_MM_ALIGN_BYTES // dtype.itemsize
    return 1


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes GEMMs on `t` in (t's own without autocast). Autocast does not
    cover grouped_swiglu's GEMMs, so their operands are cast to it explicitly."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def grouped_swiglu(
    x_SD: torch.Tensor,
    counts_M: torch.Tensor,
    w_gate_MFD: torch.Tensor,
    w_up_MFD: torch.Tensor,
    w_down_MDF: torch.Tensor,
    backend: str = "auto",
    align_rows: int | None = None,
    deferred: "DeferredWeightGradients | None" = None,
    activation: str = "torch",
) -> torch.Tensor:
    """out[s] = W_down[e] (silu(W_gate[e] x[s]) * W_up[e] x[s]) for the expert e owning slot s.

    With `deferred`, backward leaves the weight gradients to it (see DeferredWeightGradients).
    `activation` computes silu(gate) * up and its backward on the grouped_mm path (kernels.swiglu:
    torch or triton); the segment loop, a CPU path, uses torch's ops, and refuses 'triton' where Triton
    cannot run, as the dense FFN does.
    `counts_M` splits x_SD's rows over the experts in order: the loop path, which reads it anyway, checks
    that; the grouped_mm and Triton paths trust it (checking would wait for the device), and ignore
    rows past the padded counts.
    `align_rows` overrides the per-expert row padding of the grouped_mm path (expert_row_alignment):
    1 where the rows are laid out padded already (kernels.permute), or tests exercising the CUDA padding
    on CPU.
    """
    if counts_M.shape != w_gate_MFD.shape[:1]:
        raise ValueError(f"counts_M of shape {tuple(counts_M.shape)} must hold one count for each of the"
                         f" {w_gate_MFD.shape[0]} experts")
    if x_SD.shape[0] == 0:
        # no slots: an empty result still tied to x_SD and to the weights (without reading them), so that every
        # rank's backward has the same steps and every copy of a pool shard gets a gradient, zeros here: ZeRO
        # buckets skip a parameter without one, and the copies' reductions would then differ in size
        untouched = sum(w.view(-1)[:0].sum() for w in (w_gate_MFD, w_up_MFD, w_down_MDF))
        return x_SD * 0 + untouched.to(x_SD.dtype)
    # cast here, outside the kernels, so that weight gradients flow back to the fp32 masters through the casts
    dtype = autocast_dtype(x_SD)
    with torch.autocast(x_SD.device.type, enabled=False):
        x_SD, w_gate_MFD, w_up_MFD, w_down_MDF = (t.to(dtype) for t in (x_SD, w_gate_MFD, w_up_MFD, w_down_MDF))
        resolved = resolve_expert_gemm(backend, dtype, x_SD.device, w_gate_MFD, w_down_MDF)
        if resolved == "grouped_mm":
            if align_rows is None:
                align_rows = expert_row_alignment(backend, dtype, x_SD.device, w_gate_MFD, w_down_MDF)
            return _swiglu_grouped_mm(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, align_rows, deferred,
                                      activation)
        if resolved == "triton":
            return _GroupedSwiGLU.apply(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, deferred, activation,
                                        "triton")
        wants_triton(activation, x_SD, "model.swiglu_kernel")  # a setting this machine cannot run is refused
        counts = tuple(counts_M.tolist())
        if min(counts) < 0 or sum(counts) != x_SD.shape[0]:
            raise ValueError(f"counts_M {list(counts)} must give each expert a number of rows >= 0, in all the"
                             f" {x_SD.shape[0]} rows of x_SD")
        return _SegmentSwiGLU.apply(x_SD, counts, w_gate_MFD, w_up_MFD, w_down_MDF, deferred)


class _SegmentSwiGLU(torch.autograd.Function):
    """SwiGLU experts one expert slice at a time, with weight gradients written in place.

    Plain autograd over per-expert slices stacks every expert's weight gradient into the
    [M, F, D] gradient: a full extra copy per call, which dominates when a large pool is shared by
    many layers. Here each expert's weight-gradient GEMM writes its row of the gradient directly.
    Activations stay per-slice tensors: slice-sized buffers are reused by the allocator and stay in
    cache, whereas whole-batch [S, F] buffers are fresh pages on every call (2-3x slower on CPU).
    """

    @staticmethod
    def forward(ctx, x_SD, counts, w_gate_MFD, w_up_MFD, w_down_MDF, deferred):
        segments = _segments(counts)
        saved, outputs = [], []
        for e, rows in segments:
            x = x_SD[rows]
            gate, up = x @ w_gate_MFD[e].t(), x @ w_up_MFD[e].t()
            silu = F.silu(gate)
            hidden = silu * up
            outputs.append(hidden @ w_down_MDF[e].t())
            saved += [gate, up, silu, hidden]
        ctx.segments, ctx.deferred = segments, deferred
        ctx.save_for_backward(x_SD, w_gate_MFD, w_up_MFD, w_down_MDF, *saved)
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_SD):
        x_SD, w_gate_MFD, w_up_MFD, w_down_MDF, *saved = ctx.saved_tensors
        segments, deferred = ctx.segments, ctx.deferred
        if deferred is None:
            grad_w_gate, grad_w_up, grad_w_down = (_per_expert_zeros(w, segments)
                                                   for w in (w_gate_MFD, w_up_MFD, w_down_MDF))
        grad_x, deferred_slices = [], {}
        for i, (e, rows) in enumerate(segments):
            gate, up, silu, hidden = saved[4 * i: 4 * i + 4]
            x, grad = x_SD[rows], grad_SD[rows]
            grad_hidden = grad @ w_down_MDF[e]
            grad_up = grad_hidden * silu
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
            if deferred is None:
                torch.mm(grad.t(), hidden, out=grad_w_down[e])
                torch.mm(grad_gate.t(), x, out=grad_w_gate[e])
                torch.mm(grad_up.t(), x, out=grad_w_up[e])
            else:
                deferred_slices[e] = (x, grad_gate, grad_up, hidden, grad)
            grad_x.append(torch.addmm(grad_gate @ w_gate_MFD[e], grad_up, w_up_MFD[e]))
        if deferred is not None:
            deferred.add_slices(deferred_slices)
            grad_w_gate = grad_w_up = grad_w_down = None
        return torch.cat(grad_x), None, grad_w_gate, grad_w_up, grad_w_down, None


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
    buffer = torch.empty_like(like_MXY)
    used = {e for e, _ in segments}
    for e in range(like_MXY.shape[0]):
        if e not in used:
            buffer[e].zero_()
    return buffer


def _swiglu_grouped_mm(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, align_rows: int, deferred, activation
                       ) -> torch.Tensor:
    if align_rows == 1:
        return _GroupedSwiGLU.apply(x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, deferred, activation, "torch")
    rows_P, padded_counts_M, num_rows = padded_rows(counts_M, align_rows, x_SD.shape[0])
    # in place into fresh zeros (index_copy would clone them first); the rows come back by index_select,
    # whose backward is an index_add, not the sort-based index_put that advanced indexing runs
    padded = x_SD.new_zeros(num_rows, x_SD.shape[1])
    padded.index_copy_(0, rows_P, x_SD)
    out = _GroupedSwiGLU.apply(padded, padded_counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, deferred, activation, "torch")
    return out.index_select(0, rows_P)


def _grouped_mm(kernel: str, a, b, offsets, a2=None, b2=None):
    """a[s] @ b[e] for expert e's rows (+ a2[s] @ b2[e]): torch._grouped_mm, or kernels.rows_gemm."""
    if kernel == "triton":
        return rows_grouped_mm(a, b, offsets, a2, b2)
    out = torch._grouped_mm(a, b, offs=offsets)
    return out if a2 is None else out + torch._grouped_mm(a2, b2, offs=offsets)


class _GroupedSwiGLU(torch.autograd.Function):
    """SwiGLU experts as three grouped GEMMs (`kernel`: torch._grouped_mm, or Triton's, see
    grouped_swiglu), with the backward written out so that the weight gradients can be deferred. Rows
    past the last expert's (padded) count are ignored; padding rows are zero, so they add nothing to
    the weight gradients."""

    @staticmethod
    def forward(ctx, x_SD, counts_M, w_gate_MFD, w_up_MFD, w_down_MDF, deferred, activation, kernel):
        offsets = expert_offsets(counts_M)  # kept for backward's GEMMs too: two operators less each way
        gate = _grouped_mm(kernel, x_SD, w_gate_MFD.transpose(-2, -1), offsets)
        up = _grouped_mm(kernel, x_SD, w_up_MFD.transpose(-2, -1), offsets)
        ctx.deferred, ctx.activation, ctx.kernel = deferred, activation, kernel
        ctx.save_for_backward(x_SD, counts_M, offsets, w_gate_MFD, w_up_MFD, w_down_MDF, gate, up)
        hidden = swiglu_forward(gate, up, activation)
        return _grouped_mm(kernel, hidden, w_down_MDF.transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, grad_SD):
        x_SD, counts_M, offsets, w_gate_MFD, w_up_MFD, w_down_MDF, gate, up = ctx.saved_tensors
        grad_SD = grad_SD.contiguous()  # a broadcast (stride 0) gradient, as from `out.sum()`, is not a GEMM operand
        grad_hidden = _grouped_mm(ctx.kernel, grad_SD, w_down_MDF, offsets)
        grad_gate, grad_up, hidden = swiglu_backward(grad_hidden, gate, up, ctx.activation)
        grad_x = _grouped_mm(ctx.kernel, grad_gate, w_gate_MFD, offsets, grad_up, w_up_MFD)
        operands = (x_SD, grad_gate, grad_up, hidden, grad_SD)
        if ctx.deferred is not None:
            ctx.deferred.add_rows(counts_M, *operands)
            return grad_x, None, None, None, None, None, None, None
        if ctx.kernel == "triton":  # fp32 sums, rounded once to the weights' dtype
            grads = [g.to(w.dtype) for g, w in zip(_segmented_weight_gradients([(counts_M, *operands)]),
                                                   (w_gate_MFD, w_up_MFD, w_down_MDF))]
        else:
            grads = grouped_weight_gradients(offsets, *operands)
        return (grad_x, None, *grads, None, None, None)


def expert_offsets(counts_M: torch.Tensor) -> torch.Tensor:
    """Where each expert's rows end: torch._grouped_mm's `offs` (int32)."""
    return torch.cumsum(counts_M, 0, dtype=torch.int32)


def grouped_weight_gradients(offsets_M, *operands):
    """(dW_gate [M, F, D], dW_up [M, F, D], dW_down [M, D, F]) from the expert-sorted rows of
    (x, grad_gate, grad_up, hidden, grad_out), one `_grouped_mm` each (contracting over each expert's
    rows, which end at `expert_offsets`; rows past the last are ignored)."""
    return tuple(torch._grouped_mm(operands[g].t(), operands[i], offs=offsets_M) for g, i in WEIGHT_GRADIENT_OPERANDS)


class DeferredWeightGradients:
    """The weight-gradient operands of several grouped_swiglu calls on the same expert weights,
    reduced together: one weight gradient per expert summed over all the calls' rows.

    A pool shared by L layers would otherwise compute, per layer and micro-batch, a gradient for
    every expert from about 1/L of its tokens and accumulate L full-pool gradients: L times the
    weight-gradient memory traffic of per-layer experts for the same FLOPs. Costs: each call's
    operands (its inputs, hidden activations and their gradients) live until `attach`'s backward.
    `kernel` reduces the grouped_mm calls' operands: "torch" regroups them expert-major and runs one
    `torch._grouped_mm` per weight; "triton" runs one Triton GEMM per weight that reads every call's
    rows in place (no copies; fp32 results).
    """

    def __init__(self, kernel: str = "torch", field: str = "model.pool_wgrad_kernel"):
        self.kernel, self.field = kernel, field  # field: the config setting that chose `kernel`, for errors
        self._slices: list[dict[int, tuple]] = []  # segment loop: per call, expert -> its rows' operands
        self._rows: list[tuple] = []  # grouped_mm: per call, (counts_M, *expert-sorted operands)
        self._discard_queued = False

    def _discard_at_end_of_backward(self) -> None:
        """A backward pass that does not reach `attach`'s tensor (e.g. torch.autograd.grad of the
        router alone, retain_graph=True) must not leave its operands to be counted again by the next."""
        if self._discard_queued:
            return
        self._discard_queued = True

        def discard():
            self._discard_queued = False
            self._slices, self._rows = [], []

        torch.autograd.Variable._execution_engine.queue_callback(discard)  # as DDP and FSDP do

    def attach(self, anchor: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """`anchor`, unchanged, wired so that its backward gives `weights` (w_gate, w_up, w_down)
        their gradients from every call collected by then. Compute every grouped_swiglu that
        defers to this object from the returned tensor, so their backward passes all run first."""
        wants_triton(self.kernel, weights[0], self.field)  # refused here, not in backward
        return _ReleaseWeightGradients.apply(anchor, self, *weights)

    def add_slices(self, slices: dict[int, tuple]) -> None:
        """One segment-loop call: expert -> (x, grad_gate, grad_up, hidden, grad_out) of its rows."""
        self._discard_at_end_of_backward()
        self._slices.append(slices)

    def add_rows(self, counts_M: torch.Tensor, *operands: torch.Tensor) -> None:
        """One grouped_mm call: x, grad_gate, grad_up, hidden, grad_out, sorted by expert; rows past
        the counts (padding) are ignored."""
        self._discard_at_end_of_backward()
        self._rows.append((counts_M, *operands))

    def weight_gradients(self, weights) -> tuple[torch.Tensor, ...] | None:
        """(dW_gate, dW_up, dW_down) summed over the collected calls, in the operands' dtype (None if
        there were none); forgets the calls."""
        slices, rows, self._slices, self._rows = self._slices, self._rows, [], []
        if slices:
            return tuple(_accumulated_weight_gradient(slices, g, i, like=w)
                         for (g, i), w in zip(WEIGHT_GRADIENT_OPERANDS, weights))
        if rows and self.kernel == "triton":
            return _segmented_weight_gradients(rows)
        if rows:
            counts_M, *operands = _regrouped(rows)
            return grouped_weight_gradients(expert_offsets(counts_M), *operands)
        return None


def _accumulated_weight_gradient(calls: list[dict[int, tuple]], g: int, i: int, like: torch.Tensor):
    """Expert by expert, the sum over the calls of operand g^T operand i over the expert's rows: the
    expert's [N, K] sum stays in cache while each call's GEMM accumulates into it; zero without rows.
    The sum is kept in fp32 at least: with bf16 operands, rounding it after every call would lose
    more the more layers share the pool (per-layer gradients are summed in the fp32 weights' .grad)."""
    first = next(iter(calls[0].values()))[g]  # a call has rows, or it would not be here
    total_dtype = torch.promote_types(first.dtype, torch.float32)
    out = first.new_empty(like.shape, dtype=total_dtype)
    for e in range(out.shape[0]):
        parts = [call[e] for call in calls if e in call]
        if not parts:
            out[e].zero_()
        elif total_dtype == first.dtype:
            torch.mm(parts[0][g].t(), parts[0][i], out=out[e])
            for part in parts[1:]:
                out[e].addmm_(part[g].t(), part[i])
        else:
            out[e].copy_(parts[0][g].t() @ parts[0][i])
            for part in parts[1:]:
                out[e].add_(part[g].t() @ part[i])
    return out


def _segmented_weight_gradients(calls: list[tuple]) -> tuple[torch.Tensor, ...]:
    """(dW_gate, dW_up, dW_down) in fp32 from several grouped_mm calls' (counts_M, *operands), read in
    place; each gradient operand is released once its GEMM is queued."""
    columns = [list(column) for column in zip(*calls)]  # counts, x, grad_gate, grad_up, hidden, grad_out
    calls.clear()
    counts_CM = torch.stack(columns[0])
    gradients = []
    for g, i in WEIGHT_GRADIENT_OPERANDS:
        gradients.append(segmented_weight_gradient(columns[1 + g], columns[1 + i], counts_CM))
        columns[1 + g] = None
    return tuple(gradients)


def _regrouped(calls: list[tuple]) -> tuple:
    """Several grouped_mm calls' (counts_M, *operands) as one call's: rows regrouped expert-major (expert 0's
    rows of every call, then expert 1's, ...), each call's padding last; the device does it all.

    Each operand is regrouped into one buffer call by call, releasing each call's part once
    copied, so this needs one operand's worth of memory more, not a second copy of everything.
    """
    if len(calls) == 1:
        return calls[0]
    # each call's rows past its counts as one more group, so that the groups cover every row
    counts_CG = torch.stack([torch.cat([counts, (x.shape[0] - counts.sum()).view(1)]) for counts, x, *_ in calls])
    rows_C = [call[1].shape[0] for call in calls]
    # each call's destination rows, shared by its operands
    destinations = _expert_major_destinations(counts_CG, sum(rows_C)).split(rows_C)
    columns = [list(column) for column in zip(*(call[1:] for call in calls))]
    calls.clear()
    return (counts_CG[:, :-1].sum(0), *(regroup_rows(parts, destinations) for parts in columns))


class _ReleaseWeightGradients(torch.autograd.Function):
    """Identity on the anchor; its backward hands the deferred weight gradients to autograd, so
    they reach the parameters (and any gradient hooks, e.g. ZeRO's) once per backward pass."""

    @staticmethod
    def forward(ctx, anchor, deferred, *weights):
        ctx.deferred = deferred
        ctx.save_for_backward(*weights)
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.saved_tensors
        grads = ctx.deferred.weight_gradients(weights)
        if grads is None:  # no call had rows: zeros, so every rank's parameters see the same gradient events
            grads = [torch.zeros_like(w) for w in weights]
        return (grad, None, *(g.to(w.dtype) for g, w in zip(grads, weights)))


def regroup_rows(parts: list[torch.Tensor], destinations: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """out[destinations[p]] = parts[p] for every part p, into a new tensor of all their rows, for 2-D parts
    outside autograd. Part by part, each dropped from `parts` once copied, so that this needs one operand's
    worth of memory more, not a second copy of every part. Rows move as 8-byte words where both layouts
    allow: the same bytes in 4x fewer elements for bf16 rows, as PyTorch's index_copy_ kernel spends per
    element (on CPU bf16 rows of 3072 went 1.4x faster as words; on a GPU not measured yet). `out`'s view
    as words is taken once, not per part: each view is two operators for the host."""
    out = parts[0].new_empty(sum(index.shape[0] for index in destinations), parts[0].shape[1])
    out_words = _as_words(out)
    for index in destinations:
        part = parts.pop(0)
        part_words = _as_words(part) if out_words is not None else None
        if part_words is None:
            out.index_copy_(0, index, part)
        else:
            out_words.index_copy_(0, index, part_words)
    return out


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """A 2-D tensor's rows as int64 words, where its element size, row stride and offset allow."""
    size = t.element_size()
    aligned = all((n * size) % 8 == 0 for n in (t.shape[1], t.stride(0), t.storage_offset()))
    return t.view(torch.int64) if size < 8 and t.stride(1) == 1 and aligned else None


def _expert_major_destinations(counts_CG: torch.Tensor, total: int) -> torch.Tensor:
    """Where each row of the concatenated calls goes when the rows are regrouped group-major: group
    0's rows of call 0, of call 1, ..., then group 1's, ... (call c's rows are `counts_CG[c]`
    consecutive groups).

    Computed on the device without a host sync: `total`, the number of rows, is known from shapes.
    """
    calls, groups = counts_CG.shape
    lengths = counts_CG.reshape(-1)
    source_start = torch.cumsum(lengths, 0) - lengths
    lengths_GC = counts_CG.t().reshape(-1)
    target_start = (torch.cumsum(lengths_GC, 0) - lengths_GC).view(groups, calls).t().reshape(-1)
    # each row moves by its block's shift, as padded_rows moves each expert's
    shift = target_start - source_start
    return torch.arange(total, device=counts_CG.device) + shift.repeat_interleave(lengths, output_size=total)


def padded_rows(counts_M: torch.Tensor, align: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row of each slot when every expert's slice starts at a multiple of `align`; padded counts; and the
    padded layout's number of rows, num_slots + M * (align - 1) whatever the counts (rows past the padded
    counts are padding too).

    Computed on the device without a host sync (the slot count is known from the shapes).
    """
    slot = torch.arange(num_slots, device=counts_M.device)
    if align == 1:
        return slot, counts_M, num_slots
    padding_M = (-counts_M) % align
    shift_M = torch.cumsum(padding_M, 0) - padding_M  # the padding rows before each expert's first one
    rows = slot + shift_M.repeat_interleave(counts_M, output_size=num_slots)
    return rows, counts_M + padding_M, num_slots + counts_M.numel() * (align - 1)
