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


def triton_runs_on(where: torch.Tensor | torch.device | str) -> bool:
    """A Triton kernel can take tensors like `where` (a tensor, or a device) here: compiled on CUDA,
    interpreted on a CPU."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return triton is not None and (device.type == "cuda" or interpreting())


def wants_triton(backend: str, where: torch.Tensor | torch.device | str, field: str) -> bool:
    """Whether config `field` set to `backend` asks for the Triton kernel; one this machine cannot run
    on `where` (a tensor, or a device) is the user's error."""
    if backend == "triton" and not triton_runs_on(where):
        raise KernelUnavailableError(f"{field}='triton' needs Triton and a CUDA device")
    return backend == "triton"


def gemm_configs(tiles: list[tuple[int, ...]], block_names: tuple[str, ...]) -> list:
    """Autotuner configs of a GEMM kernel: on a GPU one per tile (its blocks named `block_names`, then
    warps and stages); in the interpreter (tests on CPU) blocks of 16 and the operands upcast to fp32
    (`UPCAST`: its tl.dot misreads bf16, Triton 3.9)."""
    if interpreting():
        return [triton.Config({**dict.fromkeys(block_names, 16), "UPCAST": True})]
    return [triton.Config({**dict(zip(block_names, tile)), "UPCAST": False}, num_warps=tile[-2], num_stages=tile[-1])
            for tile in tiles]
