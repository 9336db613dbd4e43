"""Causal self-attention: flash-attn on CUDA when importable, else PyTorch SDPA.

Shapes: B batch, H query heads, G key/value heads (H % G == 0), S sequence, K head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra; only used on CUDA with half precision
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the installation
    flash_attn_func = None


def flash_available(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def causal_attention(q_BHSK: torch.Tensor, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Grouped-query causal attention; returns [B, H, S, K]."""
    if backend == "flash" and not flash_available(q_BHSK):
        raise RuntimeError("model.attention='flash' needs the flash-attn package, a CUDA device and bf16/fp16")
    if backend in ("auto", "flash") and flash_available(q_BHSK):
        out = flash_attn_func(q_BHSK.transpose(1, 2), k_BGSK.transpose(1, 2), v_BGSK.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, is_causal=True, enable_gqa=True)
