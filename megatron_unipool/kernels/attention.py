"""Causal self-attention: flash-attn on CUDA when importable, else PyTorch SDPA.

Shapes: B batch, H query heads, G key/value heads (H % G == 0), S sequence, K head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import KernelUnavailableError

try:  # optional extra; only used on CUDA with half precision
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the installation
    flash_attn_func = None


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2 has no kernels for larger heads: "auto" falls back to SDPA
HALF_DTYPES = (torch.float16, torch.bfloat16)


def flash_supports(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    return (flash_attn_func is not None and device_type == "cuda" and dtype in HALF_DTYPES
            and head_dim <= FLASH_MAX_HEAD_DIM)


def sdpa_takes_grouped_heads(q_BHSK: torch.Tensor, masked: bool = False) -> bool:
    """Whether SDPA runs fewer key/value heads than query heads in a fused kernel. On CUDA only its flash
    kernel takes them (half precision, head dim <= 256, no mask); otherwise it falls back to its math kernel,
    which stores the [B, H, S, S] scores for backward, where K and V repeated per query head go to the
    memory-efficient kernel."""
    return q_BHSK.device.type != "cuda" or (not masked and q_BHSK.dtype in HALF_DTYPES
                                            and q_BHSK.shape[-1] <= FLASH_MAX_HEAD_DIM)


def flash_available(q: torch.Tensor) -> bool:
    return flash_supports(q.device.type, q.dtype, q.shape[-1])


def causal_attention(q_BHSK: torch.Tensor, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor, backend: str = "auto",
                     mask_B1SS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped-query causal attention; returns [B, H, S, K]. `mask_B1SS` (SDPA's attn_mask: boolean, True where
    a query may attend a key, or added to the scores), where given, replaces the causal mask (documents packed
    in a sample): SDPA only, as flash-attn's kernel takes none."""
    if backend == "flash" and mask_B1SS is not None:
        raise KernelUnavailableError("model.attention='flash' takes no attention mask (model.document_masking)")
    if backend == "flash" and not flash_available(q_BHSK):
        raise KernelUnavailableError("model.attention='flash' needs the flash-attn package, a CUDA device, bf16/fp16 and a"
                           f" head dim of at most {FLASH_MAX_HEAD_DIM} (here {q_BHSK.shape[-1]})")
    if backend in ("auto", "flash") and mask_B1SS is None and flash_available(q_BHSK):
        out = flash_attn_func(q_BHSK.transpose(1, 2), k_BGSK.transpose(1, 2), v_BGSK.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if k_BGSK.shape[1] != q_BHSK.shape[1] and not sdpa_takes_grouped_heads(q_BHSK, masked=mask_B1SS is not None):
        repeats = q_BHSK.shape[1] // k_BGSK.shape[1]
        k_BGSK, v_BGSK = k_BGSK.repeat_interleave(repeats, dim=1), v_BGSK.repeat_interleave(repeats, dim=1)
    return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, attn_mask=mask_B1SS, is_causal=mask_B1SS is None,
                                          enable_gqa=True)
