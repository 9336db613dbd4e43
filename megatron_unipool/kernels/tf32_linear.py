"""x @ w^T for fp32 tensors whose three GEMMs (forward, and both gradients in backward) run on TF32
tensor cores on CUDA: inputs rounded to a 10-bit mantissa, products accumulated in fp32, fp32 results.
Without it an fp32 GEMM on CUDA runs on the ordinary cores, several times slower (torch leaves TF32 off
by default); elsewhere TF32 does not exist and this is F.linear's product.

TF32 is a process-wide cuBLAS setting, so it is switched on only around these GEMMs and restored.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """fp32 matmuls inside may use TF32 (torch's `fp32_precision` setting, restored on leaving). Inside,
    torch's legacy readers of the setting (`get_float32_matmul_precision`, `matmul.allow_tf32`) raise on
    the mix of its two APIs: only the GEMMs run here, which read the new one."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


class _TF32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_MD):
        ctx.save_for_backward(x_TD, w_MD)
        with tf32_matmuls():
            return torch.mm(x_TD, w_MD.t())

    @staticmethod
    def backward(ctx, grad_TM):
        x_TD, w_MD = ctx.saved_tensors
        with tf32_matmuls():
            grad_x = torch.mm(grad_TM, w_MD) if ctx.needs_input_grad[0] else None
            grad_w = torch.mm(grad_TM.t(), x_TD) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def tf32_linear(x_TD: torch.Tensor, w_MD: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias, for 2-D x, with TF32 GEMMs on CUDA (module docstring)."""
    return _TF32Linear.apply(x_TD, w_MD)
