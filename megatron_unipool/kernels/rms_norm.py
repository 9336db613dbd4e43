"""RMSNorm: apex's fused CUDA kernel when importable, else torch's `rms_norm` (its own fused
kernel on CUDA; one pass of elementwise ops on CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import KernelUnavailableError

try:  # optional extra: NVIDIA apex built with its CUDA extensions
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    import fused_layer_norm_cuda  # noqa: F401  apex imports it at the first call: without --cuda_ext, fail here
except ImportError:  # pragma: no cover - depends on the installation
    fused_rms_norm_affine = None


def apex_rms_norm_available(x: torch.Tensor) -> bool:
    return fused_rms_norm_affine is not None and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    if backend == "apex" and not apex_rms_norm_available(x):
        raise KernelUnavailableError("model.rms_norm='apex' needs NVIDIA apex (with its CUDA extensions) and a CUDA device")
    # inside a torch.compile graph torch's op fuses with its neighbours, where apex's kernel would split the graph
    auto_apex = backend == "auto" and not torch.compiler.is_compiling()
    if (auto_apex or backend == "apex") and apex_rms_norm_available(x):
        # apex casts its inputs to the autocast dtype; torch's op keeps the fp32 residual stream fp32 (the
        # router reads the norm's output in fp32), so apex runs in the inputs' dtype too
        with torch.autocast("cuda", enabled=False):
            return fused_rms_norm_affine(x, weight, weight.shape, eps)
    return F.rms_norm(x, weight.shape, weight, eps)
