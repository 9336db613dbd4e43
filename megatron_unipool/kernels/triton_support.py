"""Triton where it is installed (CUDA builds of torch bring it; optional on CPU). Its kernels run on
CUDA tensors, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1 was set before
Triton was imported: slowly, which is how the tests check our kernels on a CPU machine."""
from __future__ import annotations

import os

import torch

from .errors import KernelUnavailableError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """A Triton kernel can take `t` here: compiled on CUDA, interpreted on a CPU."""
    return triton is not None and (t.is_cuda or interpreting())


def wants_triton(backend: str, t: torch.Tensor, field: str) -> bool:
    """Whether config `field` set to `backend` asks for the Triton kernel; one this machine cannot run
    on `t` is the user's error."""
    if backend == "triton" and not triton_runs_on(t):
        raise KernelUnavailableError(f"{field}='triton' needs Triton and a CUDA device")
    return backend == "triton"
