"""The SwiGLU activation, hidden = silu(gate) * up, and its backward: torch's elementwise ops, or one
Triton pass each way.

Eager, forward is two passes (silu, product) and the backward the expert GEMMs need (the gradients
of gate and up, and hidden again as the down projection's weight-gradient operand) four more, each
reading and writing [rows, width] tensors, the widest activations of the model. The kernel reads
gate, up (and the hidden gradient) once and writes its results once, computing in fp32 and rounding
once to the inputs' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import tl, triton, wants_triton

BLOCK = 1024


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up, outside autograd (for kernels with their own backward)."""
    if not wants_triton(backend, gate, "model.swiglu_kernel"):
        return F.silu(gate) * up
    gate, up = gate.contiguous(), up.contiguous()
    hidden = torch.empty_like(gate)
    _swiglu_forward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, hidden, gate.numel(), BLOCK=BLOCK)
    return hidden


def swiglu_backward(grad_hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str = "torch",
                    need_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad of gate, grad of up, silu(gate) * up or None) from the gradient of silu(gate) * up.
    Eager, it overwrites `grad_hidden`."""
    if not wants_triton(backend, gate, "model.swiglu_kernel"):
        silu = F.silu(gate)
        grad_up = grad_hidden * silu
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        return grad_gate, grad_up, silu.mul_(up) if need_hidden else None
    grad_hidden, gate, up = grad_hidden.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    hidden = torch.empty_like(gate) if need_hidden else None
    _swiglu_backward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        grad_hidden, gate, up, grad_gate, grad_up, grad_gate if hidden is None else hidden, gate.numel(),
        WRITE_HIDDEN=need_hidden, BLOCK=BLOCK)
    return grad_gate, grad_up, hidden


class _TritonSwiGLUActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up, "triton")

    @staticmethod
    def backward(ctx, grad_hidden):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up, _ = swiglu_backward(grad_hidden, gate, up, "triton", need_hidden=False)
        return grad_gate, grad_up


def swiglu_activation(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up under autograd (the dense SwiGLU): torch's ops, or the kernel each way."""
    if not wants_triton(backend, gate, "model.swiglu_kernel"):
        return F.silu(gate) * up
    return _TritonSwiGLUActivation.apply(gate, up)


if triton is not None:  # the kernels exist only where Triton does
    @triton.jit
    def _swiglu_forward_kernel(gate_ptr, up_ptr, hidden_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        gate = tl.load(gate_ptr + i, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + i, mask=mask, other=0.0).to(tl.float32)
        hidden = gate * tl.sigmoid(gate) * up
        tl.store(hidden_ptr + i, hidden.to(hidden_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(grad_hidden_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, hidden_ptr, n,
                                WRITE_HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        grad_hidden = tl.load(grad_hidden_ptr + i, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + i, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + i, mask=mask, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        grad_silu = sigmoid * (1.0 + gate * (1.0 - sigmoid))  # d silu / d gate
        tl.store(grad_gate_ptr + i, (grad_hidden * up * grad_silu).to(grad_gate_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_up_ptr + i, (grad_hidden * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)
        if WRITE_HIDDEN:
            tl.store(hidden_ptr + i, (silu * up).to(hidden_ptr.dtype.element_ty), mask=mask)
