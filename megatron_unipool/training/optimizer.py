"""AdamW with Megatron's weight-decay grouping, and the learning-rate schedule: linear warm-up, then a cosine,
linear or no decay, or warmup-stable-decay."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..kernels import KernelUnavailableError


def decay_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Matrices (and expert tensors) decay; norms, scalars and biases do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"name": "decay", "params": decay, "weight_decay": config.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW by train.adamw: torch's fused kernel ('auto': on CUDA one launch for all tensors; on CPU one
    pass over each tensor where the per-tensor loop makes several), its multi-tensor 'foreach' path, or
    apex's FusedAdam."""
    groups = decay_groups(model, config) if groups is None else groups
    hyper = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps)
    if config.adamw == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as error:
            raise KernelUnavailableError("train.adamw='apex' needs NVIDIA apex built with its CUDA extensions") from error
        if not all(p.is_cuda for group in groups for p in group["params"]):
            raise KernelUnavailableError("train.adamw='apex' needs the model on a CUDA device")
        return FusedAdam(groups, adam_w_mode=True, **hyper)
    if config.adamw in ("auto", "fused"):
        return torch.optim.AdamW(groups, fused=True, **hyper)
    return torch.optim.AdamW(groups, foreach=True, **hyper)


# the share of lr - min_lr left at a decay's progress p in [0, 1] (Megatron's WSD decay styles, as it names them)
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "minus_sqrt": lambda p: 1.0 - math.sqrt(p),
}


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate of optimizer step `step` (0-based; Megatron counts it step + 1): linear warmup reaching lr at
    the last warmup step, then by train.lr_decay: a cosine or a line reaching min_lr at the last step,
    max_steps - 1; lr throughout (constant); or lr until the last lr_cooldown_steps steps, which fall to
    min_lr at the last step in train.lr_cooldown_shape (wsd). Without warmup the first step is the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_decay == "constant":
        return config.lr
    if config.lr_decay == "wsd":
        cooled = step - (config.max_steps - config.lr_cooldown_steps) + 1  # 1 at the cool-down's first step
        shape, progress = config.lr_cooldown_shape, min(1.0, max(0, cooled) / config.lr_cooldown_steps)
    else:
        peak = max(config.warmup_steps - 1, 0)
        shape, progress = config.lr_decay, min(1.0, (step - peak) / max(1, config.max_steps - 1 - peak))
    return config.min_lr + (config.lr - config.min_lr) * DECAY_SHAPES[shape](progress)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
