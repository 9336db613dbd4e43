"""Compute kernels with plain-PyTorch fallbacks; nothing here knows about models."""
from .attention import causal_attention
from .cross_entropy import cross_entropy_sum
from .errors import KernelUnavailableError
from .grouped_gemm import DeferredWeightGradients, autocast_dtype, grouped_swiglu
from .rms_norm import rms_norm
from .rotary import rotary
from .swiglu import swiglu_activation
from .tf32_linear import tf32_linear
