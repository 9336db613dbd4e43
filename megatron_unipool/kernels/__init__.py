"""Compute kernels with plain-PyTorch fallbacks; nothing here knows about models."""
from .attention import causal_attention
from .grouped_swiglu import grouped_swiglu
